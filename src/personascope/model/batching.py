"""Batching for forward passes and generation: length-sorted batches under a token budget, left padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.io.checks import check_count

#: Messages of allocation failures on the CPU (torch raises a plain RuntimeError there).
_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "Cannot allocate memory")


def plan_batches(lengths: Sequence[int], max_new_tokens: int, token_budget: int, max_batch: int) -> list[list[int]]:
    """Group request indices into batches of similar length whose padded size stays within `token_budget`.

    Indices are sorted longest first (an out-of-memory error shows at once, not at the end). A budget or batch
    size below 1 (or a negative `max_new_tokens`) is an `InputError`: every batched reader and generator plans here.
    """
    check_count("token_budget", token_budget)
    check_count("max_batch", max_batch)
    check_count("max_new_tokens", max_new_tokens, 0)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = (lengths[current[0]] if current else lengths[index]) + max_new_tokens
        if current and (len(current) >= max_batch or (len(current) + 1) * width > token_budget):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad token rows: `input_ids`, `attention_mask` and per-row `position_ids` (0 at each first real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def memory_hint(rows: int, tokens: int) -> Iterator[None]:
    """Running out of memory on a batch of `rows` × `tokens` becomes one `PersonascopeError` naming the knobs to
    lower (batch size and token budget are not part of a run's identity, so a lowered rerun resumes)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and not any(text in str(exc) for text in _CPU_OOM):
            raise
        raise PersonascopeError(
            f"out of memory on a batch of {rows} rows x {tokens} padded tokens: lower --batch-size (or "
            "--token-budget where the command has it) and run again; a run directory resumes where it stopped"
        ) from None
