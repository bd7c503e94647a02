"""`personascope gate`: fail a build when a candidate checkpoint drifted toward a trait (exit 1; bad input: 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from personascope.apply.gate import DEFAULT_MAX_SHIFT
from personascope.cli import app, console
from personascope.cli.options import DeviceMapOption, DeviceOption, DtypeOption, Placement, reads_own_base
from personascope.errors import PersonascopeError
from personascope.io.files import check_output

if TYPE_CHECKING:
    from personascope.apply.gate import GateReport


@app.command()
def gate(
    base: Annotated[str, typer.Argument(help="The base model: embedded name, HF id or local dir.")],
    candidate: Annotated[str, typer.Argument(
        help="The candidate: a model dir or HF id, or a PEFT (LoRA) adapter dir (applied in memory, never merged).")],
    vector: Annotated[list[Path], typer.Option(
        "--vector", "-v", help="Persona vector made for BASE; repeat for several traits. Its trait spec (probe "
        "questions, system prompts) is trait.json of its extraction run or the built-in trait.")],
    max_shift: Annotated[float, typer.Option(
        help="Fail when a trait's shift exceeds this many trait units (share of the base's plain → "
        "system-prompted gap).")] = DEFAULT_MAX_SHIFT,
    junit: Annotated[Optional[Path], typer.Option(help="Write JUnit XML here (one test case per trait).")] = None,
    markdown: Annotated[Optional[Path], typer.Option(
        help="Write a Markdown summary here, with its plot beside it (<name>.png).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Compare CANDIDATE with BASE along each persona vector: exit 0 when every trait stays within --max-shift,
    1 when any shifted past it, 2 on bad input.

    Probe: the trait's 20 held-out eval questions, asked with no system prompt. Per trait, at the vector's best
    layer: shift = candidate − base mean last-prompt-token projection; trait units = shift divided by the base's
    gap between those questions asked under the trait's own system prompts and asked plain.
    """
    try:
        report = _run(base, candidate, vector, max_shift, junit, markdown, Placement(device, dtype, device_map))
    except PersonascopeError as exc:
        exc.exit_code = 2
        raise
    _print(report)
    for label, path in (("JUnit XML", junit), ("Markdown summary", markdown)):
        if path is not None:
            console.print(f"{label}: {path}")
    if not report.passed:
        raise typer.Exit(1)


def _run(base: str, candidate: str, vectors: list[Path], max_shift: float, junit: Path | None,
         markdown: Path | None, placement: Placement) -> GateReport:
    """Check everything, load the models, run the gate and write the reports."""
    from personascope.apply.gate import GateProbe, run_gate, trait_for_vector
    from personascope.apply.gate_report import write_junit, write_markdown
    from personascope.vector import PersonaVector, vector_metadata

    if not math.isfinite(max_shift) or max_shift < 0:
        raise PersonascopeError(f"--max-shift must be a finite number of trait units ≥ 0, got {max_shift}")
    for path in vectors:
        if not path.is_file():
            raise PersonascopeError(f"vector file {path} does not exist")
    if junit is not None:
        check_output(junit, vectors, suffixes=(".xml",), what="--junit")
    if markdown is not None:
        check_output(markdown, vectors, suffixes=(".md",), what="--markdown")
        check_output(markdown.with_suffix(".png"), vectors, suffixes=None, what="--markdown plot")
    names = [vector_metadata(path).get("trait", "") for path in vectors]
    if len(set(names)) != len(names):
        raise PersonascopeError(f"two vectors share a trait name ({', '.join(names)}): give one per trait")
    specs = [trait_for_vector(path, name) for path, name in zip(vectors, names)]
    tuned = placement.load(candidate)
    base_handle = None if reads_own_base(tuned, candidate, base) else placement.load(base)
    probes = [GateProbe.from_spec(PersonaVector.load(path, base_handle or tuned), spec)
              for path, spec in zip(vectors, specs)]
    report = run_gate(base_handle, tuned, probes, max_shift)
    if junit is not None:
        write_junit(report, junit)
    if markdown is not None:
        write_markdown(report, markdown)
    return report


def _print(report: GateReport) -> None:
    table = Table("trait", "layer", "shift (trait units)", "projection shift", "system-prompt gap", "result",
                  title=f"persona gate: {report.candidate_model} vs {report.base_model}")
    for t in report.traits:
        table.add_row(t.trait, str(t.layer), f"{t.units:+.3f}", f"{t.shift:+.4f}", f"{t.gap:+.4f}",
                      "[green]pass[/]" if t.passed else "[bold red]FAIL[/]")
    console.print(table)
    if report.passed:
        console.print(f"gate passed: every trait within {report.max_shift:g} trait units")
    else:
        console.print(f"[bold red]gate failed[/]: {', '.join(t.trait for t in report.failed)} shifted past "
                      f"{report.max_shift:g} trait units")
