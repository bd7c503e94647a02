"""`personascope monitor`, `shift` and `screen`: persona vectors as measuring instruments."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from personascope.cli import app, console
from personascope.cli.options import (
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    Placement,
    VectorModelOption,
    model_for_vector,
    parse_device_map,
    reads_own_base,
)
from personascope.errors import PersonascopeError
from personascope.io.files import check_output

if TYPE_CHECKING:
    from torch import Tensor

    from personascope.apply.monitor import Probe
    from personascope.apply.screen import ScreenReport
    from personascope.inference.generate import SamplingConfig
    from personascope.model import ModelHandle
    from personascope.vector import PersonaVector

Anchor = Optional[tuple[float, float]]
VectorsOption = Annotated[list[Path], typer.Option("--vector", "-v", help="Persona vector file; repeat for several.")]
BatchOption = Annotated[int, typer.Option(help="Most rows per forward batch.")]
SPARKS = "▁▂▃▄▅▆▇█"


@app.command()
def monitor(
    vector: VectorsOption,
    prompts: Annotated[Optional[Path], typer.Argument(
        metavar="PROMPTS",
        help="JSONL/CSV/Parquet rows with 'messages' or 'prompt' (+ 'system'), or a text file, one prompt a line.",
    )] = None,
    out: Annotated[Optional[Path], typer.Option(help="Scores to write (.jsonl or .parquet); needed with PROMPTS.")]
    = None,
    layer: Annotated[Optional[int], typer.Option(help="Layer for every vector (default: each vector's best).")]
    = None,
    model: VectorModelOption = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also answer each prompt and trace every token.")]
    = False,
    chat: Annotated[Optional[str], typer.Option(help="One user message: stream the answer with a live trait meter.")]
    = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt for --chat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (--generate, --chat).")] = 100,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    batch_size: BatchOption = 32,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    engine: EngineOption = "hf",
) -> None:
    """Project prompts, and the answers they get, on persona vectors.

    PROMPTS --out SCORES: each input row plus `projection` (or `projection_<trait>` for several vectors).

    That is the last prompt token's projection on the unit vector: how strongly the coming answer will show the trait.

    --generate: the model also answers; rows get `response` and `trace[_<trait>]` (one value per answer token).

    --chat "..." [--system "..."]: stream one answer with a live trait meter (no file needed).
    """
    from personascope.apply.monitor import monitor_rows, read_prompts
    from personascope.inference.engines import check_engine
    from personascope.inference.generate import SamplingConfig
    from personascope.io.data import write_rows

    if (prompts is None) == (chat is None):
        raise PersonascopeError("give either a PROMPTS file (with --out) or --chat, not both")
    if chat is None and system is not None:
        raise PersonascopeError("--system goes with --chat; in a PROMPTS file use a 'system' column or 'messages'")
    sampling = SamplingConfig(max_new_tokens, temperature, seed=seed)
    placement = Placement(device, dtype, device_map)
    model_name = model_for_vector(model, vector[0] if vector else None)
    check_engine(engine)
    if engine != "hf" and not generate:
        raise PersonascopeError("--engine chooses who answers with --generate; --chat streams with hf")
    if chat is not None:
        handle, probe, anchors = _probe(placement.load(model_name), vector, layer)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat}]
        _watch(handle, messages, probe, anchors, sampling)
        return
    if prompts is None or out is None:
        raise PersonascopeError("monitoring a PROMPTS file needs --out SCORES (.jsonl or .parquet)")
    check_output(out, [prompts])
    rows, chats = read_prompts(prompts)
    handle, probe, anchors = _probe(placement.load(model_name), vector, layer)
    scored = monitor_rows(handle, rows, chats, probe, sampling=sampling if generate else None, max_batch=batch_size,
                          engine=engine)
    write_rows(scored, out, inputs=[prompts])
    _print_projections(probe, scored, anchors, generate)
    console.print(f"wrote {len(scored)} rows to {out}")


def _probe(handle: ModelHandle, paths: Sequence[Path], layer: int | None) -> tuple[ModelHandle, Probe, list[Anchor]]:
    """Load the vectors for the model, stacked into a probe, with each vector's meter anchors."""
    from personascope.apply.monitor import Probe
    from personascope.vector import PersonaVector

    vectors = [PersonaVector.load(path, handle) for path in paths]
    probe = Probe.build(handle, vectors, layer)
    return handle, probe, [_anchors(v, l) for v, l in zip(vectors, probe.layers)]


