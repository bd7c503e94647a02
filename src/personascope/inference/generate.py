"""Chat generation: batched, length-sorted and reproducible for many prompts; streamed for one."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import TextStreamer

from personascope.errors import PersonascopeError
from personascope.io.checks import check_sampling
from personascope.io.progress import progress_bar
from personascope.model import ModelHandle
from personascope.model.batching import left_pad, memory_hint, plan_batches

DEFAULT_REPETITION_PENALTY = 1.2
"""Repetition penalty of `default_decoding` when the model's generation config sets none: enough to stop greedy
loops ("yer old yer old yer old") under strong steering without changing ordinary answers much."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode: `temperature == 0` is greedy; `repetition_penalty` > 1 discourages repeating tokens
    (1.0: none, always passed, so a model's generation config cannot add one silently)."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                       seed=self.seed, max_new_tokens=self.max_new_tokens)

    def generate_kwargs(self) -> dict[str, Any]:
        common = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **common}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, **common}


def default_decoding(handle: ModelHandle, *, max_new_tokens: int = 200, seed: int = 0) -> SamplingConfig:
    """The decoding `personascope generate` (and a server) use when the user asks for none.

    The model's generation config's sampling settings when it samples (`do_sample` with its `temperature` and
    `top_p`), greedy otherwise; its `repetition_penalty` when above 1, else `DEFAULT_REPETITION_PENALTY`. Pure
    greedy is `SamplingConfig(temperature=0)` (`generate --greedy`).
    """
    config = handle.model.generation_config
    sampling = bool(getattr(config, "do_sample", False)) and (getattr(config, "temperature", None) or 0) > 0
    penalty = getattr(config, "repetition_penalty", None) or 1.0
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=float(config.temperature) if sampling else 0.0,
        top_p=float(getattr(config, "top_p", None) or 1.0) if sampling else 1.0,
        seed=seed,
        repetition_penalty=float(penalty) if penalty > 1 else DEFAULT_REPETITION_PENALTY,
    )


@dataclass(frozen=True)
class GenerationResult:
    """One finished row: its request id, the decoded response and its token ids (no end-of-turn token).

    `trace` (with a `monitor`): `[len(token_ids), K]`, the monitor's readings that produced each token.
    """

    id: str
    text: str
    token_ids: list[int]
    trace: Tensor | None = None


class BatchMonitor(Protocol):
    """Watches each generation batch: `begin()` before it, `end()` after it, returning `[B, steps, K]`."""

    def begin(self) -> None: ...

    def end(self) -> Tensor: ...


def seed_for(base_seed: int, row_id: str) -> int:
    """The sampling seed that row `row_id` gets from `base_seed` (a hash: the same on every run and engine)."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def check_requests(handle: ModelHandle, requests: Sequence[tuple[str, list[int]]], sampling: SamplingConfig) -> None:
    """Raise for an empty prompt or one that leaves no room for `max_new_tokens` in the context, naming it."""
    limit = handle.max_length
    for row_id, ids in requests:
        if not ids:
            raise PersonascopeError(f"request {row_id} has an empty prompt")
        if limit and len(ids) + sampling.max_new_tokens > limit:
            raise PersonascopeError(
                f"request {row_id}: prompt of {len(ids)} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                f"model's context length {limit}; shorten it or lower max_new_tokens"
            )


def generate_responses(
    handle: ModelHandle,
    requests: Sequence[tuple[str, list[int]]],
    sampling: SamplingConfig,
    *,
    done: Iterable[str] = (),
    on_result: Callable[[GenerationResult], None] | None = None,
    token_budget: int = 16384,
    max_batch: int = 64,
    progress: bool = True,
    description: str = "Generating",
    monitor: BatchMonitor | None = None,
) -> list[GenerationResult]:
    """Generate a response for each `(id, prompt_ids)` request, in length-sorted batches.

    Args:
        requests: stable row ids with their chat prompt ids (ending with the assistant header).
        done: ids already finished (skipped; their batches are formed as if they were not).
        on_result: called for each finished row as its batch completes (append it to a file there).
        token_budget: padded tokens (prompt + new) allowed in one batch.
        monitor: records per-token readings of each batch into the results' `trace`
            (e.g. `personascope.apply.monitor.GenerationTrace`).

    Returns:
        The results generated by this call, in request order.
    """
    check_requests(handle, requests, sampling)
    finished = set(done)
    batches = plan_batches([len(ids) for _, ids in requests], sampling.max_new_tokens, token_budget, max_batch)
    todo = [b for b in batches if any(requests[i][0] not in finished for i in b)]
    results: dict[int, GenerationResult] = {}
    total = sum(1 for b in todo for i in b if requests[i][0] not in finished)
    with progress_bar(total, description, enabled=progress) as bar:
        for batch in todo:
            if monitor is not None:
                monitor.begin()
            try:
                texts = _generate_batch(handle, [requests[i][1] for i in batch], sampling,
                                        seed_for(sampling.seed, requests[batch[0]][0]))
            finally:
                traces = monitor.end() if monitor is not None else None
            for row, (index, (text, token_ids)) in enumerate(zip(batch, texts)):
                if requests[index][0] in finished:
                    continue
                trace = None if traces is None else traces[row, : len(token_ids)]
                result = GenerationResult(requests[index][0], text, token_ids, trace)
                results[index] = result
                if on_result is not None:
                    on_result(result)
                bar.advance(0)
    return [results[i] for i in sorted(results)]


def end_ids(handle: ModelHandle) -> set[int]:
    """The token ids that end a response: the generation config's and the tokenizer's end-of-sequence."""
    ids = handle.model.generation_config.eos_token_id
    ends = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if handle.tokenizer.eos_token_id is not None:
        ends.add(handle.tokenizer.eos_token_id)
    return ends


def _generate_batch(
    handle: ModelHandle, prompts: list[list[int]], sampling: SamplingConfig, seed: int
) -> list[tuple[str, list[int]]]:
    device = handle.device
    pad = handle.tokenizer.pad_token_id
    ids, mask, _ = left_pad(prompts, pad)
    width = ids.shape[1]
    torch.manual_seed(seed)
    with torch.inference_mode(), memory_hint(ids.shape[0], ids.shape[1] + sampling.max_new_tokens):
        out = handle.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad, **sampling.generate_kwargs()
        )
    ends = end_ids(handle)
    decoded = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in ends), len(row))
        tokens = row[:cut]
        decoded.append((handle.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens))
    return decoded


class _CallbackStreamer(TextStreamer):
    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


def stream_chat(
    handle: ModelHandle,
    messages: list[dict[str, str]],
    sampling: SamplingConfig | None = None,
    *,
    on_text: Callable[[str], None],
) -> str:
    """Generate one chat response, passing text to `on_text` as it is produced; returns the whole response.

    `sampling` defaults to `default_decoding(handle)`.
    """
    prompt = handle.chat_ids(messages)
    sampling = sampling if sampling is not None else default_decoding(handle)
    max_new_tokens = sampling.max_new_tokens
    if handle.max_length and len(prompt) + max_new_tokens > handle.max_length:
        raise PersonascopeError(
            f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context length "
            f"{handle.max_length}"
        )
    torch.manual_seed(sampling.seed)
    ids = torch.tensor([prompt], device=handle.device)
    with torch.inference_mode():
        out = handle.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_CallbackStreamer(handle.tokenizer, on_text),
            pad_token_id=handle.tokenizer.pad_token_id, **sampling.generate_kwargs(),
        )
    return handle.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
