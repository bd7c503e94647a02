"""`personascope evaluate`: validate a run's vector (or a bare vector file) and choose its layer and coefficient."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from personascope.cli import app, console
from personascope.cli.options import (
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    Placement,
    model_for_vector,
)
from personascope.errors import PersonascopeError

if TYPE_CHECKING:
    from personascope.evaluate.result import Estimate, Evaluation, Quality


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory of `personascope extract`, or a vector file.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model (default: the run's, or the vector's).")] = None,
    trait: Annotated[Optional[str], typer.Option(help="Trait of a bare vector file (default: the vector's trait).")] = None,
    judge: Annotated[str, typer.Option(help="openai:MODEL, anthropic:MODEL, hf:MODEL, or none (judge-free only).")] = "none",
    judge_base_url: Annotated[Optional[str], typer.Option(help="Judge server URL (else OPENAI_BASE_URL / ANTHROPIC_BASE_URL).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layers to evaluate, e.g. 8,10,12 or 6-14 (default: all).")] = None,
    pairs: Annotated[int, typer.Option(help="Bare vector: system-prompt pairs answering the eval questions.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Bare vector: length of each eval response.")] = 48,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    engine: EngineOption = "hf",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Re-run validation: held-out AUROC and likelihood-margin gain per layer, then the steering curve at the best
    layer (trait expression, relevance and fluency of steered answers beside prompted ones; judged too with
    --judge), the best layer and coefficient, and steering beside prompting on other held-out questions. For a run directory this rewrites
    eval.json, report.html and the best layer/coefficient in vector.safetensors; with --layers it writes
    eval.layers-TAG.json and report.layers-TAG.html beside them instead (e.g. eval.layers-6-14.json) and
    leaves the run's choice alone."""
    from personascope.evaluate.result import EvalSettings
    from personascope.inference.engines import check_engine
    from personascope.io.layers import parse_layers
    from personascope.judge.judges import make_judge
    from personascope.model import DEFAULT_MODEL
    from personascope.vector import PersonaVector

    chosen = None if layers is None else parse_layers(layers, option="--layers")
    settings = EvalSettings(engine=check_engine(engine))
    if target.is_dir():
        if trait is not None:
            raise PersonascopeError("--trait applies to a bare vector file; a run directory has its own trait.json")
        from personascope.evaluate.report import write_report
        from personascope.evaluate.search import eval_path, evaluate_run

        handle = Placement(device, dtype, device_map).load(model or _run_model(target) or DEFAULT_MODEL)
        scorer = make_judge(judge, base_url=judge_base_url, cache_path=target / "judge_cache.sqlite")
        result = evaluate_run(target, handle, judge=scorer, layers=chosen, settings=settings, progress=not quiet)
        if chosen is None:
            _update_recommended(target / "vector.safetensors", result)
        report = write_report(target, eval_path(target, chosen))
    elif target.exists():
        from personascope.evaluate.search import evaluate_vector
        from personascope.traits import load_trait

        vec = PersonaVector.load(target)
        handle = Placement(device, dtype, device_map).load(model_for_vector(model, target))
        vec.check_model(handle)
        spec = load_trait(trait or vec.trait)
        scorer = make_judge(judge, base_url=judge_base_url)
        result = evaluate_vector(handle, vec, spec, judge=scorer, layers=chosen, pairs=pairs,
                                 max_new_tokens=max_new_tokens, settings=settings, progress=not quiet)
        report = None
    else:
        raise PersonascopeError(f"{target} does not exist: give a run directory or a .safetensors vector file")
    _print(result, report)


def _run_model(run_dir: Path) -> str | None:
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get("config", {}).get("model")


def _update_recommended(path: Path, result: Evaluation) -> None:
    """Keep the run's recommended vector in step with the new choice of layer and coefficient."""
    from personascope.vector import PersonaVector

    if path.exists():
        vec = PersonaVector.load(path)
        vec.metadata.update(best_layer=str(result.best_layer), best_coef=f"{result.best_coef:g}")
        vec.save(path)


