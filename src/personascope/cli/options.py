"""Options shared by every command that loads a model (`--model`, `--device`, `--dtype`, `--device-map`), and the
ranges every numeric option takes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personascope.errors import PersonascopeError
from personascope.io.checks import REPETITION_PENALTY_RANGE, SEED_RANGE, check_count, check_number, check_temperature

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


def _count(low: int = 1) -> Callable[[str, Any], Any]:
    return lambda name, value: check_count(name, value, low)


def _range(low: float | None = None, high: float | None = None, open_low: bool = False) -> Callable[[str, Any], Any]:
    return lambda name, value: check_number(name, value, low, high, open_low=open_low)


#: Every numeric option of every command, by parameter name: the range it takes. A numeric option not named here
#: must still be finite. `checked` attaches these to the commands, so a bad value is one `error:` line, exit 2,
#: before anything is loaded or written.
NUMERIC_OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(("coef", "guard_coef"), _range()),
    "temperature": check_temperature,
    "top_p": _range(0, 1, open_low=True),
    "repetition_penalty": _range(*REPETITION_PENALTY_RANGE),
    "seed": lambda name, value: check_count(name, value, *SEED_RANGE),
    "layer": _count(0),
    **dict.fromkeys(("threshold", "coherence_threshold"), _range(0, 100)),
    "top": _range(0, 100, open_low=True),
    **dict.fromkeys(("epochs", "lr"), _range(0, open_low=True)),
    "max_steps": _count(-1),
    **dict.fromkeys(("gpus_per_worker", "batch_wait_ms"), _range(0)),
    "port": lambda name, value: check_count(name, value, 1, 65535),
    **dict.fromkeys(("max_new_tokens", "samples", "eval_samples", "eval_pairs", "pairs", "token_budget", "batch_size",
                     "max_batch", "lora_r", "lora_alpha", "grad_accum", "max_length", "monitor_every", "workers",
                     "shard_rows", "max_tokens", "max_body_bytes", "max_messages", "max_queue"), _count()),
}


def checked(command: Any) -> Any:
    """`command` (a Typer app's command, see `typer.main.get_command`), and every subcommand, with the
    `NUMERIC_OPTIONS` checks on its numeric parameters."""
    for sub in getattr(command, "commands", {}).values():
        checked(sub)
    for param in command.params:
        descriptor = getattr(param, "type_descriptor", None)
        if getattr(descriptor, "annotation", None) not in (int, float):
            continue
        check = NUMERIC_OPTIONS.get(param.name or "", _range())
        param.callback = _callback(check, max(param.opts, key=len), param.callback)
    return command


def _callback(check: Callable[[str, Any], Any], name: str, then: Callable[..., Any] | None) -> Callable[..., Any]:
    def callback(ctx: Any, param: Any, value: Any) -> Any:
        for item in value if isinstance(value, tuple | list) else [value]:
            if item is not None:
                check(name, item)
        return then(ctx, param, value) if then is not None else value

    return callback


EngineOption = Annotated[str, typer.Option(
    help="What generates: hf (transformers, the reference) or vllm (steering and monitoring on its workers; "
         "needs .venv-vllm: make setup-vllm).")]


def adapter_base(path: str) -> str | None:
    """The base model recorded in a PEFT adapter directory's config (None for a plain model)."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def reads_own_base(candidate: ModelHandle, source: str, base: str | None) -> bool:
    """Whether `candidate` (loaded from `source`) is a PEFT adapter on `base` (or base is not given), so that the
    base can be read from it with the adapter disabled instead of loading a second copy of the weights."""
    return hasattr(candidate.model, "disable_adapter") and base in (None, candidate.name, adapter_base(source))
