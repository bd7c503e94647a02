"""Vector files of other tools: llama.cpp / repeng GGUF control vectors and the reference's `.pt` tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.io.files import atomic_write

GGUF_ARCH = "controlvector"
_GGUF_META_PREFIX = "personascope."



def write_gguf(path: str | Path, directions: Tensor, model_hint: str, metadata: dict[str, str]) -> Path:
    """Write `directions` `[L+1, d]` as a llama.cpp control vector: `direction.N` (N >= 1) holds row N+1."""
    import gguf

    path = Path(path)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        num_layers = directions.shape[0] - 1
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", num_layers - 1)
        for key, value in metadata.items():
            writer.add_string(_GGUF_META_PREFIX + key, value)
        for block in range(1, num_layers):
            writer.add_tensor(f"direction.{block}", directions[block + 1].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def read_gguf(path: str | Path, num_layers: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """Read a llama.cpp / repeng control vector as `[L+1, d]` directions (rows with no `direction.N`, 0 and 1 at
    least, are zero) and its metadata (ours where the file has it; `model` from the model hint otherwise).

    `L` is `num_layers` when given (a file without the last layers is padded with zero rows), else the file's
    recorded layer count, else its deepest direction's.
    """
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
    layers = num_layers if num_layers is not None else int(meta.get("num_layers", max(blocks) + 1))
    if max(blocks) + 1 > layers:
        raise PersonascopeError(
            f"{path} has direction.{max(blocks)} (our layer {max(blocks) + 1}) but the model has {layers} layers: "
            "it was made for another model"
        )
    width = next(iter(blocks.values())).shape[0]
    directions = torch.zeros(layers + 1, width)
    for block, row in blocks.items():
        directions[block + 1] = row
    meta.setdefault("model", str(fields.get(f"{GGUF_ARCH}.model_hint", "")))
    return directions, meta


def read_pt(path: str | Path) -> Tensor:
    """Read a reference-style `[L+1, d]` tensor file with `torch.load(weights_only=True)` (nothing unpickled)."""
    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"tensor file {path} does not exist")
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors for anything but plain tensors
        raise PersonascopeError(f"{path} is not a plain tensor file loadable with weights_only ({exc})") from None
    if not isinstance(tensor, Tensor):
        raise PersonascopeError(f"{path} holds a {type(tensor).__name__}, expected an [L+1, d] tensor")
    return tensor


def _gguf_field_value(field: Any) -> Any:
    """The value of a GGUF reader field: a string, a number, or None for arrays."""
    import gguf

    try:
        return field.contents()
    except AttributeError:  # older gguf
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode()
        return field.parts[field.data[0]][0] if field.data else None


