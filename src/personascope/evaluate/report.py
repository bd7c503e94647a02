"""`DIR/report.html`: one self-contained page (plots inlined as base64 PNGs) from a run's eval.json and manifest."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from html import escape
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.evaluate.quality import MAX_FLUENCY_LOSS, MIN_RELEVANCE
from personascope.evaluate.result import CurvePoint, Estimate, Evaluation, Projections, Quality
from personascope.io.files import write_text

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ddd; padding: 4px 8px;
vertical-align: top; text-align: left; } th { background: #f6f6f6; }
.answer { white-space: pre-wrap; max-width: 420px; } .note { color: #a40; }
"""


def _figure_png(draw: Any) -> str:
    """Run `draw(ax)` on a new Agg figure; return an `<img>` tag with the PNG inlined."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.4), dpi=100)
    axes = figure.add_subplot()
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _by_layer(evaluation: Evaluation, key: str, label: str) -> Any:
    def draw(ax: Any) -> None:
        layers, best = evaluation.layers, evaluation.best_layer
        points = [(e.layer, getattr(e, key)) for e in layers if getattr(e, key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3)
        chosen = [(e.layer, getattr(e, key)) for e in layers if getattr(e, key) is not None and e.eligible]
        ax.plot([p[0] for p in chosen], [p[1] for p in chosen], "o", ms=6, mfc="none", label="eligible (AUROC)")
        if key == "auroc":
            reported = [(e.layer, e.report_auroc) for e in layers if e.report_auroc is not None]
            ax.plot([p[0] for p in reported], [p[1] for p in reported], marker="x", ms=3, lw=0.8,
                    label="report part")
            ax.axhline(0.5, color="grey", lw=0.8)
        ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"best layer {best}")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by layer")
        ax.legend(loc="best", fontsize=8)

    return draw


def _histogram(projections: Projections) -> Any:
    def draw(ax: Any) -> None:
        import numpy as np

        bins = np.histogram_bin_edges(projections.pos + projections.neg, bins=20)
        ax.hist(projections.neg, bins=bins, alpha=0.6, label="neg (trait-negative prompt)")
        ax.hist(projections.pos, bins=bins, alpha=0.6, label="pos (trait-positive prompt)")
        ax.set_xlabel(f"projection on the unit vector at layer {projections.layer}")
        ax.set_ylabel("eval responses (report part)")
        ax.set_title("Held-out projections (no system prompt)")
        ax.legend(fontsize=8)

    return draw


def _sweep(evaluation: Evaluation) -> Any:
    def draw(ax: Any) -> None:
        curve = evaluation.curve
        xs = [p.fraction for p in curve]
        for key, label in (("margin_gain", "margin gain"), ("pos_gain", "pos log-lik gain"),
                           ("neg_gain", "neg log-lik gain")):
            ax.plot(xs, [getattr(p, key) for p in curve], marker="o", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(evaluation.best_fraction, color="tab:red", ls="--", lw=1, label="chosen")
        ax.set_xlabel("steering strength (fraction of the residual norm)")
        ax.set_ylabel("nats per token")
        ax.set_title(f"Likelihood under steering at layer {evaluation.best_layer}")
        ax.legend(fontsize=8)

    return draw


_MEASURES = {
    "trait": ("trait expression (0 plain, 1 prompted)", "trait", None),
    "relevance": ("relevance (share of plain)", "relevance", MIN_RELEVANCE),
    "fluency": ("fluency loss (nats/token, lower is better)", "coherence", MAX_FLUENCY_LOSS),
}


def _measure(evaluation: Evaluation, name: str) -> Any:
    """One judge-free measure of the steered answers against the strength, with its interval, the prompted
    answers' level as a line, its floor, and the judge's matching score / 100 when there is one."""
    label, judged_key, floor = _MEASURES[name]

    def value(quality: Quality) -> tuple[float | None, float | None, float | None]:
        if name == "fluency":
            return quality.fluency_loss, None, None
        estimate = getattr(quality, name)
        return estimate.value, estimate.low, estimate.high

    def draw(ax: Any) -> None:
        curve = [p for p in evaluation.curve if value(p.quality)[0] is not None]
        xs = [p.fraction for p in curve]
        values = [value(p.quality) for p in curve]
        ax.plot(xs, [v[0] for v in values], marker="o", label="steered")
        bands = [(x, v) for x, v in zip(xs, values) if v[1] is not None]
        if bands:
            ax.fill_between([x for x, _ in bands], [v[1] for _, v in bands], [v[2] for _, v in bands], alpha=0.2,
                            label="95% interval")
        prompted = value(evaluation.prompted)[0]
        if prompted is not None:
            ax.axhline(prompted, color="tab:green", lw=1.2, label="prompted")
        if floor is not None:
            ax.axhline(floor, color="grey", ls=":", lw=1, label="floor")
        judged = [(p.fraction, getattr(p.judgement, judged_key) / 100) for p in evaluation.curve
                  if p.judgement is not None and getattr(p.judgement, judged_key) is not None]
        if judged:
            ax.plot([j[0] for j in judged], [j[1] for j in judged], marker="^", ls="--",
                    label=f"judged {judged_key} / 100")
        broken = [(p.fraction, value(p.quality)[0]) for p in curve if not p.kept]
        ax.plot([b[0] for b in broken], [b[1] for b in broken], "x", color="tab:red", ms=9, label="breaks a floor")
        ax.axvline(evaluation.best_fraction, color="tab:red", ls="--", lw=1, label="chosen")
        ax.set_xlabel("steering strength (fraction of the residual norm)")
        ax.set_title(label)
        ax.legend(fontsize=7)

    return draw


def _estimate(estimate: Estimate) -> str:
    if estimate.value is None:
        return "—"
    interval = "" if estimate.low is None else f" ({estimate.low:.2f} to {estimate.high:.2f})"
    return f"{estimate.value:.2f}{interval}"


def _quality_row(name: str, quality: Quality) -> tuple[Any, ...]:
    return (name, _estimate(quality.trait), quality.vs_opposite, quality.vs_role_play, _estimate(quality.relevance),
            quality.fluency_loss, quality.distinct_2, quality.loop_answers, quality.empty)


_QUALITY_HEAD = ("answers", "trait expression (95% CI)", "vs opposite prompts", "vs role-play prompts",
                 "relevance (95% CI)", "fluency loss", "distinct-2", "looping", "empty")


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None, cls: str = "") -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{cls}">{escape(_fmt(v))}</td>' for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersonascopeError(f"cannot read {path} ({exc}); rerun `personascope evaluate` on the run") from None


def render_report(evaluation: Evaluation, config: dict[str, Any] | None = None, title: str = "") -> str:
    """The report page for one evaluation (as `evaluate_run` returns it) and the run's config."""
    best, trait, v = evaluation.best_layer, evaluation.trait, evaluation.validation
    interval = "—" if v.auroc_low is None else f"{v.auroc_low:.3f}–{v.auroc_high:.3f}"
    parts = [f"<h1>Persona vector: {escape(trait)}</h1>",
             f'<p class="sub">{escape(title or evaluation.model)}</p>',
             "<h2>Choice</h2>",
             _table([("best layer", best), ("best coefficient", evaluation.best_coef),
                     ("as fraction of the residual norm", evaluation.best_fraction),
                     ("coefficient chosen by", evaluation.coef_source), ("rule", evaluation.rule),
                     ("judge", evaluation.judge)]),
             "<h2>Honest validation</h2>",
             f"<p>The held-out rows were split {escape(v.split)} (seed {v.seed}): {v.select_rows} rows of "
             f"{len(v.select_questions)} questions chose the layer; the other {v.report_rows} rows, of "
             f"{len(v.report_questions)} questions, report its AUROC.</p>",
             _table([("AUROC at the best layer (report part)", v.auroc),
                     (f"95% bootstrap interval ({v.resamples} resamples of the rows)", interval),
                     ("selection questions", "; ".join(v.select_questions)),
                     ("report questions", "; ".join(v.report_questions))])]
    parts += [f'<p class="note">{escape(n)}</p>' for n in evaluation.notes]
    plots = [_figure_png(_by_layer(evaluation, "auroc", "held-out AUROC (selection part)")),
             _figure_png(_by_layer(evaluation, "margin_gain",
                                   f"margin gain at {evaluation.layers[0].fraction:g}·norm")),
             _figure_png(_histogram(evaluation.projections)),
             _figure_png(_sweep(evaluation)),
             *(_figure_png(_measure(evaluation, name)) for name in _MEASURES)]
    c = evaluation.comparison
    parts += ["<h2>Steering beside prompting</h2>",
              f"<p>{len(c.questions)} held-out questions that chose neither the layer nor the strength, answered "
              f"plainly, steered at layer {best} with coef {evaluation.best_coef:.4g}, and under the trait's "
              "positive system prompts (trait expression is 0 for plain and 1 for prompted answers by "
              "definition).</p>",
              _table([_quality_row(name, quality) for name, quality in
                      (("plain", c.plain), ("steered", c.steered), ("prompted", c.prompted))], _QUALITY_HEAD),
              _choice_table(evaluation)]
    parts += ["<h2>Validation</h2>", '<div class="grid">', *plots, "</div>",
              "<h3>Steering curve at the best layer</h3>",
              _table([(p.fraction, p.coef, p.margin_gain, *_quality_row("", p.quality)[1:], "yes" if p.kept else "no",
                       "; ".join(p.failures), *_judged(p)) for p in evaluation.curve],
                     ("fraction", "coef", "margin gain", *_QUALITY_HEAD[1:], "kept", "floors broken",
                      "judged trait", "judged coherence", "judged relevance")),
              "<p>The prompted answers to the same questions:</p>",
              _table([_quality_row("prompted", evaluation.prompted)], _QUALITY_HEAD)]
    parts += [f"<h2>Examples (default decoding; steered at layer {best}, coef {evaluation.best_coef:.4g}; "
              "prompted: under one of the trait's positive system prompts)</h2>",
              _table([(e.question, e.unsteered, e.steered, e.prompted) for e in evaluation.examples],
                     ("question", "plain", "steered", "prompted"), cls="answer"),
              "<h2>Layers</h2>",
              _table([(e.layer, e.auroc, e.report_auroc, e.margin_gain, e.coef, e.residual_norm, e.vector_norm)
                      for e in evaluation.layers],
                     ("layer", "AUROC (selection)", "AUROC (report)", "margin gain", "coef", "residual norm",
                      "vector norm")),
              "<h2>Counts and timings</h2>",
              _table([(k, v) for k, v in {**evaluation.counts, **evaluation.timings}.items()])]
    if config:
        parts += ["<h2>Run configuration</h2>", _table(sorted(config.items()))]
    parts += ["<h2>Evaluation settings</h2>", _table(sorted(asdict(evaluation.settings).items()))]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(trait)} persona vector</title><style>{_STYLE}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


