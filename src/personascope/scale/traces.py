"""Generation traces after the fact: the per-token projections of finished responses, read in one teacher-forced
forward pass per batch instead of hooks inside decoding (which an external engine such as vLLM does not run).

For a response of `n` tokens after a prompt of `p`, step `t` is read at position `p - 1 + t`: the position whose
output picked token `t`, as `GenerationTrace` reads it while decoding (the same hidden states, computed without
a KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from personascope.batching import left_pad, plan_batches
from personascope.generate import GenerationResult
from personascope.hooks import HookManager, TokenContext, run_forward
from personascope.models import ModelHandle
from personascope.monitor import Probe


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
    blocks = [(layer, probe.weight[i].to(device)) for i, layer in enumerate(probe.read_layers)]
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
        total = torch.stack(read).sum(0).cpu()  # [b, width, K]
        width = ids.shape[1]
        for row, i in enumerate(wanted):
            start = width - len(rows[i]) + len(prompts[i]) - 1
            out[i] = total[row, start:start + len(results[i].token_ids)]
    return out


def _reader(read: list[Tensor], weight: Tensor) -> Callable[[Tensor, TokenContext], None]:
    """An operation that appends `hidden @ weight` (`[b, width, K]`) to `read`."""

    def op(hidden: Tensor, tokens: TokenContext) -> None:
        read.append(hidden.float() @ weight)

    return op
