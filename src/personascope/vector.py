"""`PersonaVector`: directions `[L+1, d]` with metadata; safetensors files, GGUF control vectors, `.pt` imports.

Row `l` follows HF `hidden_states` (0 = embeddings, `l` = output of decoder layer `l-1`). A file holds the
tensor `directions` (mean(pos) − mean(neg), float32, not normalised), optionally `pos_mean` and `neg_mean`, and
string metadata (`format`, `trait`, `model`, `hidden_size`, `num_layers`, `method`, `position`, …).
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.models import ModelHandle, as_module, decoder_layers, hidden_size

FORMAT = "personascope.vector/1"
GGUF_ARCH = "controlvector"
_GGUF_META_PREFIX = "personascope."


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
        self.directions = torch.as_tensor(self.directions).detach().float().cpu()
        if self.directions.dim() != 2:
            raise PersonascopeError(f"persona vector directions must be [L+1, d], got {tuple(self.directions.shape)}")
        if not torch.isfinite(self.directions).all():
            raise PersonascopeError(f"persona vector for {self.trait!r} contains NaN or infinite values")

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
        if not 0 <= chosen <= self.num_layers:
            raise PersonascopeError(f"layer {chosen} is out of range: the vector has layers 0..{self.num_layers}")
        return chosen

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
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.to_metadata()))
        return path

    @classmethod
    def load(cls, path: str | Path, model: ModelHandle | nn.Module | None = None) -> PersonaVector:
        """Read a vector file; with `model`, check that the vector fits it."""
        path = Path(path)
        if not path.exists():
            raise PersonascopeError(f"vector file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PersonascopeError(f"{path} is not a safetensors vector file ({exc})") from None
        if "directions" not in tensors:
            raise PersonascopeError(f"{path} has no 'directions' tensor: not a personascope vector file")
        if meta.get("format", FORMAT) != FORMAT:
            raise PersonascopeError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT}")
        trait, name = meta.pop("trait", path.stem), meta.pop("model", "")
        for key in ("format", "hidden_size", "num_layers"):
            meta.pop(key, None)
        try:
            vector = cls(tensors["directions"], trait, name, meta, tensors.get("pos_mean"), tensors.get("neg_mean"))
        except PersonascopeError as exc:
            raise PersonascopeError(f"{path}: {exc}") from None
        if float(vector.directions.norm()) == 0.0:
            raise PersonascopeError(f"{path}: the vector is all zeros")
        if model is not None:
            vector.check_model(model)
        return vector

    # -- GGUF control vectors (llama.cpp layout) --------------------------------------------------------

    def export_gguf(self, path: str | Path) -> Path:
        """Write a llama.cpp control vector: `direction.N` (N >= 1) holds row N+1 (block N's output)."""
        import gguf

        path = Path(path)

        def write(tmp: Path) -> None:
            writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
            writer.add_string(f"{GGUF_ARCH}.model_hint", self.model)
            writer.add_uint32(f"{GGUF_ARCH}.layer_count", self.num_layers - 1)
            for key, value in self.to_metadata().items():
                writer.add_string(_GGUF_META_PREFIX + key, value)
            for block in range(1, self.num_layers):
                writer.add_tensor(f"direction.{block}", self.directions[block + 1].numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        _atomic_write(path, write)
        return path

    @classmethod
    def import_gguf(cls, path: str | Path, *, trait: str | None = None) -> PersonaVector:
        """Read a llama.cpp / repeng control vector; rows with no `direction.N` (0 and 1 at least) are zero."""
        import gguf

        path = Path(path)
        if not path.exists():
            raise PersonascopeError(f"GGUF file {path} does not exist")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # gguf raises ValueError/struct errors on non-GGUF input
            raise PersonascopeError(f"{path} is not a GGUF file ({exc})") from None
        fields = {name: _gguf_field_value(f) for name, f in reader.fields.items()}
        if fields.get("general.architecture") != GGUF_ARCH:
            raise PersonascopeError(f"{path} is not a control vector (general.architecture is not {GGUF_ARCH})")
        blocks = {}
        for tensor in reader.tensors:
            if tensor.name.startswith("direction."):
                blocks[int(tensor.name.split(".", 1)[1])] = torch.tensor(tensor.data.copy()).float().reshape(-1)
        if not blocks:
            raise PersonascopeError(f"{path} holds no direction.N tensors")
        meta = {k[len(_GGUF_META_PREFIX):]: str(v) for k, v in fields.items() if k.startswith(_GGUF_META_PREFIX)}
        layers = int(meta.get("num_layers", max(blocks) + 1))
        width = next(iter(blocks.values())).shape[0]
        directions = torch.zeros(layers + 1, width)
        for block, row in blocks.items():
            directions[block + 1] = row
        for key in ("format", "hidden_size", "num_layers"):
            meta.pop(key, None)
        name = meta.pop("model", str(fields.get(f"{GGUF_ARCH}.model_hint", "")))
        return cls(directions, trait or meta.pop("trait", path.stem), name, meta)

    # -- reference .pt tensors --------------------------------------------------------------------------

    @classmethod
    def import_pt(cls, path: str | Path, model: ModelHandle, *, trait: str | None = None) -> PersonaVector:
        """Read a reference-style `[L+1, d]` tensor file (`torch.load(weights_only=True)`) for `model`."""
        path = Path(path)
        if not path.exists():
            raise PersonascopeError(f"tensor file {path} does not exist")
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors for anything but plain tensors
            raise PersonascopeError(f"{path} is not a plain tensor file loadable with weights_only ({exc})") from None
        if not isinstance(tensor, Tensor):
            raise PersonascopeError(f"{path} holds a {type(tensor).__name__}, expected an [L+1, d] tensor")
        name = trait or path.stem.split("_response_avg")[0].split("_prompt_")[0]
        vector = cls(tensor, name, model.name, {"method": "mean_diff", "source": path.name})
        vector.check_model(model)
        return vector


def _gguf_field_value(field: Any) -> Any:
    """The value of a GGUF reader field: a string, a number, or None for arrays."""
    import gguf

    try:
        return field.contents()
    except AttributeError:  # older gguf
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode()
        return field.parts[field.data[0]][0] if field.data else None


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
