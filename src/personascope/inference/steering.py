"""One steering description for every engine: `hf` turns it into hooks, `vllm` into a per-request persona spec."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

from personascope.hooks import steer
from personascope.model import ModelHandle
from personascope.vector import PersonaVector


@dataclass(frozen=True)
class Steering:
    """Steer along `vector` at `layer` (HF `hidden_states` index): `add` coef·v, `ablate` the component on v/|v|
    or `clamp` it to `value`, over the `scope` tokens."""

    vector: PersonaVector
    layer: int
    coef: float = 0.0
    scope: Literal["prompt", "response", "all"] = "response"
    mode: Literal["add", "ablate", "clamp"] = "add"
    value: float = 0.0


@contextmanager
def hooked(handle: ModelHandle, steering: Sequence[Steering]) -> Iterator[None]:
    """`handle`'s model steered as `steering` says inside the block (the `hf` engine), untouched after it."""
    with ExitStack() as stack:
        for s in steering:
            stack.enter_context(steer(handle, s.vector, s.layer, s.coef, s.scope, mode=s.mode, value=s.value))
        yield
