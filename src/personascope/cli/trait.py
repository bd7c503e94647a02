"""`personascope trait ...`: list, show and validate trait specs."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from personascope.cli import app, console
from personascope.traits import (
    TraitSpec,
    builtin_trait_names,
    load_trait,
    validate_trait_file,
)

trait_app = typer.Typer(help="Trait specs: the built-in library and your own trait files.", no_args_is_help=True)

Lenient = Annotated[bool, typer.Option("--lenient", help="Accept other counts than 5 pairs and 20 + 20 questions.")]


@trait_app.command("list")
def list_traits() -> None:
    """List the built-in traits."""
    table = Table("name", "description", "pairs", "questions")
    for name in builtin_trait_names():
        spec = load_trait(name)
        table.add_row(name, spec.description, str(len(spec.instruction)), _counts(spec))
    console.print(table)


@trait_app.command("show")
def show(
    name_or_file: Annotated[str, typer.Argument(help="A built-in trait name or the path of a trait .json file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the spec as JSON.")] = False,
    lenient: Lenient = False,
) -> None:
    """Print a trait spec."""
    spec = load_trait(name_or_file, strict=not lenient)
    if as_json:
        typer.echo(json.dumps(spec.to_dict(), indent=2, ensure_ascii=False))
        return
    out = partial(console.print, highlight=False, soft_wrap=True)
    out(f"[bold]{escape(spec.name)}[/]: {escape(spec.description)}")
    out(f"[dim]source: {escape(str(spec.source))}[/]")
    for i, pair in enumerate(spec.instruction, 1):
        out(f"\n[bold]pair {i}[/]\n  [green]pos:[/] {escape(pair.pos)}\n  [red]neg:[/] {escape(pair.neg)}")
    for title, questions in (("extraction", spec.extract_questions), ("evaluation", spec.eval_questions)):
        out(f"\n[bold]{title} questions[/] ({len(questions)})")
        for i, q in enumerate(questions, 1):
            out(f"  {i:2d}. {escape(q)}")
    out("\n[bold]judge rubric[/]")
    out(spec.eval_prompt, markup=False)


@trait_app.command("validate")
def validate(
    file: Annotated[
        Path, typer.Argument(help="A trait .json file (ours, or the reference's combined or split layout).")
    ],
    lenient: Lenient = False,
) -> None:
    """Check a trait file; print 'ok' or the first problem (exit code 1)."""
    spec = validate_trait_file(file, strict=not lenient)
    console.print(
        f"ok: {spec.name} ({len(spec.instruction)} pairs, {_counts(spec)} questions)", highlight=False, markup=False
    )


def _counts(spec: TraitSpec) -> str:
    return f"{len(spec.extract_questions)}+{len(spec.eval_questions)}"


app.add_typer(trait_app, name="trait")


@trait_app.command("new")
def new(
    name: Annotated[str, typer.Argument(help="The new trait's name (letters, digits, '_', '-', '.').")],
    description: Annotated[str, typer.Option("--description", "-d", help="What the trait is, in plain language.")],
    llm: Annotated[str, typer.Option("--llm", help="openai:MODEL, anthropic:MODEL or hf:MODEL_OR_PATH.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: NAME.json).")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="Server URL (default: OPENAI_BASE_URL / ANTHROPIC_BASE_URL).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Ask an LLM to write a complete trait spec (validated, retried on malformed output) and save it."""
    from personascope.errors import PersonascopeError
    from personascope.traits import save_trait
    from personascope.traits.author import author_trait

    path = out or Path(f"{name}.json")
    if path.exists() and not force:
        raise PersonascopeError(f"{path} already exists; choose another --out, or pass --force to replace it")
    spec = author_trait(name, description, llm, base_url=base_url)
    save_trait(spec, path, overwrite=force)
    console.print(f"wrote {path}: {spec.name} ({len(spec.instruction)} pairs, {_counts(spec)} questions)",
                  highlight=False, markup=False, soft_wrap=True)
