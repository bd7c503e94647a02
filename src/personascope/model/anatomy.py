"""Where the parts of any causal LM are: decoder layers, the module that runs them, the final norm, sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from personascope.errors import PersonascopeError

if TYPE_CHECKING:
    from personascope.model.loading import ModelHandle

_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "backbone.layers",
)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def text_config(model: nn.Module) -> Any:
    """The config that describes the decoder stack (multimodal models keep it in a sub-config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model: nn.Module) -> int:
    cfg = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise PersonascopeError(f"cannot find the hidden size in the config of {type(model).__name__}")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of any causal LM (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, …)."""
    inner = unwrap(model)
    for path in _LAYER_PATHS:
        module: Any = inner
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    n = getattr(text_config(inner), "num_hidden_layers", None)
    candidates = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if candidates:
        return candidates[0]
    raise PersonascopeError(
        f"cannot find the decoder layers of {type(inner).__name__}: no ModuleList at {', '.join(_LAYER_PATHS)}"
    )


def backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and runs them in order (e.g. `LlamaModel`)."""
    layers = decoder_layers(model)
    for module in unwrap(model).modules():
        if any(child is layers for child in module.children()):
            return module
    raise PersonascopeError(f"cannot find the module that owns the decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (HF's `hidden_states[L]` is taken after it)."""
    stack = backbone(model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(stack, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def as_module(model: ModelHandle | nn.Module) -> nn.Module:
    """The torch module behind a handle, or the module itself."""
    return model if isinstance(model, nn.Module) else model.model
