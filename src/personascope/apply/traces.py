"""Generation traces after the fact: the per-token projections of finished responses (e.g. from vLLM), read in
one teacher-forced forward pass per batch instead of hooks inside decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from personascope.hooks import HookManager, TokenContext, on_device, run_forward
from personascope.inference.generate import GenerationResult
from personascope.model import ModelHandle
from personascope.model.batching import left_pad, plan_batches

if TYPE_CHECKING:  # monitor imports this module when vLLM answers
    from personascope.apply.monitor import Probe


def replay_traces(
    handle: ModelHandle,
    probe: Probe,
    prompts: Sequence[list[int]],
    results: Sequence[GenerationResult],
    *,
    token_budget: int = 4096,
    max_batch: int = 32,
) -> list[Tensor]:
    """`[len(result.token_ids), K]` float32 projections for each (prompt ids, result) pair, in input order."""
    rows = [list(p) + list(r.token_ids) for p, r in zip(prompts, results)]
    out: list[Tensor] = [torch.zeros(len(r.token_ids), len(probe.names)) for r in results]
    manager = HookManager.of(handle)
    device = handle.device
    blocks = [(layer, probe.weight[i]) for i, layer in enumerate(probe.read_layers)]
    for batch in plan_batches([len(r) for r in rows], 0, token_budget, max_batch):
        wanted = [i for i in batch if results[i].token_ids]
        if not wanted:
            continue
        ids, mask, positions = left_pad([rows[i] for i in wanted], handle.tokenizer.pad_token_id)
        read: list[Tensor] = []
        keys = [manager.add(layer, _reader(read, weight), site="read") for layer, weight in blocks]
        try:
            run_forward(handle, input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device))
        finally:
            for key in keys:
                manager.remove(key)
        total = torch.stack(read).sum(0)  # [b, width, K]
        width = ids.shape[1]
        for row, i in enumerate(wanted):
            start = width - len(rows[i]) + len(prompts[i]) - 1
            out[i] = total[row, start:start + len(results[i].token_ids)]
    return out


def _reader(read: list[Tensor], weight: Tensor) -> Callable[[Tensor, TokenContext], None]:
    """An operation that appends `hidden @ weight` (`[b, width, K]`, on the CPU) to `read`."""
    weights: dict[torch.device, Tensor] = {}  # on each layer's own device (a model split over several)

    def op(hidden: Tensor, tokens: TokenContext) -> None:
        read.append((hidden.float() @ on_device(weight, hidden, weights)).cpu())

    return op