def _print(result: Evaluation, report: Path | None) -> None:
    table = Table("layer", "AUROC (select)", "AUROC (report)", "margin gain", "coef",
                  title=f"{result.trait} on {result.model}")
    for entry in result.layers:
        gain, held = entry.margin_gain, entry.report_auroc
        mark = " *" if entry.layer == result.best_layer else ""
        table.add_row(f"{entry.layer}{mark}", f"{entry.auroc:.3f}", "-" if held is None else f"{held:.3f}",
                      "-" if gain is None else f"{gain:+.3f}", f"{entry.coef:.3g}")
    console.print(table)
    curve = Table("fraction", "coef", "trait (95% CI)", "relevance (95% CI)", "fluency loss", "distinct-2",
                  "looping", "kept", *(("judged trait", "judged relevance") if result.judge != "none" else ()),
                  title=f"steering curve at layer {result.best_layer} (prompted: trait 1, relevance "
                        f"{_estimate(result.prompted.relevance)})")
    for p in result.curve:
        judged = () if result.judge == "none" else (
            (_number(p.judgement.trait, ".0f"), _number(p.judgement.relevance, ".0f")) if p.judgement else ("-", "-"))
        curve.add_row(f"{p.fraction:g}", f"{p.coef:.3g}", *_quality_cells(p.quality), "yes" if p.kept else "no",
                      *judged)
    console.print(curve)
    for p in result.curve:
        if p.failures:
            console.print(f"  {p.fraction:g} broke: {'; '.join(p.failures)}", highlight=False)
    if result.prompted_judgement is not None:
        j = result.prompted_judgement
        console.print(f"prompted answers, judged: trait {_number(j.trait, '.0f')}, coherence "
                      f"{_number(j.coherence, '.0f')}, relevance {_number(j.relevance, '.0f')}")
    c = result.comparison
    side = Table("answers", "trait (95% CI)", "relevance (95% CI)", "fluency loss", "distinct-2", "looping",
                 title=f"steering beside prompting on {len(c.questions)} other held-out questions")
    for name, quality in (("plain", c.plain), ("steered", c.steered), ("prompted", c.prompted)):
        side.add_row(name, *_quality_cells(quality))
    console.print(side)
    v = result.validation
    interval = "" if v.auroc_low is None else f", 95% CI {v.auroc_low:.3f}-{v.auroc_high:.3f}"
    console.print(f"best layer [bold]{result.best_layer}[/] (chosen on {v.select_rows} rows), held-out AUROC "
                  f"[bold]{_number(v.auroc)}[/] on {v.report_rows} other rows{interval}")
    console.print(f"best coef [bold]{result.best_coef:.4g}[/] ({result.best_fraction:g} of the residual norm, "
                  f"chosen by {result.coef_source})")
    agreement = result.choice.agreement
    if agreement is not None:
        same = "the same" if agreement.same_choice else "they differ"
        console.print(f"judge-free choice {_number(result.choice.balance_fraction, 'g')}, judged choice "
                      f"{_number(result.choice.judge_fraction, 'g')} ({same}); Spearman over {agreement.answers} "
                      f"answers: trait {_number(agreement.trait_spearman)}, relevance "
                      f"{_number(agreement.relevance_spearman)}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if report is not None:
        console.print(f"report: {report}")


def _number(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _estimate(estimate: Estimate) -> str:
    if estimate.value is None:
        return "-"
    return f"{estimate.value:.2f}" + ("" if estimate.low is None else f" ({estimate.low:.2f}..{estimate.high:.2f})")


def _quality_cells(quality: Quality) -> tuple[str, ...]:
    return (_estimate(quality.trait), _estimate(quality.relevance), _number(quality.fluency_loss, "+.2f"),
            f"{quality.distinct_2:.2f}", str(quality.loop_answers))
