"""The key-value cache of a forward pass across transformers versions (`cache` since 5.2x, `past_key_values`
before)."""

from __future__ import annotations

import inspect
from typing import Any


def cache_of(out: Any) -> Any:
    """The KV cache of a forward's output."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_keyword(model: Any) -> str:
    """The keyword `model.forward` takes a KV cache by."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
