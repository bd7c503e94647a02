"""`personascope extract`: from a trait to a validated persona vector in a run directory."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from personascope.cli import app, console
from personascope.cli.options import DeviceMapOption, DeviceOption, DtypeOption, Placement
from personascope.extract.pipeline import ExtractConfig

if TYPE_CHECKING:
    from personascope.evaluate.result import Evaluation

_D = {f.name: f.default for f in fields(ExtractConfig)}


def _opt(text: str, *names: str) -> Any:
    return typer.Option(*names, help=text)


@app.command()
def extract(
    trait: Annotated[str, typer.Argument(help="A built-in trait (`personascope trait list`) or a trait file.")],
    out: Annotated[Path, _opt("Run directory (created; a rerun resumes it).", "--out", "-o")],
    model: Annotated[str, _opt("Embedded name, HF id or local model dir.", "--model", "-m")] = _D["model"],
    judge: Annotated[str, _opt("openai:MODEL, anthropic:MODEL, hf:MODEL, or none (keep all pairs).")] = _D["judge"],
    judge_base_url: Annotated[Optional[str], _opt("Judge server URL (else OPENAI_/ANTHROPIC_BASE_URL).")] = None,
    samples: Annotated[int, _opt("Responses per (pair, extraction question, polarity).")] = _D["samples"],
    max_new_tokens: Annotated[int, _opt("Length limit of each response.")] = _D["max_new_tokens"],
    temperature: Annotated[float, _opt("Sampling temperature (0 = greedy).")] = _D["temperature"],
    top_p: Annotated[float, _opt("Nucleus sampling.")] = _D["top_p"],
    seed: Annotated[int, _opt("Base random seed.")] = _D["seed"],
    method: Annotated[str, _opt("mean_diff, pca or probe.")] = _D["method"],
    threshold: Annotated[float, _opt("Judge filter: pos trait ≥ T, neg trait < T.")] = _D["threshold"],
    coherence_threshold: Annotated[float, _opt("Judge filter: both coherent ≥ this.")] = _D["coherence_threshold"],
    eval_pairs: Annotated[int, _opt("System-prompt pairs answering the evaluation questions.")] = _D["eval_pairs"],
    eval_samples: Annotated[int, _opt("Responses per (pair, evaluation question, polarity).")] = _D["eval_samples"],
    eval_layers: Annotated[Optional[str], _opt("Layers to evaluate, e.g. 8,10,12 or 6-14 (default: all).")] = None,
    token_budget: Annotated[int, _opt("Padded tokens per batch; lower it if memory runs out.")] = _D["token_budget"],
    batch_size: Annotated[int, _opt("Most rows per batch; lower it if memory runs out.")] = _D["max_batch"],
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    lenient: Annotated[bool, _opt("Accept other counts than 5 pairs and 20 + 20 questions.", "--lenient")] = False,
    engine: Annotated[str, _opt("What generates the contrastive responses: hf or vllm (make setup-vllm).")]
    = _D["engine"],
    quiet: Annotated[bool, _opt("No progress bars.", "--quiet", "-q")] = False,
) -> None:
    """Extract a persona vector: generate contrastive responses, (judge and filter them,) read activations,
    compute vectors, validate them on held-out questions and write a report. A rerun resumes."""
    from personascope.extract.pipeline import extract as run_extract
    from personascope.io.layers import parse_layers

    chosen = None if eval_layers is None else tuple(parse_layers(eval_layers, option="--eval-layers"))
    config = ExtractConfig(
        trait=trait, model=model, judge=judge, judge_base_url=judge_base_url, samples=samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, method=method,
        threshold=threshold, coherence_threshold=coherence_threshold, eval_pairs=eval_pairs,
        eval_samples=eval_samples, eval_layers=chosen, token_budget=token_budget, max_batch=batch_size,
        lenient=lenient, engine=engine,
    )
    config.check()
    handle = Placement(device, dtype, device_map).load(model)
    result = run_extract(config, out, handle=handle, progress=not quiet)
    counts, evaluation = result.summary, result.evaluation
    held = evaluation.validation
    dropped = [f"{counts[key]} {what}" for key, what in (("empty_pairs", "with an empty response"),
                                                         ("rejected_pairs", "rejected by the judge")) if counts[key]]
    if judge == "none":
        dropped.append("no judge: all kept")
    rows = [
        ("responses", f"{counts['responses']} ({counts['generated']} generated now)"),
        ("kept pairs", f"{counts['kept_pairs']} of {counts['pairs']}" + (f" ({'; '.join(dropped)})" * bool(dropped))),
        ("best layer", f"{evaluation.best_layer} (chosen on {held.select_rows} held-out rows)"),
        ("held-out AUROC", f"{_number(held.auroc)} on {held.report_rows} other rows"
         + (f" (95% CI {held.auroc_low:.3f}-{held.auroc_high:.3f})" if held.auroc_low is not None else "")),
        *([("judge", _judge_line(counts["judge_retries"], result.judge_failed))] if judge != "none" else []),
        ("margin gain", _number(result.best_layer_stats().margin_gain)),
        ("best coef", f"{evaluation.best_coef:.3f} ({evaluation.best_fraction:g} of the residual norm, "
                      f"chosen by {evaluation.coef_source})"),
        ("steered vs prompted", _versus(evaluation)),
        ("vector", str(result.vector)),
        ("report", str(result.report)),
    ]
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    for note in evaluation.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[dim]steer with: personascope generate \"...\" --model {model} --vector {result.vector}[/]")


def _versus(evaluation: Evaluation) -> str:
    """Steering at the chosen strength beside prompting, on held-out questions that chose nothing."""
    c = evaluation.comparison

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return (f"trait expression {number(c.steered.trait.value)} vs 1 (prompted); relevance "
            f"{number(c.steered.relevance.value)} vs {number(c.prompted.relevance.value)} (plain 1); "
            f"{c.steered.loop_answers} looping")


def _judge_line(retries: int, failed: dict[str, str]) -> str:
    """Retries absorbed, and the rows the judge never scored (named, with the first reason)."""
    line = f"{retries} retried requests absorbed; "
    if not failed:
        return line + "every row scored"
    names = ", ".join(list(failed)[:5]) + (f" and {len(failed) - 5} more" * (len(failed) > 5))
    return line + f"{len(failed)} rows not scored ({names}; {escape(next(iter(failed.values())))}): rerun to retry them"


def _number(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value) if value is not None else "-"
