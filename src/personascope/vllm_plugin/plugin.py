"""How the plugin enters vLLM: the `vllm.general_plugins` entry point (`register`), which wraps each worker's
`load_model` so the decoder layers get their buffers and hook before warm-up, and the worker extension
(`PersonaWorkerExtension`) whose RPCs register vectors and return readings."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from personascope.errors import PersonascopeError
from personascope.vllm_plugin.layers import wrap_layers
from personascope.vllm_plugin.spec import Readings
from personascope.vllm_plugin.worker import PersonaState

log = logging.getLogger("personascope.vllm")

#: The `additional_config` section read by the workers: {"vectors": {name: path}, "max_vectors": K}.
CONFIG_KEY = "personascope"
#: Fallback for servers started without additional_config: "name=path,name2=path2".
VECTORS_ENV = "PERSONASCOPE_VECTORS"
DEFAULT_MAX_VECTORS = 8


def plugin_identity() -> str:
    """A hash of the code traced into the compiled graph, so vLLM's compile cache never reuses a graph built
    without (or with another version of) the hook."""
    source = (Path(__file__).parent / "layers.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:16]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a vLLM model (`model.model.layers`, or the first `layers` ModuleList)."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return list(module)
    raise PersonascopeError(f"personascope found no decoder layers in {type(model).__name__}")


def _configured_vectors(vllm_config: Any) -> tuple[dict[str, str], int]:
    section = dict((getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY) or {})
    vectors = dict(section.get("vectors") or {})
    for pair in filter(None, os.environ.get(VECTORS_ENV, "").split(",")):
        name, _, path = pair.partition("=")
        if not path:
            raise PersonascopeError(f"{VECTORS_ENV}: expected name=path pairs, got {pair!r}")
        vectors.setdefault(name.strip(), path.strip())
    return vectors, int(section.get("max_vectors", max(DEFAULT_MAX_VECTORS, len(vectors))))


def install(runner: Any) -> PersonaState:
    """Wrap `runner`'s decoder layers and step; register the configured vectors. Runs once per runner."""
    if getattr(runner, "persona", None) is not None:
        return runner.persona
    config = runner.vllm_config
    if isinstance(config.additional_config, dict):  # the compile cache key covers additional_config
        config.additional_config.setdefault(CONFIG_KEY + "_plugin", plugin_identity())
    vectors, max_vectors = _configured_vectors(config)
    hidden = runner.model_config.get_hidden_size()
    buffers = wrap_layers(decoder_layers(runner.model), runner.max_num_tokens, max_vectors, hidden, runner.device)
    state = PersonaState(runner, buffers)
    runner.persona = state
    runner._model_forward = state.stepping(runner._model_forward)
    runner._bookkeeping_sync = state.restoring_generators(runner._bookkeeping_sync)
    for name, path in vectors.items():
        state.register(name, path)
    log.info("personascope: %d decoder layers wrapped, vectors: %s", len(buffers), ", ".join(vectors) or "none")
    return state


def register() -> None:
    """The `vllm.general_plugins` entry point: every worker loaded after this installs the plugin."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker.load_model, "_personascope", False):
        return
    original = Worker.load_model

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        install(self.model_runner)

    load_model._personascope = True  # type: ignore[attr-defined]
    Worker.load_model = load_model


class PersonaWorkerExtension:
    """Worker extension (`LLM(worker_extension_cls=...)`): call its methods with `llm.collective_rpc`."""

    model_runner: Any

    def persona_register(self, name: str, path: str, layer: int | None = None) -> dict[str, int]:
        """Register (or replace) vector `name` from a safetensors file; returns its slot and layer."""
        registered = self.model_runner.persona.register(name, path, layer)
        return {"slot": registered.slot, "layer": registered.layer}

    def persona_vectors(self) -> dict[str, int]:
        """The registered vectors and the layer each is read at."""
        return {name: r.layer for name, r in self.model_runner.persona.vectors.items()}

    def persona_readings(self, keys: list[str], prompt_tokens: list[int]) -> str:
        """The readings filed under `keys`, removed from the worker, as JSON (a list, in `keys` order)."""
        readings: list[Readings] = self.model_runner.persona.take_readings(keys, prompt_tokens)
        return json.dumps([{"prompt_last": r.prompt_last, "tokens": r.tokens} for r in readings])
