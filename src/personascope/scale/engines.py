"""One call for unsteered generation on either engine: `generate_with(engine, ...)` takes and returns what
`generate_responses` does, so a caller switches engines by changing one line.

* `hf`: `transformers` `generate` in this process (steering and generation traces work here);
* `vllm`: a vLLM engine on the same model directory, with the same prompts (token ids from `chat_ids`), the same
  rows and ids, and per-row seeds from `seed_for` (a run is reproducible; its text differs from `hf`'s, being
  another sampler). Steering hooks do not reach vLLM, so a steered model is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from personascope.errors import PersonascopeError
from personascope.generate import GenerationResult, SamplingConfig, generate_responses
from personascope.models import ModelHandle

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
    from personascope.scale.vllm_engine import generate_vllm

    return generate_vllm(handle, requests, sampling, done=done, on_result=on_result, progress=progress,
                         description=description)
