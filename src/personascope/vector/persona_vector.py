"""`PersonaVector`: directions `[L+1, d]` with metadata, projection, model checks, safetensors files."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.io.files import atomic_write
from personascope.io.layers import check_layer
from personascope.model import ModelHandle, as_module, decoder_layers, hidden_size
from personascope.vector.formats import read_gguf, read_pt, write_gguf

FORMAT = "personascope.vector/1"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("personascope")
    except PackageNotFoundError:
        return "0"


@dataclass
class PersonaVector:
    """A persona vector for one model.

    Attributes:
        directions: `[L+1, d]` float32, row `l` for layer `l`.
        trait: the trait's name.
        model: the name of the model it was made for.
        metadata: the other string metadata (`method`, `position`, `n_pos`, `best_layer`, …).
        pos_mean, neg_mean: optional `[L+1, d]` class means.
    """

    directions: Tensor
    trait: str
    model: str
    metadata: dict[str, str] = field(default_factory=dict)
    pos_mean: Tensor | None = None
    neg_mean: Tensor | None = None

    def __post_init__(self) -> None:
        self.directions = _checked("directions", self.directions, self.trait)
        shape = tuple(self.directions.shape)
        if len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
            raise PersonascopeError(f"persona vector directions must be [L+1, d] with L >= 1, got {shape}")
        for name in ("pos_mean", "neg_mean"):
            mean = getattr(self, name)
            if mean is not None:
                setattr(self, name, _checked(name, mean, self.trait))
                if tuple(getattr(self, name).shape) != shape:
                    raise PersonascopeError(f"persona vector {name} has shape {tuple(mean.shape)}, its directions "
                                            f"{shape}")

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[1]

    @property
    def best_layer(self) -> int | None:
        value = self.metadata.get("best_layer", "")
        return int(value) if value.strip().lstrip("-").isdigit() else None

    @property
    def best_coef(self) -> float | None:
        try:
            return float(self.metadata["best_coef"])
        except (KeyError, ValueError):
            return None

    def layer(self, layer: int | None = None) -> int:
        """`layer`, or the vector's best layer; checked against the vector's range."""
        chosen = self.best_layer if layer is None else layer
        if chosen is None:
            raise PersonascopeError(f"vector for {self.trait!r} has no best_layer: pass a layer")
        return check_layer(chosen, self.num_layers, owner="the vector")

    def unit(self, layer: int) -> Tensor:
        """The direction at `layer` scaled to length 1."""
        row = self.directions[self.layer(layer)]
        norm = row.norm()
        if float(norm) == 0.0:
            raise PersonascopeError(f"vector for {self.trait!r} is all zeros at layer {layer}")
        return row / norm

    def project(self, hidden: Tensor, layer: int) -> Tensor:
        """Projection of `hidden[..., d]` on the unit direction at `layer` (same leading shape)."""
        unit = self.unit(layer).to(device=hidden.device, dtype=torch.float32)
        return hidden.float() @ unit

    def check_model(self, model: ModelHandle | nn.Module, *, name: str | None = None) -> None:
        """Raise a clear error when this vector was made for another model (name, hidden size, layer count)."""
        module = as_module(model)
        problems = []
        width, depth = hidden_size(module), len(decoder_layers(module))
        if self.hidden_size != width:
            problems.append(f"hidden size {self.hidden_size} vs the model's {width}")
        if self.num_layers != depth:
            problems.append(f"{self.num_layers} layers vs the model's {depth}")
        model_name = name or (model.name if isinstance(model, ModelHandle) else None)
        if model_name and self.model and self.model != model_name and not problems:
            problems.append(f"made for model {self.model!r}, loaded model is {model_name!r}")
        if problems:
            raise PersonascopeError(
                f"vector for trait {self.trait!r} does not fit this model: {'; '.join(problems)}. "
                "Extract a vector with this model, or load the model the vector was made for"
            )

    # -- safetensors ------------------------------------------------------------------------------------

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "trait": self.trait,
            "model": self.model,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "personascope_version": _version(),
        }
        meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        for key, value in self.metadata.items():
            meta.setdefault(key, str(value))
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the vector as safetensors (write-temp-then-rename)."""
        path = Path(path)
        tensors = {"directions": self.directions.contiguous()}
        if self.pos_mean is not None:
            tensors["pos_mean"] = self.pos_mean.float().contiguous()
        if self.neg_mean is not None:
            tensors["neg_mean"] = self.neg_mean.float().contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.to_metadata()))
        return path

    @classmethod
    def load(cls, path: str | Path, model: ModelHandle | nn.Module | None = None) -> PersonaVector:
        """Read a vector file; with `model`, check that the vector fits it."""
        path = Path(path)
        meta = vector_metadata(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PersonascopeError(f"{path} is not a safetensors vector file ({exc})") from None
        if "directions" not in tensors:
            raise PersonascopeError(f"{path} has no 'directions' tensor: not a personascope vector file")
        if meta.get("format", FORMAT) != FORMAT:
            raise PersonascopeError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT}")
        trait, name = meta.pop("trait", path.stem), meta.pop("model", "")
        recorded = {key: meta.pop(key, None) for key in ("hidden_size", "num_layers")}
        meta.pop("format", None)
        try:
            vector = cls(tensors["directions"], trait, name, meta, tensors.get("pos_mean"), tensors.get("neg_mean"))
            _check_metadata(vector, recorded)
        except PersonascopeError as exc:
            raise PersonascopeError(f"{path}: {exc}") from None
        if float(vector.directions.norm()) == 0.0:
            raise PersonascopeError(f"{path}: the vector is all zeros")
        if model is not None:
            vector.check_model(model)
        return vector

    # -- other tools' formats --------------------------------------------------------------------------

    def export_gguf(self, path: str | Path) -> Path:
        """Write a llama.cpp control vector: `direction.N` (N >= 1) holds row N+1 (block N's output)."""
        return write_gguf(path, self.directions, self.model, self.to_metadata())

    @classmethod
    def import_gguf(cls, path: str | Path, *, trait: str | None = None, num_layers: int | None = None) -> PersonaVector:
        """Read a llama.cpp / repeng control vector; rows with no `direction.N` (0 and 1 at least) are zero.

        `num_layers` (the model's decoder layer count) pads a file without the last layers with zero rows, as
        repeng writes them; without it the file's own count (or its deepest direction) decides the rows.
        """
        directions, meta = read_gguf(path, num_layers)
        for key in ("format", "hidden_size", "num_layers"):
            meta.pop(key, None)
        name = meta.pop("model")
        return cls(directions, trait or meta.pop("trait", Path(path).stem), name, meta)

    @classmethod
    def import_pt(cls, path: str | Path, model: ModelHandle, *, trait: str | None = None) -> PersonaVector:
        """Read a reference-style `[L+1, d]` tensor file (`torch.load(weights_only=True)`) for `model`."""
        path = Path(path)
        name = trait or path.stem.split("_response_avg")[0].split("_prompt_")[0]
        vector = cls(read_pt(path), name, model.name, {"method": "mean_diff", "source": path.name})
        vector.check_model(model)
        return vector


