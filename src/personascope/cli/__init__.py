"""The `personascope` command line: thin Typer commands over the Python API."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from personascope.errors import PersonascopeError

app = typer.Typer(
    name="personascope",
    help="Persona vectors: extract, steer, monitor, screen and guard character traits in language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `app`."""
    import importlib

    for name in ("core", "trait", "finetune", "extract", "monitor", "evaluate", "serve", "gate"):
        importlib.import_module(f"personascope.cli.{name}")


def main() -> None:
    """Console-script entry point: exit 2 for a bad value (`InputError`), 1 for any other `PersonascopeError`."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries our results, not vLLM's logs
    from personascope.cli.options import checked

    _register_commands()
    try:
        checked(typer.main.get_command(app))()
    except PersonascopeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a file the system refused outside the writers that name their file themselves
        err_console.print(f"[bold red]error:[/] {exc}; what was finished before is kept: fix this, then rerun to "
                          "resume", highlight=False, soft_wrap=True)
        sys.exit(1)
