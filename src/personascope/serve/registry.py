"""The vectors a server may use, by name: each with its layer, best coefficient and alert threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.apply.monitor import Probe
from personascope.errors import PersonascopeError
from personascope.model.loading import ModelHandle
from personascope.vector import PersonaVector


@dataclass(frozen=True)
class ServedVector:
    """A registered vector: its name, file contents, monitoring layer and alert threshold."""

    name: str
    vector: PersonaVector
    layer: int
    threshold: float | None
    threshold_source: str

    def describe(self) -> dict[str, Any]:
        """The `GET /v1/persona/vectors` entry."""
        auroc = self.vector.metadata.get("auroc")
        return {
            "name": self.name,
            "trait": self.vector.trait,
            "model": self.vector.model,
            "layer": self.layer,
            "best_coef": self.vector.best_coef,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "auroc": float(auroc) if auroc not in (None, "") else None,
            "hidden_size": self.vector.hidden_size,
        }


def alert_threshold(vector: PersonaVector, layer: int) -> tuple[float | None, str]:
    """The threshold from the vector file (rules 2-4 of the module doc) and where it came from."""
    value = vector.metadata.get("alert_threshold", "")
    if value.strip():
        try:
            return float(value), "metadata"
        except ValueError:
            raise PersonascopeError(f"vector {vector.trait!r} has a non-numeric alert_threshold {value!r}") from None
    if vector.pos_mean is not None and vector.neg_mean is not None:
        unit = vector.unit(layer)
        midpoint = (float(vector.pos_mean[layer] @ unit) + float(vector.neg_mean[layer] @ unit)) / 2
        return midpoint, "class_means"
    return None, "none"


class Registry:
    """Named vectors for one model, with a `Probe` that reads all of them at once (column k = `names[k]`)."""

    def __init__(self, handle: ModelHandle, vectors: Sequence[ServedVector]) -> None:
        self.handle = handle
        self.vectors = {v.name: v for v in vectors}
        self.names = tuple(self.vectors)
        self.probe: Probe | None = None
        if vectors:  # each vector under its registered name, so the probe's columns carry those names
            named = [dataclasses.replace(v.vector, trait=v.name) for v in vectors]
            self.probe = Probe.build(handle, named, [v.layer for v in vectors])

    @classmethod
    def load(cls, handle: ModelHandle, files: Mapping[str, str | Path],
             thresholds: Mapping[str, float] | None = None) -> Registry:
        """Load `{name: vector file}` for `handle`, with optional threshold overrides by name."""
        thresholds = dict(thresholds or {})
        unknown = sorted(set(thresholds) - set(files))
        if unknown:
            raise PersonascopeError(f"--threshold names unknown vectors: {', '.join(unknown)} "
                                    f"(registered: {', '.join(files) or 'none'})")
        served = []
        for name, path in files.items():
            if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise PersonascopeError(f"vector name {name!r}: use letters, digits, '_', '-' or '.'")
            vector = PersonaVector.load(path, handle)
            if vector.best_layer is None:
                raise PersonascopeError(f"vector {name} ({path}) has no best_layer: run `personascope evaluate` "
                                        "on it first, or serve the run's vector.safetensors")
            layer = vector.layer()
            if name in thresholds:
                threshold, source = float(thresholds[name]), "override"
            else:
                threshold, source = alert_threshold(vector, layer)
            served.append(ServedVector(name, vector, layer, threshold, source))
        return cls(handle, served)

    def get(self, name: str) -> ServedVector:
        """The vector registered as `name`; a `KeyError` names the registered ones."""
        if name not in self.vectors:
            raise KeyError(f"unknown vector {name!r}: registered vectors are {', '.join(self.names) or 'none'}")
        return self.vectors[name]

    def describe(self) -> list[dict[str, Any]]:
        return [v.describe() for v in self.vectors.values()]
