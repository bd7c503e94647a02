"""The per-request persona spec that travels to vLLM's workers as plain JSON: what to steer, what to read."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from personascope.errors import PersonascopeError

#: The key of the spec in `SamplingParams.extra_args` (and in the OpenAI server's `vllm_xargs`).
EXTRA_KEY = "persona"
OPS = ("add", "ablate", "clamp")
SCOPES = ("prompt", "response", "all")


@dataclass(frozen=True)
class SteerItem:
    """One intervention: `add` coef·v, `ablate` the component on v/|v|, or `clamp` it to `value`, at `layer`
    (None: the vector's best layer) over the `scope` tokens."""

    vector: str
    coef: float = 0.0
    layer: int | None = None
    op: str = "add"
    scope: str = "response"
    value: float = 0.0


@dataclass(frozen=True)
class PersonaSpec:
    """What one request asks of the workers: `steer` interventions, `monitor` vector names to read, and the
    `key` its readings are filed under (any string unique to the request)."""

    steer: tuple[SteerItem, ...] = ()
    monitor: tuple[str, ...] = ()
    key: str | None = None

    def to_json(self) -> str:
        """The spec as the JSON string that `extra_args[EXTRA_KEY]` carries."""
        body: dict[str, Any] = {"steer": [asdict(s) for s in self.steer], "monitor": list(self.monitor)}
        if self.key is not None:
            body["key"] = self.key
        return json.dumps(body, sort_keys=True)

    def cache_salt(self) -> str | None:
        """The prefix-cache salt of this spec: None when nothing is steered (unsteered requests share KV blocks),
        else a hash of the steering alone (monitoring does not change the KV cache)."""
        if not self.steer:
            return None
        text = json.dumps([asdict(s) for s in self.steer], sort_keys=True)
        return "persona-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _number(item: Mapping[str, Any], name: str, default: float) -> float:
    value = item.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PersonascopeError(f"persona spec: {name!r} must be a finite number, got {value!r}")
    return float(value)


def _steer_item(item: Any) -> SteerItem:
    if not isinstance(item, Mapping):
        raise PersonascopeError(f"persona spec: each steer entry must be an object, got {item!r}")
    unknown = set(item) - {"vector", "coef", "layer", "op", "scope", "value"}
    if unknown:
        raise PersonascopeError(f"persona spec: unknown steer field(s) {', '.join(sorted(unknown))}")
    vector = item.get("vector")
    if not isinstance(vector, str) or not vector:
        raise PersonascopeError("persona spec: each steer entry needs a 'vector' name")
    op, scope, layer = item.get("op", "add"), item.get("scope", "response"), item.get("layer")
    if op not in OPS:
        raise PersonascopeError(f"persona spec: unknown op {op!r}: use one of {', '.join(OPS)}")
    if scope not in SCOPES:
        raise PersonascopeError(f"persona spec: unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
        raise PersonascopeError(f"persona spec: 'layer' must be a decoder layer index >= 1, got {layer!r}")
    if op == "add" and "coef" not in item:
        raise PersonascopeError(f"persona spec: steering {vector!r} with op 'add' needs a 'coef'")
    return SteerItem(vector, _number(item, "coef", 0.0), layer, op, scope, _number(item, "value", 0.0))


def parse_spec(raw: Any) -> PersonaSpec:
    """A `PersonaSpec` from its JSON text or the decoded object; one clear error for anything malformed."""
    if isinstance(raw, PersonaSpec):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PersonascopeError(f"persona spec is not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise PersonascopeError(f"persona spec must be a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {"steer", "monitor", "key"}
    if unknown:
        raise PersonascopeError(f"persona spec: unknown field(s) {', '.join(sorted(unknown))}")
    steer, monitor, key = raw.get("steer", []), raw.get("monitor", []), raw.get("key")
    if not isinstance(steer, list):
        raise PersonascopeError("persona spec: 'steer' must be a list")
    if not isinstance(monitor, list) or not all(isinstance(m, str) and m for m in monitor):
        raise PersonascopeError("persona spec: 'monitor' must be a list of vector names")
    if key is not None and not isinstance(key, str):
        raise PersonascopeError("persona spec: 'key' must be a string")
    return PersonaSpec(tuple(_steer_item(s) for s in steer), tuple(dict.fromkeys(monitor)), key)


@dataclass
class Readings:
    """What the workers read for one monitored request, per vector name: the projection at the last prompt
    token, and per answer token (step `t` is the position whose output picked answer token `t`)."""

    prompt_last: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, list[float]] = field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        """The answer's mean projection per vector (NaN where nothing was read)."""
        return {name: (sum(v) / len(v) if v else math.nan) for name, v in self.tokens.items()}