def _judged(point: CurvePoint) -> tuple[Any, ...]:
    j = point.judgement
    return (None, None, None) if j is None else (j.trait, j.coherence, j.relevance)


def _choice_table(evaluation: Evaluation) -> str:
    choice, rows = evaluation.choice, []
    rows.append(("judge-free choice (fraction of the residual norm)", choice.balance_fraction))
    if choice.agreement is not None:
        a = choice.agreement
        rows += [("judged choice (fraction of the residual norm)", choice.judge_fraction),
                 ("same strength", "yes" if a.same_choice else "no"),
                 (f"Spearman, judged trait vs trait expression ({a.answers} answers)", a.trait_spearman),
                 ("Spearman, judged relevance vs relevance", a.relevance_spearman)]
    return _table(rows, ("choice", "value"))


def report_path(eval_path: Path) -> Path:
    """`report.html` beside `eval.json`; `report.layers-TAG.html` beside `eval.layers-TAG.json`."""
    return eval_path.with_name("report" + eval_path.name.removeprefix("eval").removesuffix(".json") + ".html")


def write_report(run_dir: Path, eval_path: Path | None = None) -> Path:
    """Write the report of `eval_path` (default `DIR/eval.json`; `DIR/manifest.json` gives the run config)
    to `report_path(eval_path)`; returns it."""
    run_dir = Path(run_dir)
    eval_path = Path(eval_path) if eval_path is not None else run_dir / "eval.json"
    if not eval_path.exists():
        raise PersonascopeError(f"{run_dir} has no {eval_path.name}: run `personascope evaluate {run_dir}` first")
    evaluation = Evaluation.load(eval_path)
    manifest = run_dir / "manifest.json"
    config = _read_json(manifest).get("config") if manifest.exists() else None
    html = render_report(evaluation, config, title=f"{evaluation.model} · {run_dir.name}")
    return write_text(report_path(eval_path), html)
