"""Shared parts of the benchmark scripts: realistic chats, interleaved timing, machine facts, tables and JSON.

The scripts import this as `common` (Python puts the script's folder first on `sys.path`).
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from personascope.inference.activations import EncodedChat
from personascope.io.rundir import write_json
from personascope.model import ModelHandle
from personascope.model.batching import left_pad
from personascope.traits import builtin_trait_names, load_trait

console = Console(width=None if sys.stdout.isatty() else 120)


def corpus_ids(handle: ModelHandle) -> list[int]:
    """Token ids of real English text: every built-in trait's description, instructions and questions."""
    parts = []
    for name in builtin_trait_names():
        spec = load_trait(name)
        parts.append(spec.description)
        parts += [text for pair in spec.instruction for text in (pair.pos, pair.neg)]
        parts += list(spec.extract_questions) + list(spec.eval_questions)
    return list(handle.tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"])


def response_lengths(rows: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """`rows` response lengths spread log-uniformly over `[shortest, longest]` tokens (chat answers vary a lot)."""
    rng = random.Random(seed)
    return [round(shortest * (longest / shortest) ** rng.random()) for _ in range(rows)]


def trait_messages(trait: str, rows: int, system: bool = True) -> list[list[dict[str, str]]]:
    """Chats as extraction builds them: the trait's questions, each under a positive or negative system prompt
    in turn (`system=False`: the question alone, as evaluation asks it)."""
    spec = load_trait(trait)
    questions = list(spec.extract_questions) + list(spec.eval_questions)
    chats = []
    for i in range(rows):
        pair = spec.instruction[i % len(spec.instruction)]
        chat = [{"role": "system", "content": pair.pos if i % 2 == 0 else pair.neg}] if system else []
        chats.append([*chat, {"role": "user", "content": questions[i % len(questions)]}])
    return chats


def trait_chats(
    handle: ModelHandle, rows: int, trait: str = "evil", shortest: int = 16, longest: int = 384, seed: int = 0
) -> list[EncodedChat]:
    """`rows` chats of a built-in trait with responses of varied length cut from real text (ids concatenated)."""
    text = corpus_ids(handle)
    rng = random.Random(seed)
    chats = []
    for i, (messages, length) in enumerate(
        zip(trait_messages(trait, rows), response_lengths(rows, shortest, longest, seed))
    ):
        start = rng.randrange(0, max(1, len(text) - length))
        prompt = handle.chat_ids(messages)
        chats.append(EncodedChat(f"{trait}/{i}", prompt + text[start : start + length], len(prompt)))
    return chats


def left_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into `input_ids` and `attention_mask` on `device`."""
    ids, mask, _ = left_pad(prompts, pad)
    return ids.to(device), mask.to(device)


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads for torch's operators (None: torch's default, one per core).

    On a machine shared with other jobs, one thread per process keeps small batch-1 operators from waiting on
    a descheduled partner thread, which would inflate every batched/unbatched ratio.
    """
    if threads:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock reads the real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    cases: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each case `repeats` times, alternating their order (ABBA…), so drift in machine load hits all alike.

    Returns the seconds of every run per case, and each case's last result.
    """
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            results[name] = cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, results


def rate(amount: float, seconds: Sequence[float]) -> float:
    """`amount` per second in the fastest of the runs: on a shared machine the least disturbed one (every run's
    seconds are kept in the figures too)."""
    return amount / min(seconds)


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """Where and when this ran: date, host, processor, threads, load, library versions, accelerator."""
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def save(path: str | None, figures: dict[str, Any]) -> None:
    """Write `figures` as JSON to `path` (atomically), when one was given."""
    if path:
        write_json(Path(path), {**figures, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]})
        console.print(f"figures written to {path}")