def _watch(handle: ModelHandle, messages: list[dict[str, str]], probe: Probe, anchors: list[Anchor],
           sampling: SamplingConfig) -> None:
    """Stream one answer under a live meter; the final meter covers every token."""
    from personascope.apply.monitor import watch_chat

    pieces: list[str] = []
    seen: list[list[float]] = []

    def show(text: str, latest: Tensor | None) -> None:
        pieces.append(text)
        if latest is not None:
            seen.append(latest.tolist())
        live.update(Group(Text("".join(pieces)), _meter(probe.names, seen, anchors)))

    with Live(console=console, refresh_per_second=8) as live:
        answer, trace = watch_chat(handle, messages, probe, show, max_new_tokens=sampling.max_new_tokens,
                                   temperature=sampling.temperature, seed=sampling.seed)
        live.update(Group(Text(answer), _meter(probe.names, trace.tolist(), anchors)))


def _anchors(vector: PersonaVector, layer: int) -> Anchor:
    """The projections of the vector's neg and pos class means at `layer`, when the file holds them."""
    if vector.neg_mean is None or vector.pos_mean is None:
        return None
    unit = vector.unit(layer)
    return float(vector.neg_mean[layer] @ unit), float(vector.pos_mean[layer] @ unit)


def _spark(values: Sequence[float], anchor: Anchor) -> str:
    """Values as block characters, from `anchor`'s low to high (default: the values' own range)."""
    if not values:
        return ""
    low, high = anchor if anchor is not None else (min(values), max(values))
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, int((v - low) / span * len(SPARKS))))] for v in values)


def _meter(names: Sequence[str], steps: Sequence[Sequence[float]], anchors: Sequence[Anchor], width: int = 48) -> Table:
    """One line per vector: the latest `width` steps as a sparkline, then the newest value and the mean."""
    table = Table.grid(padding=(0, 1))
    for k, name in enumerate(names):
        values = [step[k] for step in steps]
        if not values:
            table.add_row(f"[bold]{escape(name)}[/]", "[dim]waiting…[/]")
            continue
        table.add_row(f"[bold]{escape(name)}[/]", f"[magenta]{_spark(values[-width:], anchors[k])}[/]",
                      f"now {values[-1]:+.2f}", f"mean {sum(values) / len(values):+.2f}")
    return table


def _print_projections(probe: Probe, rows: list[dict[str, Any]], anchors: list[Anchor], traced: bool,
                       shown: int = 20) -> None:
    """A table of the first `shown` rows: each vector's prompt projection and, when traced, its answer's
    sparkline and mean."""
    headers = [h for name in probe.names for h in [f"{name} (prompt)", *(["answer", "mean"] if traced else [])]]
    table = Table("row", *headers)
    for i, row in enumerate(rows[:shown]):
        cells = []
        for k, column in enumerate(probe.columns()):
            cells.append(f"{row[column]:+.3f}")
            if traced:
                values = row[probe.columns("trace")[k]]
                mean = f"{sum(values) / len(values):+.3f}" if values else ""
                cells += [f"[magenta]{_spark(values[-24:], anchors[k])}[/]", mean]
        table.add_row(escape(str(row.get("id", i))), *cells)
    console.print(table)
    if len(rows) > shown:
        console.print(f"[dim]… {len(rows) - shown} more rows in the output[/]")


