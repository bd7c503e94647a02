"""Traits: validated `TraitSpec`s, the built-in library (`library/<name>.json`) and trait files."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personascope.errors import PersonascopeError
from personascope.io.files import write_text
from personascope.traits.spec import N_PAIRS, N_QUESTIONS, InstructionPair, TraitSpec

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "N_PAIRS",
    "N_QUESTIONS",
    "InstructionPair",
    "TraitSpec",
    "builtin_trait_names",
    "load_trait",
    "save_trait",
    "validate_trait_file",
]

_LIBRARY = resources.files(__name__) / "library"
_SPLIT_DIRS = ("trait_data_extract", "trait_data_eval")


def builtin_trait_names() -> list[str]:
    """Names of the built-in traits, sorted."""
    return sorted(f.name[: -len(".json")] for f in _LIBRARY.iterdir() if f.name.endswith(".json"))


def load_trait(name_or_path: str | os.PathLike[str], *, name: str | None = None, strict: bool = True) -> TraitSpec:
    """Load a trait: a built-in name, a trait `.json` file, or the reference's split layout.

    The split layout is `DIR/trait_data_extract/<name>.json` + `DIR/trait_data_eval/<name>.json`; give
    `DIR` and `name`, or the path of either file.

    Args:
        name_or_path: Built-in trait name, path of a trait file, or a split-layout directory.
        name: Trait name inside a split-layout directory.
        strict: Require 5 pairs and 20 + 20 questions; `False` accepts any counts of at least 1.

    Returns:
        The validated spec.

    Raises:
        PersonascopeError: Unknown name, missing or malformed file.
    """
    if name is None and isinstance(name_or_path, str) and name_or_path in builtin_trait_names():
        resource = _LIBRARY / f"{name_or_path}.json"
        return TraitSpec.from_dict(_read_json(resource), str(resource), default_name=name_or_path, strict=strict)
    path = Path(name_or_path)
    if path.is_dir():
        if name is None:
            raise PersonascopeError(
                f"trait path {path} is a directory; give a trait file, or the trait name for the reference's "
                f"split layout (load_trait(dir, name=...))"
            )
        return _load_split(path, name, strict)
    if name is not None:
        raise PersonascopeError(f"trait path {path}: 'name' applies only to a split-layout directory; drop it")
    if not path.exists():
        raise PersonascopeError(
            f"no built-in trait or trait file {str(name_or_path)!r}; built-in traits are "
            f"{', '.join(builtin_trait_names())}, or give the path of a trait .json file"
        )
    if path.parent.name in _SPLIT_DIRS:
        return _load_split(path.parent.parent, path.stem, strict)
    return TraitSpec.from_dict(_read_json(path), str(path), default_name=path.stem, strict=strict)


def validate_trait_file(path: str | os.PathLike[str], *, strict: bool = True) -> TraitSpec:
    """Check a trait file (or one file of the reference's split layout) and return its spec.

    Raises:
        PersonascopeError: The first problem found, naming the file, the key and what to do.
    """
    if not Path(path).is_file():
        raise PersonascopeError(f"trait file {path} does not exist (or is not a file); check the path")
    return load_trait(Path(path), strict=strict)


def save_trait(spec: TraitSpec, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a spec as JSON (temp file, then rename, so a crash never leaves half a file).

    Args:
        spec: The spec to write.
        path: Destination `.json` file.
        overwrite: Replace an existing file.

    Returns:
        The written path.

    Raises:
        PersonascopeError: The file exists and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PersonascopeError(
            f"trait file {path} already exists; choose another path, or pass overwrite=True to replace it"
        )
    write_text(path, json.dumps(spec.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def _load_split(root: Path, name: str, strict: bool) -> TraitSpec:
    extract_path, eval_path = (root / d / f"{name}.json" for d in _SPLIT_DIRS)
    for p in (extract_path, eval_path):
        if not p.is_file():
            raise PersonascopeError(
                f"trait {name!r} in the split layout under {root}: {p} is missing; the layout needs both "
                f"{_SPLIT_DIRS[0]}/{name}.json and {_SPLIT_DIRS[1]}/{name}.json"
            )
    return TraitSpec.from_reference_split(
        _read_json(extract_path),
        _read_json(eval_path),
        name=name,
        extract_source=str(extract_path),
        eval_source=str(eval_path),
        strict=strict,
    )


def _read_json(path: Path | Traversable) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PersonascopeError(f"trait file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8 JSON") from exc
    except OSError as exc:
        raise PersonascopeError(f"trait file {path} cannot be read ({exc.strerror}); check the path") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonascopeError(
            f"trait file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the syntax"
        ) from exc
