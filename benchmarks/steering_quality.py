"""Steering quality for every built-in trait on the embedded model: at the coefficient `extract` chooses, the
trait expression, relevance and fluency of steered answers beside prompted ones, on held-out questions that chose
neither the layer nor the strength, checked against the targets.

Each trait is extracted with the defaults (`personascope extract TRAIT --out RUNS/TRAIT`, judge none); a finished
run is reused, and its evaluation is made again when it was written by an older version (or with
`--reevaluate`). Targets, at the chosen
coefficient: trait expression >= 0.5 (of the plain -> prompted gap), relevance >= 0.8 of plain, no looping answer,
mean distinct-2 >= 0.75. A trait that misses them is listed with the best the curve offered and why.

    python benchmarks/steering_quality.py --runs runs/quality --json results/steering_quality.json \
        --markdown results/steering_quality.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import console, machine, print_table, save

from personascope.evaluate.quality import MIN_DISTINCT_2, MIN_RELEVANCE
from personascope.evaluate.result import CurvePoint, Evaluation, Quality
from personascope.extract.pipeline import ExtractConfig, extract
from personascope.io.files import write_text
from personascope.model import ModelHandle, load_model
from personascope.traits import builtin_trait_names

MIN_TRAIT = 0.5
"""Target: steering reaches at least half of prompting's trait expression."""


def parser() -> argparse.ArgumentParser:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--traits", nargs="*", help="built-in traits (default: all)")
    args.add_argument("--runs", default="runs/quality", help="run directories go here, one per trait")
    args.add_argument("--reevaluate", action="store_true",
                      help="evaluate finished runs again (their eval.json is replaced; responses and vectors kept)")
    args.add_argument("--json", help="write the figures here")
    args.add_argument("--markdown", help="write the per-trait table here")
    return args


def misses(quality: Quality) -> list[str]:
    """The targets `quality` misses (empty: all met)."""
    out = []
    trait, relevance = quality.trait.value, quality.relevance.value
    if trait is None or trait < MIN_TRAIT:
        out.append(f"trait {_n(trait)} < {MIN_TRAIT:g}")
    if relevance is None or relevance < MIN_RELEVANCE:
        out.append(f"relevance {_n(relevance)} < {MIN_RELEVANCE:g}")
    if quality.loop_answers:
        out.append(f"{quality.loop_answers} looping")
    if quality.distinct_2 < MIN_DISTINCT_2:
        out.append(f"distinct-2 {quality.distinct_2:.2f} < {MIN_DISTINCT_2:g}")
    return out


def best_and_why(curve: list[CurvePoint]) -> str:
    """For a trait that misses the targets: what the curve offered and what stood in the way."""
    steered = curve[1:]
    if all(p.quality.trait.value is None for p in steered):
        return ("the trait's system prompts hardly change how the answers read on this model (prompted answers fit "
                "the trait's prompts by less than 0.05 nats/token better than plain ones), so there is no prompted "
                "level to measure steering against")
    strong = [p for p in steered if (p.quality.trait.value or -1.0) >= MIN_TRAIT]
    if not strong:
        top = max(steered, key=lambda p: p.quality.trait.value if p.quality.trait.value is not None else -1e9)
        return (f"trait expression peaks at {_n(top.quality.trait.value)} (fraction {top.fraction:g}, relevance "
                f"{_n(top.quality.relevance.value)}): the vector does not carry the trait that far before the "
                "answers break")
    first = min(strong, key=lambda p: p.fraction)
    broken = "; ".join(first.failures) or "none on the curve's questions"
    return (f"trait first reaches {MIN_TRAIT:g} at fraction {first.fraction:g} (trait "
            f"{_n(first.quality.trait.value)}), where it breaks: {broken}")


def _why(evaluation: Evaluation) -> str:
    chosen = next(p for p in evaluation.curve if p.fraction == evaluation.best_fraction)
    steered = evaluation.comparison.steered
    if all(p.quality.trait.value is None for p in evaluation.curve[1:]) and chosen.margin_gain > 0:
        return (best_and_why(evaluation.curve) + "; on the curve's questions the margin gain chose fraction "
                f"{chosen.fraction:g} (+{chosen.margin_gain:.2f} nats/token toward the trait's responses, relevance "
                f"{_n(chosen.quality.relevance.value)}, fluency loss {_n(chosen.quality.fluency_loss, '+.2f')})")
    if steered.trait.value is None and chosen.quality.trait.value is not None:
        return (f"on the report questions the prompts moved a contrast by less than 0.05 nats/token, so trait "
                f"expression could not be measured there (vs opposite prompts alone: {_n(steered.vs_opposite)}); on "
                f"the curve's questions the chosen strength reached {_n(chosen.quality.trait.value)}; "
                + best_and_why(evaluation.curve))
    return best_and_why(evaluation.curve)


