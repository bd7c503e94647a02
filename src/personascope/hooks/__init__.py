"""The one mechanism for touching the residual stream: a `HookManager` per model running ordered operations
(capture, add, ablate, clamp, monitoring traces, the training guard) with token scopes from real positions."""

from personascope.hooks.api import Capture, capture, run_forward, steer
from personascope.hooks.manager import (
    POOLS,
    SCOPES,
    HookHandle,
    HookManager,
    Operation,
    TokenContext,
    add_ops,
    check_pools,
)
from personascope.hooks.operations import (
    Directions,
    ablate_op,
    add_op,
    checked_direction,
    clamp_op,
    on_device,
)

__all__ = [
    "POOLS",
    "SCOPES",
    "Capture",
    "Directions",
    "HookHandle",
    "HookManager",
    "Operation",
    "TokenContext",
    "ablate_op",
    "add_op",
    "add_ops",
    "check_pools",
    "capture",
    "checked_direction",
    "clamp_op",
    "on_device",
    "run_forward",
    "steer",
]