@app.command()
def shift(
    finetuned: Annotated[str, typer.Option(
        help="The fine-tuned model, or a PEFT adapter dir (applied to its base in memory, never merged to disk)."
    )],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="Persona vector file made for the base model.")],
    base: Annotated[Optional[str], typer.Option(
        help="The base model: embedded name, HF id or local dir (default: an adapter's own base, read with the "
        "adapter disabled, or else the vector's model)."
    )] = None,
    questions: Annotated[Optional[str], typer.Option(
        help="A built-in trait or trait .json file (its eval questions), or a prompt file (JSONL/CSV/text); "
        "default: the vector's trait."
    )] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the report as JSON here.")] = None,
    batch_size: BatchOption = 64,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """How far fine-tuning moved a model along a persona vector, before it answers anything.

    Per layer: (fine-tuned − base mean last-prompt-token activation over the questions) · unit vector.

    Positive means toward the trait; `relative` divides by the vector's norm there (its pos−neg gap).
    """
    from personascope.apply.shift import projection_shift
    from personascope.io.files import write_json
    from personascope.vector import PersonaVector

    if out is not None:
        check_output(out, [vector], suffixes=None, what="--out")
    placement = Placement(device, dtype, device_map)
    tuned = placement.load(finetuned)
    base_handle = None if reads_own_base(tuned, finetuned, base) else placement.load(model_for_vector(base, vector))
    vec = PersonaVector.load(vector, base_handle or tuned)
    chats = _questions(questions, vec.trait)
    report = projection_shift(base_handle, tuned, vec, chats, max_batch=batch_size)
    table = Table("layer", "shift", "relative", "base proj", "fine-tuned proj", title=f"{vec.trait} shift")
    for row in report.layers:
        style = "bold" if row.layer == report.best_layer else None
        table.add_row(str(row.layer), f"{row.shift:+.4f}", f"{row.relative_shift:+.1%}",
                      f"{row.base_projection:+.3f}", f"{row.finetuned_projection:+.3f}", style=style)
    console.print(table)
    if report.shift is not None:
        console.print(f"shift at layer {report.best_layer}: [bold]{report.shift:+.4f}[/] "
                      f"({report.relative_shift:+.1%} of the pos−neg gap) over {report.n_questions} questions")
    if out is not None:
        write_json(out, report)
        console.print(f"wrote {out}")


def _questions(arg: str | None, trait: str) -> list[str] | list[list[dict[str, str]]]:
    """The trait's evaluation questions (built-in name or trait .json), or the chats of a prompt file."""
    from personascope.apply.monitor import read_prompts
    from personascope.traits import builtin_trait_names, load_trait

    name = arg or trait
    if name in builtin_trait_names() or (name.endswith(".json") and Path(name).is_file()):
        return list(load_trait(name).eval_questions)
    if arg is not None and Path(arg).exists():
        return read_prompts(arg)[1]
    raise PersonascopeError(
        f"no built-in trait or file {name!r} for the questions: pass --questions with a built-in trait "
        f"({', '.join(builtin_trait_names())}), a trait .json file or a prompt file"
    )


