"""Options shared by every command that loads a model: `--model`, `--device`, `--dtype`, `--device-map`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personascope.errors import PersonascopeError

if TYPE_CHECKING:
    from personascope.model import ModelHandle

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, local dir or PEFT adapter dir.")]
VectorModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Embedded name, HF id, local dir or PEFT adapter dir (default: the vector's model)."
)]
DeviceOption = Annotated[str, typer.Option(help="auto (a GPU if there is one), cpu, cuda, cuda:1, mps, ….")]
DtypeOption = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]
DeviceMapOption = Annotated[Optional[str], typer.Option(
    help="Split the model over several GPUs with accelerate: auto, balanced, sequential, or a JSON "
    "{module: device} map. Overrides --device."
)]


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a command loads its model(s)."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None

    def load(self, model: str, **kwargs: Any) -> ModelHandle:
        """`load_model(model)` with this placement."""
        from personascope.model import load_model

        return load_model(model, self.device, self.dtype, device_map=parse_device_map(self.device_map), **kwargs)


def parse_device_map(value: str | None) -> str | dict[str, Any] | None:
    """`--device-map`: a strategy name as it is, or a JSON object of module names to devices."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise PersonascopeError(f"--device-map {value!r} is not a JSON object ({exc})") from None
    if not isinstance(parsed, dict):
        raise PersonascopeError(f"--device-map {value!r}: give a strategy (auto) or a JSON {{module: device}} map")
    return parsed


def model_for_vector(model: str | None, vector: Path | None) -> str:
    """The model a command loads: `--model` when given, else the model recorded in the vector file (read without
    loading the vector or any model), else the embedded default."""
    from personascope.model import DEFAULT_MODEL, EMBEDDED_MODELS
    from personascope.vector import vector_metadata

    if model:
        return model
    if vector is None:
        return DEFAULT_MODEL
    recorded = vector_metadata(vector).get("model", "")
    if not recorded:
        return DEFAULT_MODEL
    if recorded not in EMBEDDED_MODELS and "/" not in recorded and not Path(recorded).is_dir():
        raise PersonascopeError(
            f"{vector} was made for the local model {recorded!r}, which is not here: pass --model with its directory"
        )
    return recorded


def adapter_base(path: str) -> str | None:
    """The base model recorded in a PEFT adapter directory's config (None for a plain model)."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def reads_own_base(candidate: ModelHandle, source: str, base: str | None) -> bool:
    """Whether `candidate` (loaded from `source`) is a PEFT adapter on `base` (or base is not given), so that the
    base can be read from it with the adapter disabled instead of loading a second copy of the weights."""
    return hasattr(candidate.model, "disable_adapter") and base in (None, candidate.name, adapter_base(source))
