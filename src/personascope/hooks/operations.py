"""Interventions on the residual stream as operations for the `HookManager`: add, ablate, clamp."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.hooks.manager import HookManager, Operation, TokenContext
from personascope.model import hidden_size


class Directions(Protocol):
    """Anything with `[L+1, d]` directions that can check it fits a model (a `PersonaVector`)."""

    directions: Tensor

    def check_model(self, model: nn.Module) -> None: ...


def checked_direction(vector: Directions | Tensor, layer: int, manager: HookManager) -> Tensor:
    """Row `layer` of a vector (`[L+1, d]` directions) or an `[L+1, d]` tensor, or a `[d]` tensor itself, checked
    against the model (rows, hidden size, finite, non-zero) and returned float32 (the operations move it to each
    layer's own device on first use)."""
    if isinstance(vector, Tensor):
        tensor = vector
    else:
        vector.check_model(manager.model)
        tensor = vector.directions
    if tensor.dim() == 2:
        if tensor.shape[0] != manager.num_layers + 1:
            raise PersonascopeError(
                f"vector has {tensor.shape[0]} rows but this model needs {manager.num_layers + 1} "
                f"(layers 0..{manager.num_layers}): it was made for another model"
            )
        tensor = tensor[layer]
    if tensor.dim() != 1 or tensor.shape[0] != hidden_size(manager.model):
        raise PersonascopeError(
            f"vector has shape {tuple(tensor.shape)} but this model's hidden size is {hidden_size(manager.model)}"
        )
    if not torch.isfinite(tensor).all():
        raise PersonascopeError(f"vector at layer {layer} contains NaN or infinite values")
    if float(tensor.norm()) == 0.0:
        raise PersonascopeError(f"vector at layer {layer} is all zeros: nothing to steer or project along")
    return tensor.detach().to(dtype=torch.float32)


def on_device(tensor: Tensor, like: Tensor, cache: dict[torch.device, Tensor]) -> Tensor:
    """`tensor` (float32) on `like`'s device, moved on first use only: a decoding step then makes no tensor from
    host values (a host-to-device copy waits for the GPU to finish its queue)."""
    if like.device not in cache:
        cache[like.device] = tensor.to(device=like.device, dtype=torch.float32)
    return cache[like.device]


def add_op(direction: Tensor, coef: float | Tensor, scope: str) -> Operation:
    """`h + coef·v` at the tokens in `scope`; `coef` may be a `[B]` tensor (one coefficient per row)."""
    if isinstance(coef, Tensor):
        c = coef.detach().to(device=direction.device, dtype=torch.float32)
        shift = (c[:, None, None] if c.dim() == 1 else c) * direction
    else:
        shift = float(coef) * direction
    shifts: dict[torch.device, Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope, hidden.device)
        moved = (hidden.float() + on_device(shift, hidden, shifts)).to(hidden.dtype)
        return torch.where(mask[..., None], moved, hidden)

    return op


def ablate_op(direction: Tensor, scope: str) -> Operation:
    """Remove the component along the unit direction at the tokens in `scope`."""
    return clamp_op(direction, 0.0, scope)


def clamp_op(direction: Tensor, value: float, scope: str) -> Operation:
    """Set the projection on the unit direction to `value` at the tokens in `scope`."""
    unit = direction / direction.norm()
    units: dict[torch.device, Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope, hidden.device)
        u = on_device(unit, hidden, units)
        exact = hidden.float()
        moved = (exact + (value - exact @ u)[..., None] * u).to(hidden.dtype)
        return torch.where(mask[..., None], moved, hidden)

    return op