def row(evaluation: Evaluation) -> dict[str, Any]:
    c, v = evaluation.comparison, evaluation.validation
    missed = misses(c.steered)
    return {
        "trait": evaluation.trait, "layer": evaluation.best_layer, "auroc": v.auroc, "auroc_low": v.auroc_low,
        "auroc_high": v.auroc_high, "coef": evaluation.best_coef, "fraction": evaluation.best_fraction,
        "steered": _quality(c.steered), "prompted": _quality(c.prompted), "plain": _quality(c.plain),
        "questions": len(c.questions), "targets_met": not missed, "missed": missed,
        "best_and_why": None if not missed else _why(evaluation), "notes": evaluation.notes,
        "evaluation_s": evaluation.timings.get("total_s"),
    }


def _quality(q: Quality) -> dict[str, Any]:
    return {"trait": q.trait.value, "trait_low": q.trait.low, "trait_high": q.trait.high,
            "relevance": q.relevance.value, "relevance_low": q.relevance.low, "relevance_high": q.relevance.high,
            "vs_opposite": q.vs_opposite, "vs_role_play": q.vs_role_play, "fluency_loss": q.fluency_loss,
            "distinct_2": q.distinct_2, "loop_answers": q.loop_answers}


def _n(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _ci(value: float | None, low: float | None, high: float | None) -> str:
    return _n(value) + ("" if low is None else f" ({_n(low)}–{_n(high)})")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README's per-trait table."""
    lines = ["| trait | layer | held-out AUROC (95% CI) | coef (fraction) | steered: trait | vs opposite | relevance | "
             "fluency loss | distinct-2 | loops | prompted: relevance | fluency loss | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r["steered"], r["prompted"]
        lines.append(
            f"| {r['trait']} | {r['layer']} | {_ci(r['auroc'], r['auroc_low'], r['auroc_high'])} | "
            f"{r['coef']:.2f} ({r['fraction']:g}) | {_ci(s['trait'], s['trait_low'], s['trait_high'])} | "
            f"{_n(s['vs_opposite'])} | "
            f"{_ci(s['relevance'], s['relevance_low'], s['relevance_high'])} | {_n(s['fluency_loss'], '+.2f')} | "
            f"{s['distinct_2']:.2f} | {s['loop_answers']} | {_n(p['relevance'])} | {_n(p['fluency_loss'], '+.2f')} | "
            f"{'met' if r['targets_met'] else 'missed: ' + '; '.join(r['missed'])} |")
    missed = [r for r in rows if not r["targets_met"]]
    if missed:
        lines += ["", "Missed, with the best the curve offered:", ""]
        lines += [f"* **{r['trait']}**: {r['best_and_why']}." for r in missed]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, handle: ModelHandle | None = None) -> dict[str, Any]:
    handle = handle or load_model()
    rows = []
    for trait in args.traits or builtin_trait_names():
        out = Path(args.runs) / trait
        if args.reevaluate:
            (out / "eval.json").unlink(missing_ok=True)  # the run evaluates again; responses and vectors stay
        result = extract(ExtractConfig(trait=trait, model=handle.name), out, handle=handle)
        rows.append(row(result.evaluation))
        r = rows[-1]
        console.print(f"{trait}: layer {r['layer']}, steered trait {_n(r['steered']['trait'])} relevance "
                      f"{_n(r['steered']['relevance'])}; targets {'met' if r['targets_met'] else 'missed'}")
    print_table("Steering beside prompting at the chosen coefficient (held-out questions)",
                ["trait", "layer", "AUROC", "coef", "steered trait", "relevance", "fluency loss", "loops",
                 "prompted relevance", "targets"],
                [[r["trait"], r["layer"], _n(r["auroc"]), f"{r['coef']:.2f}", _n(r["steered"]["trait"]),
                  _n(r["steered"]["relevance"]), _n(r["steered"]["fluency_loss"], "+.2f"),
                  r["steered"]["loop_answers"], _n(r["prompted"]["relevance"]),
                  "met" if r["targets_met"] else "; ".join(r["missed"])] for r in rows])
    figures = {"machine": machine(), "model": handle.name, "traits": rows,
               "met": sum(r["targets_met"] for r in rows), "targets": {
                   "trait": MIN_TRAIT, "relevance": MIN_RELEVANCE, "loop_answers": 0, "distinct_2": MIN_DISTINCT_2}}
    if args.markdown:
        write_text(Path(args.markdown), markdown(rows))
    save(args.json, figures)
    return figures


if __name__ == "__main__":
    run(parser().parse_args())
