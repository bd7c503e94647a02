"""Preventative steering: steer toward a trait (or ablate it) in training forward passes only, so that the
optimiser has no reason to move the weights that way; every other pass sees the plain model."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.hooks import (
    HookManager,
    Operation,
    TokenContext,
    ablate_op,
    add_op,
    checked_direction,
)
from personascope.io.checks import check_number
from personascope.io.layers import parse_layers
from personascope.model import ModelHandle, as_module
from personascope.vector import PersonaVector

GuardMode = Literal["steer", "ablate"]
GUARD_MODES: tuple[str, ...] = ("steer", "ablate")
GUARD_FRACTION = 0.25
"""Default guard strength, as a fraction of the vector's best (inference-time) steering coefficient.

Measured with `experiments/preventative_steering.py` on the embedded model (optimistic, layer 17): the trait data
shifted the projection by +3.28; guarding at 0.1, 0.25, 0.5 and 1 times the best coefficient left +1.82, -0.08,
-2.72 and -4.05. The full coefficient, tuned to change generated text, over-corrects (the model moves away from
the trait and loses likelihood on trait-positive text); a quarter cancelled the shift."""


def default_guard_coef(vector: PersonaVector) -> float:
    """`GUARD_FRACTION` times the vector's best coefficient; an error when the vector records none."""
    if vector.best_coef is None:
        raise PersonascopeError(f"the {vector.trait} vector records no best coefficient: "
                                "give a guard coefficient (--guard-coef)")
    return GUARD_FRACTION * vector.best_coef


def _training_only(op: Operation, module: nn.Module) -> Operation:
    """`op` in training forward passes (train mode with gradients on); a no-op in every other pass. The module is
    held weakly: the hook manager keeps its operations, and must not keep the model alive through them."""
    ref = weakref.ref(module)

    def gated(hidden: Tensor, tokens: TokenContext) -> Tensor | None:
        current = ref()
        if current is None or not (current.training and torch.is_grad_enabled()):
            return None
        return op(hidden, tokens)

    return gated


class PreventativeSteering:
    """Steer toward a trait (or ablate it) in training forward passes only.

    Attach it to a model with `attach` (a context manager too), or give a `Trainer` its callback
    (`personascope.apply.callbacks.GuardCallback`), which attaches it for training and detaches it after.

    Args:
        vector: the trait's persona vector (`PersonaVector`, or an `[L+1, d]` tensor).
        layers: layer index or indices (HF `hidden_states` convention), or `"all"` (1..L-1).
        coef: multiplier of the vector in `steer` mode (the same units as `personascope.steer`).
        mode: `steer` adds `coef·v_l` at each layer; `ablate` projects the direction out at each layer.
        incremental: in `steer` mode over several layers, add `coef·(v_l − v_prev)` at each steered layer
            after the first (`prev` = the steered layer before it; the first gets `coef·v_l`). The residual
            stream carries what earlier layers added, so the total added by the time layer `l` is written is
            `coef·v_l`: the paper's all-layer variant, where plain addition would pile the vector up L times.

    Example:
        >>> guard = PreventativeSteering(vec, layers=20, coef=5.0)
        >>> with guard.attach(peft_model):
        ...     trainer.train()
    """

    def __init__(
        self,
        vector: PersonaVector | Tensor,
        layers: int | Sequence[int] | str,
        coef: float = 1.0,
        mode: GuardMode = "steer",
        incremental: bool = False,
    ) -> None:
        if mode not in GUARD_MODES:
            raise PersonascopeError(f"unknown guard mode {mode!r}: use steer or ablate")
        if incremental and mode != "steer":
            raise PersonascopeError("incremental applies to mode='steer' only: ablation removes each layer's own direction")
        check_number("guard coefficient", coef)
        self.vector = vector
        self.layers = layers
        self.coef = float(coef)
        self.mode = mode
        self.incremental = incremental
        self._manager: HookManager | None = None
        self._keys: list[int] = []

    @property
    def attached(self) -> bool:
        return self._manager is not None

    def operations(self, model: ModelHandle | nn.Module) -> list[tuple[int, Operation]]:
        """The checked `(layer, operation)` pairs for `model`; raises before anything is added."""
        manager = HookManager.of(model)
        module = as_module(model)
        if isinstance(self.vector, PersonaVector):
            self.vector.check_model(model)
        layers = parse_layers(self.layers, manager.num_layers, option="guard layers")
        for layer in layers:
            manager.check_layer(layer)
        rows = {layer: checked_direction(self.vector, layer, manager) for layer in layers}
        ops: list[tuple[int, Operation]] = []
        previous: int | None = None
        for layer in layers:
            if self.mode == "ablate":
                op = ablate_op(rows[layer], "all")
            else:
                row = rows[layer] - rows[previous] if self.incremental and previous is not None else rows[layer]
                op = add_op(row, self.coef, "all")
            ops.append((layer, _training_only(op, module)))
            previous = layer
        return ops

    def attach(self, model: ModelHandle | nn.Module) -> PreventativeSteering:
        """Add the guard's operations to `model` (checked first: vector fit, layers, finite values)."""
        if self.attached:
            raise PersonascopeError("this guard is already attached to a model: detach() it first")
        ops = self.operations(model)
        manager = HookManager.of(model)
        self._keys = [manager.add(layer, op) for layer, op in ops]
        self._manager = manager
        return self

    def detach(self) -> None:
        """Remove the guard's operations (a no-op when not attached)."""
        if self._manager is not None:
            for key in self._keys:
                self._manager.remove(key)
        self._manager, self._keys = None, []

    def __enter__(self) -> PreventativeSteering:
        if not self.attached:
            raise PersonascopeError("attach the guard to a model first: `with guard.attach(model):`")
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def describe(self) -> dict[str, Any]:
        """The guard's settings, for manifests and logs."""
        trait = self.vector.trait if isinstance(self.vector, PersonaVector) else None
        return {"trait": trait, "layers": self.layers, "coef": self.coef, "mode": self.mode,
                "incremental": self.incremental}
