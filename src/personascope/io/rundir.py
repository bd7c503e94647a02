"""Run directories: a manifest that records a run's settings and versions and guards its resumption."""

from __future__ import annotations

import json
import platform
from collections.abc import Collection
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io.files import write_json


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
