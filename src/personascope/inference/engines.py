"""One call for unsteered generation on either engine, `hf` (transformers, here) or `vllm`: `generate_with` takes
and returns what `generate_responses` does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from personascope.errors import PersonascopeError
from personascope.inference.generate import GenerationResult, SamplingConfig, generate_responses
from personascope.model import ModelHandle

ENGINES = ("hf", "vllm")


def check_engine(engine: str) -> str:
    """`engine` if it is known; an error naming the choices otherwise."""
    if engine not in ENGINES:
        raise PersonascopeError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    return engine


def generate_with(
    engine: str,
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
) -> list[GenerationResult]:
    """`generate_responses` on `engine` (`hf` or `vllm`); same arguments, same results in request order."""
    if check_engine(engine) == "hf":
        return generate_responses(handle, requests, sampling, done=done, on_result=on_result,
                                  token_budget=token_budget, max_batch=max_batch, progress=progress,
                                  description=description)
    from personascope.inference.vllm_engine import generate_vllm

    return generate_vllm(handle, requests, sampling, done=done, on_result=on_result, progress=progress,
                         description=description)
