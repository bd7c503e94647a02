"""One call for generation on either engine, `hf` (transformers, here) or `vllm`: `generate_with` takes and returns
what `generate_responses` does, with steering given as `Steering` values that each engine applies its own way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.inference.generate import GenerationResult, SamplingConfig, generate_responses
from personascope.inference.steering import Steering, hooked
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
    steering: Sequence[Steering] = (),
    monitor: Mapping[str, tuple[Tensor, int]] | None = None,
    done: Iterable[str] = (),
    on_result: Callable[[GenerationResult], None] | None = None,
    token_budget: int = 16384,
    max_batch: int = 64,
    progress: bool = True,
    description: str = "Generating",
) -> list[GenerationResult]:
    """`generate_responses` on `engine` (`hf` or `vllm`); same arguments, same results in request order.

    `steering` applies to every request (hooks on `hf`, the workers' buffers on `vllm`). `monitor` (vLLM only:
    the `hf` engine takes a `GenerationTrace` through `generate_responses`) maps names to (`[d]` direction,
    layer) and fills each result's `trace`.
    """
    if check_engine(engine) == "hf":
        if monitor:
            raise PersonascopeError("on the hf engine, monitor with generate_responses(monitor=GenerationTrace(...))")
        with hooked(handle, steering):
            return generate_responses(handle, requests, sampling, done=done, on_result=on_result,
                                      token_budget=token_budget, max_batch=max_batch, progress=progress,
                                      description=description)
    from personascope.inference.vllm_engine import generate_vllm

    return generate_vllm(handle, requests, sampling, steering=steering, monitor=monitor, done=done,
                         on_result=on_result, progress=progress, description=description)
