"""Generation with vLLM on the model directory a `ModelHandle` was loaded from: the same prompt ids, per-row seeds,
end tokens and steering as the `hf` path, with per-token projections read on the workers (`vllm_plugin`)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.hooks import HookManager
from personascope.inference.generate import GenerationResult, SamplingConfig, check_requests, end_ids, seed_for
from personascope.inference.steering import Steering
from personascope.io.progress import progress_bar
from personascope.model import ModelHandle
from personascope.model.loading import cache_dir
from personascope.vector import PersonaVector
from personascope.vllm_plugin import EXTRA_KEY, PersonaSpec, SteerItem
from personascope.vllm_plugin.plugin import CONFIG_KEY, plugin_identity

#: Rows submitted to the engine at once (it batches them itself); results are saved after each chunk.
CHUNK = 256
EXTENSION = "personascope.vllm_plugin.plugin.PersonaWorkerExtension"
#: Vectors a started engine can hold at once (its per-layer buffers are sized for them before warm-up).
MAX_VECTORS = 16

_engines: dict[tuple[Any, ...], Any] = {}
_registered: dict[int, dict[str, str]] = {}  # id(llm) -> {name: file digest}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise PersonascopeError(
            "--engine vllm needs vLLM, which is not installed here: run `make setup-vllm` and use .venv-vllm"
        ) from None
    return vllm


def engine_for(handle: ModelHandle, *, eager: bool | None = None) -> Any:
    """The vLLM `LLM` for `handle`'s model directory, with the persona plugin's worker extension (started on
    first use, then reused). `eager` (default: env `PERSONASCOPE_VLLM_EAGER=1`) turns compilation off."""
    source = handle.source
    if not source:
        raise PersonascopeError(f"model {handle.name!r} was not loaded from a directory or hub id vLLM can read")
    if (Path(source) / "adapter_config.json").exists():
        raise PersonascopeError(f"{source} is a PEFT adapter: merge it into its base model for --engine vllm")
    tp = int(os.environ.get("PERSONASCOPE_VLLM_TP", "1"))
    memory = float(os.environ.get("PERSONASCOPE_VLLM_GPU_MEMORY", "0.5"))
    eager = os.environ.get("PERSONASCOPE_VLLM_EAGER", "0") == "1" if eager is None else eager
    dtype = str(handle.dtype).removeprefix("torch.")
    key = (source, dtype, tp, memory, handle.max_length, eager)
    if key not in _engines:
        vllm = _import_vllm()
        _engines[key] = vllm.LLM(
            model=source, tokenizer=source, dtype=dtype, tensor_parallel_size=tp, gpu_memory_utilization=memory,
            max_model_len=handle.max_length, seed=0, enforce_eager=eager, worker_extension_cls=EXTENSION,
            additional_config={CONFIG_KEY: {"max_vectors": MAX_VECTORS}, CONFIG_KEY + "_plugin": plugin_identity()},
        )
    return _engines[key]


def close_engines() -> None:
    """Shut down every engine this process started (frees its memory and worker processes)."""
    while _engines:
        _, llm = _engines.popitem()
        _registered.pop(id(llm), None)
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
    gc.collect()


def vector_name(vector: PersonaVector) -> str:
    """The name a vector is registered under on the workers: its trait and a digest of its directions."""
    digest = hashlib.sha256(vector.directions.numpy().tobytes()).hexdigest()[:12]
    return f"{vector.trait}-{digest}"


def register_vector(llm: Any, vector: PersonaVector, name: str | None = None, layer: int | None = None) -> str:
    """Put `vector` on `llm`'s workers (once; saved as safetensors in the cache for them to read), read by default
    at `layer` (else its best layer); returns its name."""
    name = name or vector_name(vector)
    known = _registered.setdefault(id(llm), {})
    digest = vector_name(vector)
    if known.get(name) != digest:
        folder = cache_dir() / "vllm-vectors"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{digest}.safetensors"
        if not path.exists():
            vector.save(path)
        default_layer = layer if layer is not None else vector.best_layer
        llm.collective_rpc("persona_register", args=(name, str(path), default_layer))
        known[name] = digest
    return name


def reading_vector(vector_like: Tensor, layer: int, num_layers: int, model: str, trait: str) -> PersonaVector:
    """A vector that holds one `[d]` direction at `layer` (zeros elsewhere): how a monitor's unit directions are
    registered for reading."""
    directions = torch.zeros(num_layers + 1, vector_like.shape[-1])
    directions[layer] = vector_like.float().cpu()
    return PersonaVector(directions, trait, model, {"best_layer": str(layer)})


def persona_spec(llm: Any, steering: Sequence[Steering], monitor: Sequence[str], key: str | None) -> PersonaSpec:
    """The request spec for `steering` (its vectors registered on `llm`'s workers) and monitored names."""
    items = tuple(SteerItem(register_vector(llm, s.vector, layer=s.layer), s.coef if s.mode == "add" else 0.0,
                            s.layer, s.mode, s.scope, s.value) for s in steering)
    return PersonaSpec(items, tuple(monitor), key)


def sampling_params(sampling: SamplingConfig, row_id: str, stop: Sequence[int], spec: PersonaSpec | None = None) -> Any:
    """vLLM's `SamplingParams` for one row: greedy at temperature 0, else seeded from the row's id; the
    persona spec, if any, in `extra_args`."""
    vllm = _import_vllm()
    sampling.generate_kwargs()  # the same checks as the hf path
    greedy = sampling.temperature <= 0
    extra = {EXTRA_KEY: spec.to_json()} if spec is not None and (spec.steer or spec.monitor) else None
    return vllm.SamplingParams(
        n=1, max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p, seed=seed_for(sampling.seed, row_id),
        repetition_penalty=sampling.repetition_penalty, stop_token_ids=list(stop), skip_special_tokens=True,
        detokenize=False, extra_args=extra,
    )


def prompt_for(ids: Sequence[int], spec: PersonaSpec | None) -> Any:
    """The engine prompt for `ids`, salted per steering config so no request reuses KV blocks computed under
    other steering (unsteered prompts keep sharing theirs)."""
    from vllm.inputs import TokensPrompt

    salt = spec.cache_salt() if spec is not None else None
    return TokensPrompt(prompt_token_ids=list(ids), **({"cache_salt": salt} if salt else {}))


def take_readings(llm: Any, keys: Sequence[str], prompt_lengths: Sequence[int]) -> list[dict[str, Any]]:
    """The monitor readings the workers filed under `keys` (removed there): per key `prompt_last` and `tokens`."""
    return json.loads(llm.collective_rpc("persona_readings", args=(list(keys), list(prompt_lengths)))[0])


def generate_vllm(
    handle: ModelHandle,
    requests: Sequence[tuple[str, list[int]]],
    sampling: SamplingConfig,
    *,
    steering: Sequence[Steering] = (),
    monitor: Mapping[str, tuple[Tensor, int]] | None = None,
    done: Iterable[str] = (),
    on_result: Callable[[GenerationResult], None] | None = None,
    progress: bool = True,
    description: str = "Generating",
    chunk: int = CHUNK,
) -> list[GenerationResult]:
    """`generate_responses` on vLLM: a response per `(id, prompt_ids)` request not in `done`, in request order.

    Args:
        steering: interventions applied on the workers to every request (as the `hf` engine's hooks would).
        monitor: name -> (`[d]` direction, layer): each result's `trace` is `[len(token_ids), K]` projections
            read on the workers (step `t` is the position whose output picked token `t`), K in `monitor`'s order.
    """
    if HookManager.of(handle).active:
        raise PersonascopeError("the model has hooks installed, which vLLM does not run: pass the steering to the "
                                "engine (steering=...) instead")
    check_requests(handle, requests, sampling)
    finished = set(done)
    todo = [(rid, ids) for rid, ids in requests if rid not in finished]
    if not todo:
        return []
    llm = engine_for(handle)
    names = []
    for name, (direction, layer) in (monitor or {}).items():
        vector = reading_vector(direction, layer, handle.num_layers, handle.name, name)
        names.append(register_vector(llm, vector, f"monitor-{vector_name(vector)}"))
    ends = end_ids(handle)
    run = uuid.uuid4().hex[:8]
    results: list[GenerationResult] = []
    with progress_bar(len(todo), description, enabled=progress) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            specs = [persona_spec(llm, steering, names, f"{run}-{rid}" if names else None) for rid, _ in part]
            outputs = llm.generate([prompt_for(ids, spec) for (_, ids), spec in zip(part, specs)],
                                   [sampling_params(sampling, rid, sorted(ends), spec)
                                    for (rid, _), spec in zip(part, specs)], use_tqdm=False)
            readings = (take_readings(llm, [s.key for s in specs], [len(ids) for _, ids in part]) if names
                        else [None] * len(part))
            for (rid, _), output, reading in zip(part, outputs, readings):
                row = list(output.outputs[0].token_ids)
                tokens = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
                trace = None
                if reading is not None:
                    trace = torch.tensor([reading["tokens"].get(n, [])[: len(tokens)] for n in names]).T
                result = GenerationResult(rid, handle.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                          tokens, trace)
                results.append(result)
                if on_result is not None:
                    on_result(result)
            bar.advance(0, len(part))
    return results
