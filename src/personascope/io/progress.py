"""Progress display for long stages: rich bars and spinners on stderr, silent when disabled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` while the block runs."""
    with _console.status(message):
        yield


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Progress]:
    """A progress bar for `total` units; yields the bar, advance it with `bar.advance(task_id, n)`.

    The single task's id is always 0. When `enabled` is False nothing is drawn.
    """
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        disable=not enabled,
        transient=False,
    )
    with bar:
        bar.add_task(description, total=total)
        yield bar
