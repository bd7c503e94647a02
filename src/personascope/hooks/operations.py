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
    against the model (rows, hidden size, finite, non-zero) and returned float32 on the model's device."""
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
    param = next(manager.model.parameters())
    return tensor.detach().to(device=param.device, dtype=torch.float32)


def _matching(tensor: Tensor, like: Tensor, cache: dict[tuple[torch.device, torch.dtype], Tensor]) -> Tensor:
    """`tensor` on `like`'s device and dtype, converted on first use only: a decoding step then makes no tensor
    from host values (a host-to-device copy waits for the GPU to finish its queue)."""
    key = (like.device, like.dtype)
    if key not in cache:
        cache[key] = tensor.to(device=like.device, dtype=like.dtype)
    return cache[key]


def add_op(direction: Tensor, coef: float | Tensor, scope: str) -> Operation:
    """`h + coef·v` at the tokens in `scope`; `coef` may be a `[B]` tensor (one coefficient per row)."""
    if isinstance(coef, Tensor):
        c = coef.detach().to(device=direction.device, dtype=torch.float32)
        shift = (c[:, None, None] if c.dim() == 1 else c) * direction
    else:
        shift = float(coef) * direction
    shifts: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope)
        return torch.where(mask[..., None], hidden + _matching(shift, hidden, shifts), hidden)

    return op


def ablate_op(direction: Tensor, scope: str) -> Operation:
    """Remove the component along the unit direction at the tokens in `scope`."""
    return clamp_op(direction, 0.0, scope)


def clamp_op(direction: Tensor, value: float, scope: str) -> Operation:
    """Set the projection on the unit direction to `value` at the tokens in `scope`."""
    unit = direction / direction.norm()
    units: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope)
        u = _matching(unit, hidden, units)
        projection = hidden @ u
        return torch.where(mask[..., None], hidden + (value - projection)[..., None] * u, hidden)

    return op
