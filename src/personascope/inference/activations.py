"""Pooled activations of many chats: batched, length-sorted forward passes that stop after the deepest layer needed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.hooks import capture, check_pools, run_forward
from personascope.io.data import BadRow
from personascope.io.progress import progress_bar
from personascope.model import ModelHandle
from personascope.model.batching import left_pad, memory_hint, plan_batches


@dataclass(frozen=True)
class EncodedChat:
    """A chat as token ids: `ids[:prompt_len]` is the prompt (with assistant header), the rest the response."""

    id: str
    ids: list[int]
    prompt_len: int


def encode(handle: ModelHandle, row_id: str, messages: list[dict[str, str]], response: str | None) -> EncodedChat:
    """Encode a chat prompt and its response by concatenating ids."""
    chat = handle.encode_chat(messages, response)
    return EncodedChat(row_id, chat.ids, chat.prompt_len)


def check_lengths(handle: ModelHandle, chats: Sequence[EncodedChat]) -> None:
    """Raise for a chat longer than the model's context, naming it."""
    limit = handle.max_length
    for chat in chats:
        if limit and len(chat.ids) > limit:
            raise PersonascopeError(
                f"row {chat.id} has {len(chat.ids)} tokens, more than the model's context length {limit}; "
                "truncate or drop it"
            )
        if not chat.ids:
            raise PersonascopeError(f"row {chat.id} has no tokens")


def fit_to_context(
    handle: ModelHandle, chats: Sequence[EncodedChat], policy: str = "error"
) -> tuple[list[EncodedChat], list[BadRow]]:
    """Handle chats longer than the model's context: `error` raises, `skip` leaves them out, `truncate` cuts
    the response to fit (a prompt that alone is too long is left out). Left-out rows come back as `BadRow`s."""
    if policy not in ("error", "skip", "truncate"):
        raise PersonascopeError(f"unknown length policy {policy!r}: use error, skip or truncate")
    limit = handle.max_length
    kept: list[EncodedChat] = []
    bad: list[BadRow] = []
    for chat in chats:
        if not limit or len(chat.ids) <= limit:
            kept.append(chat)
        elif policy == "error":
            check_lengths(handle, [chat])
        elif policy == "truncate" and chat.prompt_len < limit:
            kept.append(EncodedChat(chat.id, chat.ids[:limit], chat.prompt_len))
        else:
            bad.append(BadRow(chat.id, f"{len(chat.ids)} tokens, over the context length {limit}"))
    return kept, bad


#: Padded tokens per batch on a CPU, whatever the caller asked for. A CPU forward pass is compute-bound from a
#: few hundred tokens on, so bigger batches only add padding and cache misses (2 cores, 64 chats of 72-415
#: tokens read at layer 20 of the embedded model: 13.3 s with 1024, 13.8 s with 2048, 21.2 s with 8192).
CPU_TOKEN_BUDGET = 1024


def iter_activations(
    handle: ModelHandle,
    chats: Sequence[EncodedChat],
    layers: Sequence[int],
    pools: Sequence[str] = ("response_avg",),
    *,
    token_budget: int = 8192,
    max_batch: int = 64,
    progress: bool = True,
    description: str = "Reading activations",
) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """Yield `(indices into chats, {pool: float32 [b, len(layers), d] on CPU})` batch by batch.

    `token_budget` bounds the padded tokens of a batch (at most `CPU_TOKEN_BUDGET` on a CPU).
    """
    check_pools(pools)
    check_lengths(handle, chats)
    if handle.device.type == "cpu":
        token_budget = min(token_budget, CPU_TOKEN_BUDGET)
    batches = plan_batches([len(c.ids) for c in chats], 0, token_budget, max_batch)
    device, pad = handle.device, handle.tokenizer.pad_token_id
    with progress_bar(len(chats), description, enabled=progress) as bar:
        for batch in batches:
            rows = [chats[i] for i in batch]
            ids, mask, positions = left_pad([r.ids for r in rows], pad)
            lengths = [r.prompt_len for r in rows]
            with memory_hint(*ids.shape), capture(handle, list(layers), list(pools), prompt_lengths=lengths,
                                                  stop_after=True) as cap:
                run_forward(handle, input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device))
            yield batch, {pool: cap.mean(pool).cpu() for pool in pools}
            bar.advance(0, len(batch))


def read_activations(
    handle: ModelHandle,
    chats: Sequence[EncodedChat],
    layers: Sequence[int],
    pools: Sequence[str] = ("response_avg",),
    **kwargs: object,
) -> dict[str, Tensor]:
    """Pooled activations of every chat: `{pool: float32 [len(chats), len(layers), d]}` in input order."""
    out: dict[str, Tensor] = {}
    for batch, pooled in iter_activations(handle, chats, layers, pools, **kwargs):  # type: ignore[arg-type]
        for pool, values in pooled.items():
            if pool not in out:
                out[pool] = torch.zeros(len(chats), *values.shape[1:])
            out[pool][batch] = values
    return out