def _checked(name: str, tensor: Tensor, trait: str) -> Tensor:
    """`tensor` as float32 on the CPU, refused when it is not floating point or holds NaN or inf."""
    tensor = torch.as_tensor(tensor).detach()
    if not tensor.is_floating_point():
        raise PersonascopeError(f"persona vector {name} has dtype {str(tensor.dtype).removeprefix('torch.')}: "
                                "a vector holds floating-point numbers (float32)")
    tensor = tensor.float().cpu()
    if not torch.isfinite(tensor).all():
        raise PersonascopeError(f"persona vector {name} for {trait!r} contains NaN or infinite values")
    return tensor


def _check_metadata(vector: PersonaVector, recorded: dict[str, str | None]) -> None:
    """The file's metadata must agree with its tensors: sizes, and a best layer and coefficient that can be used."""
    actual = {"hidden_size": vector.hidden_size, "num_layers": vector.num_layers}
    for key, value in recorded.items():
        if value is not None and value.strip() != str(actual[key]):
            raise PersonascopeError(f"its metadata says {key} {value!r} but the directions tensor is "
                                    f"{tuple(vector.directions.shape)} ({key} {actual[key]}): a damaged or edited file")
    layer = vector.metadata.get("best_layer") or None  # absent or empty: none chosen
    if layer is not None and (vector.best_layer is None or not 0 <= vector.best_layer <= vector.num_layers):
        raise PersonascopeError(f"its best_layer {layer!r} is not a layer of this vector (0..{vector.num_layers})")
    for key in ("best_coef", "alert_threshold"):
        value = vector.metadata.get(key) or None
        if value is not None:
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not math.isfinite(number):
                raise PersonascopeError(f"its {key} {value!r} is not a finite number")


def vector_metadata(path: str | Path) -> dict[str, str]:
    """A vector file's string metadata (`model`, `trait`, …), read without loading its tensors."""
    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"vector file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise PersonascopeError(f"{path} is not a safetensors vector file ({exc})") from None
