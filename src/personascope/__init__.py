"""personascope: persona vectors — extract, validate, steer, monitor, screen and guard character traits."""

from personascope.errors import PersonascopeError
from personascope.hooks import (
    Capture,
    HookHandle,
    HookManager,
    TokenContext,
    capture,
    run_forward,
    steer,
)
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model
from personascope.vector import PersonaVector

__all__ = [
    "DEFAULT_MODEL",
    "Capture",
    "HookHandle",
    "HookManager",
    "ModelHandle",
    "PersonaVector",
    "PersonascopeError",
    "TokenContext",
    "capture",
    "load_model",
    "run_forward",
    "steer",
]
