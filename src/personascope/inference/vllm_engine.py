"""Unsteered generation with vLLM on the model directory a `ModelHandle` was loaded from: the same prompt ids,
per-row seeds and end tokens as the `hf` path, saved chunk by chunk."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.hooks import HookManager
from personascope.inference.generate import GenerationResult, SamplingConfig, check_requests, end_ids, seed_for
from personascope.io.progress import progress_bar
from personascope.model import ModelHandle

#: Rows submitted to the engine at once (it batches them itself); results are saved after each chunk.
CHUNK = 256

_engines: dict[tuple[Any, ...], Any] = {}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise PersonascopeError(
            "--engine vllm needs vLLM, which is not installed here: run `make setup-vllm` and use .venv-vllm"
        ) from None
    return vllm


def engine_for(handle: ModelHandle) -> Any:
    """The vLLM `LLM` for `handle`'s model directory (started on first use, then reused)."""
    source = handle.source
    if not source:
        raise PersonascopeError(f"model {handle.name!r} was not loaded from a directory or hub id vLLM can read")
    if (Path(source) / "adapter_config.json").exists():
        raise PersonascopeError(f"{source} is a PEFT adapter: merge it into its base model for --engine vllm")
    tp = int(os.environ.get("PERSONASCOPE_VLLM_TP", "1"))
    memory = float(os.environ.get("PERSONASCOPE_VLLM_GPU_MEMORY", "0.5"))
    dtype = str(handle.dtype).removeprefix("torch.")
    key = (source, dtype, tp, memory, handle.max_length)
    if key not in _engines:
        vllm = _import_vllm()
        _engines[key] = vllm.LLM(model=source, tokenizer=source, dtype=dtype, tensor_parallel_size=tp,
                                 gpu_memory_utilization=memory, max_model_len=handle.max_length, seed=0)
    return _engines[key]


def close_engines() -> None:
    """Shut down every engine this process started (frees its memory and worker processes)."""
    while _engines:
        _, llm = _engines.popitem()
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
    gc.collect()


def sampling_params(sampling: SamplingConfig, row_id: str, stop: Sequence[int]) -> Any:
    """vLLM's `SamplingParams` for one row: greedy at temperature 0, else seeded from the row's id."""
    vllm = _import_vllm()
    sampling.generate_kwargs()  # the same checks as the hf path
    greedy = sampling.temperature <= 0
    return vllm.SamplingParams(
        n=1, max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p, seed=seed_for(sampling.seed, row_id),
        stop_token_ids=list(stop), skip_special_tokens=True, detokenize=False,
    )


def generate_vllm(
    handle: ModelHandle,
    requests: Sequence[tuple[str, list[int]]],
    sampling: SamplingConfig,
    *,
    done: Iterable[str] = (),
    on_result: Callable[[GenerationResult], None] | None = None,
    progress: bool = True,
    description: str = "Generating",
    chunk: int = CHUNK,
) -> list[GenerationResult]:
    """`generate_responses` on vLLM: a response per `(id, prompt_ids)` request not in `done`, in request order."""
    if HookManager.of(handle).active:
        raise PersonascopeError("the model is steered (hooks are installed), and vLLM runs without them: "
                                "steered generation needs --engine hf")
    check_requests(handle, requests, sampling)
    finished = set(done)
    todo = [(rid, ids) for rid, ids in requests if rid not in finished]
    if not todo:
        return []
    llm = engine_for(handle)
    from vllm.inputs import TokensPrompt

    ends = end_ids(handle)
    results: list[GenerationResult] = []
    with progress_bar(len(todo), description, enabled=progress) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for _, ids in part],
                                   [sampling_params(sampling, rid, sorted(ends)) for rid, _ in part], use_tqdm=False)
            for (rid, _), output in zip(part, outputs):
                row = list(output.outputs[0].token_ids)
                tokens = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
                result = GenerationResult(rid, handle.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                          tokens)
                results.append(result)
                if on_result is not None:
                    on_result(result)
            bar.advance(0, len(part))
    return results
