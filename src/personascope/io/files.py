"""Files written safely: one atomic write (temp file in the same folder, then rename) and output-path checks."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`.

    The temporary file is synced before the rename and the folder after it. A crash or an exception (a full disk,
    a file-size limit) leaves `path` as it was; the temporary file is removed, or by the next write of `path` if
    the process was killed. A write the system refuses raises `write_error`'s one-line error.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-write
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's permissions, as open()
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_whole(folder: str | Path, save: Callable[[Path], None]) -> Path:
    """Call `save(tmp)` on a temporary folder inside `folder` (e.g. `save_pretrained`), then move each file it wrote
    into `folder` with a rename: every file appears whole, and a failure leaves `folder`'s files as they were."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".saving-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    except OSError as exc:
        raise write_error(folder, exc) from None
    try:
        save(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
        _fsync(folder)
    except OSError as exc:
        raise write_error(folder, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_error(path: str | Path, exc: OSError) -> PersonascopeError:
    """A write the system refused (disk full, a file-size limit, a read-only folder) as one clear error."""
    return PersonascopeError(f"cannot write {path}: {exc.strerror or exc}; what was finished before is kept: free "
                             "space or make the folder writable, then rerun to resume")


def _fsync(path: str | Path) -> None:
    """Sync a written file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_jsonable(value: Any) -> Any:
    """A dataclass as its fields (recursively), a path or other object as its string: what `write_json` stores."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` (JSON values and dataclasses) as indented JSON, atomically: the one place results are serialised."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=to_jsonable) + "\n")


def check_output(
    out: str | Path,
    inputs: Iterable[str | Path] = (),
    *,
    suffixes: Sequence[str] | None = (".jsonl", ".parquet"),
    what: str = "output",
) -> Path:
    """Refuse an output path with the wrong suffix or one that names an input file; return it as a Path."""
    out = Path(out)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise PersonascopeError(f"{what} {out}: use a {' or '.join(suffixes)} file name")
    for source in inputs:
        source = Path(source)
        if out.exists() and source.exists() and out.resolve() == source.resolve():
            raise PersonascopeError(f"refusing to write over the input {source}: choose another {what} path")
    return out
