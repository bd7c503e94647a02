"""Run directories: append-only JSONL row logs, atomic JSON files, and a manifest that guards resumption."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Collection
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io.files import write_json


class JsonlLog:
    """Rows with a stable `id`, appended and flushed one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]]:
        """The rows written so far, by id (a later row with the same id wins; a torn last line is ignored)."""
        rows: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return rows
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # the partial line of a killed run
                if isinstance(row, dict) and "id" in row:
                    rows[str(row["id"])] = row
        return rows

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with open(self.path, "a", encoding="utf-8") as handle:
            if needs_newline:
                handle.write("\n")  # seal a torn line left by a kill
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("personascope", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def open_run(directory: str | Path, config: dict[str, Any], stage: str = "manifest",
             ignored: Collection[str] = ()) -> Path:
    """Create or resume a run directory. Resuming with a different `config` is refused, so rows from two
    configurations never mix; the manifest records the config and package versions. Keys in `ignored` are never
    compared (settings an older version recorded that no longer decide the results)."""
    directory = Path(directory)
    manifest = directory / f"{stage}.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text()).get("config", {})
        changed = {k for k in set(previous) | set(config) if previous.get(k) != config.get(k) and k not in ignored}
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in sorted(changed))
            raise PersonascopeError(
                f"{directory} holds a run with other settings ({details}); use a new --out directory "
                "or the same settings to resume"
            )
    else:
        write_json(manifest, {"config": config, "versions": versions()})
    return directory