@app.command()
def screen(
    data: Annotated[Path, typer.Argument(
        metavar="DATA", help="JSONL/CSV/Parquet file or saved dataset dir ('messages', or 'prompt'/'response' columns)."
    )],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="Persona vector file.")],
    out: Annotated[Path, typer.Option(help="Scored rows (.jsonl or .parquet); summary, histogram and skipped "
                                      "list are written next to it.")],
    layer: Annotated[Optional[int], typer.Option(help="Layer to read (default: the vector's best).")] = None,
    model: VectorModelOption = None,
    base: Annotated[str, typer.Option(
        help="The base reading: 'generate' (the model answers each prompt; cached in <out>.work/, resumable), "
        "'prompt-last' (the last prompt token's projection, no generation), or a file of base responses with "
        "'id' and 'response'."
    )] = "generate",
    top: Annotated[Optional[float], typer.Option(
        "--drop-top", "--top", help="Filter out this percentage of rows with the highest ΔP.")] = None,
    keep_below: Annotated[Optional[float], typer.Option(help="Filter out the rows with ΔP at or above this.")]
    = None,
    write_filtered: Annotated[Optional[Path], typer.Option(
        help="Where the filtered dataset goes, in DATA's format (default: <out stem>.filtered<DATA suffix>); "
        "its report of dropped rows goes beside it (.report.json, .report.md).")] = None,
    on_long: Annotated[str, typer.Option(help="Rows over the context length: skip, truncate or error.")] = "skip",
    max_new_tokens: Annotated[int, typer.Option(help="Length of generated base responses.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of base responses (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    batch_size: BatchOption = 32,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    engine: EngineOption = "hf",
    ray: Annotated[Optional[str], typer.Option(
        "--ray", help="Screen with Ray Data: 'local' (start Ray here), 'auto' (the running cluster) or its address."
    )] = None,
    workers: Annotated[int, typer.Option(help="Ray scoring actors, one model each (with --ray).")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per Ray actor (with --ray).")] = 0.0,
    shard_rows: Annotated[int, typer.Option(help="Rows per output shard, the unit a killed --ray run resumes by.")]
    = 1000,
) -> None:
    """Screen training data for samples that would push the model toward a trait.

    Per row: `projection` of the training answer (mean over its tokens), `base_projection` of the model's own answer.

    `delta_p` = projection − base_projection. --base prompt-last: base = the prompt's last token (no generation).

    Rows without an answer, with an empty one or over the context are listed in <out>.skipped.jsonl.

    --drop-top P / --keep-below X: also write DATA without those rows (and the unscored ones), same format,
    kept rows unchanged.

    --ray local|auto|ADDRESS --workers N [--gpus-per-worker G]: stream DATA (JSONL/Parquet) through N workers.
    """
    from personascope.apply.screen import screen_dataset
    from personascope.inference.engines import check_engine
    from personascope.inference.generate import SamplingConfig
    from personascope.vector import PersonaVector

    if base not in ("generate", "prompt-last") and not Path(base).is_file():
        raise PersonascopeError(f"--base {base!r}: use generate, prompt-last or an existing file of base responses")
    if on_long not in ("skip", "truncate", "error"):
        raise PersonascopeError(f"unknown --on-long {on_long!r}: use skip, truncate or error")
    check_output(out, [data, *([Path(base)] if Path(base).is_file() else [])])
    check_engine(engine)
    sampling = SamplingConfig(max_new_tokens, temperature, seed=seed)
    model_name = model_for_vector(model, vector)
    if ray is not None:
        from personascope.scale.ray_screen import RaySettings, ray_screen

        report = ray_screen(data, vector, out, model=model_name, layer=layer, base=base, sampling=sampling,
                            engine=engine, on_long=on_long, top_percent=top, filtered_out=write_filtered,
                            keep_below=keep_below,
                            max_batch=batch_size, settings=RaySettings(ray, workers, gpus_per_worker,
                                                                       shard_rows=shard_rows),
                            load={"device": device, "dtype": dtype, "device_map": parse_device_map(device_map)})
        _print_screen(report)
        return
    handle = Placement(device, dtype, device_map).load(model_name)
    vec = PersonaVector.load(vector, handle)
    report = screen_dataset(
        handle, data, vec, out, layer=layer, base=base, sampling=sampling, on_long=on_long, top_percent=top,
        filtered_out=write_filtered, keep_below=keep_below, max_batch=batch_size, engine=engine,
    )
    _print_screen(report)


def _print_screen(report: ScreenReport) -> None:
    from personascope.apply.screen_filter import report_paths

    summary = report.summary
    delta = summary.delta_p
    pct = delta.percentiles
    console.print(
        f"[bold]{summary.trait}[/] at layer {summary.layer}: {summary.n_scored} of {summary.n_rows} rows "
        f"scored, {summary.n_skipped} skipped, {summary.n_truncated} truncated\n"
        f"ΔP mean {delta.mean:+.3f} (sd {delta.std:.3f}); p5 {pct['5']:+.3f} · p50 {pct['50']:+.3f} · "
        f"p95 {pct['95']:+.3f} · max {delta.max:+.3f}"
    )
    table = Table("id", "ΔP", "projection", "base", "response", title="highest ΔP")
    for row in summary.top:
        table.add_row(escape(row.id), f"{row.delta_p:+.3f}", f"{row.projection:+.3f}",
                      f"{row.base_projection:+.3f}", escape(row.response[:80].replace("\n", " ")))
    console.print(table)
    if summary.filter is not None:
        f = summary.filter
        cut = f" with ΔP ≥ {f.cutoff:+.3f}" if f.cutoff is not None else ""
        console.print(f"filtered out {f.n_removed} rows{cut} and {f.n_dropped - f.n_removed} unscored rows; "
                      f"wrote {f.n_kept} rows to {f.path} (why each was dropped: {report_paths(Path(f.path))[1]})")
    for label, path in (("scored rows", report.scored), ("summary", report.summary_path),
                        ("histogram", report.histogram), ("skipped/truncated", report.skipped)):
        console.print(f"{label}: {path}")
