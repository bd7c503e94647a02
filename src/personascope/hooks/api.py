"""What users call: `steer` (add / ablate / clamp along a vector), `capture` (pooled activations), `run_forward`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from personascope.errors import InputError, PersonascopeError
from personascope.hooks.manager import (
    SCOPES,
    HookHandle,
    HookManager,
    Operation,
    Scope,
    StopForward,
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
)
from personascope.io.checks import check_number
from personascope.model import ModelHandle, as_module


def steer(
    model: ModelHandle | nn.Module,
    vector: Directions | Tensor,
    layer: int | Sequence[int],
    coef: float | Tensor = 1.0,
    scope: Scope = "response",
    *,
    mode: Literal["add", "ablate", "clamp"] = "add",
    value: float = 0.0,
    prompt_lengths: Sequence[int] | Tensor | None = None,
) -> HookHandle:
    """Steer `model` along `vector` at one or more layers, from now until the handle is removed.

    Args:
        model: a `ModelHandle` or a bare HF causal LM.
        vector: a `PersonaVector`, an `[L+1, d]` tensor (row `l` used at layer `l`) or a `[d]` tensor.
        layer: layer index or indices (HF `hidden_states` convention).
        coef: multiplier for `add`: a float, or a `[B]` tensor with one coefficient per row of the batch.
        scope: `prompt`, `response` or `all` tokens.
        mode: `add` (h + coef·v), `ablate` (remove the projection on v/|v|), `clamp` (set it to `value`).
        value: the projection `clamp` sets.
        prompt_lengths: prompt length per row, for teacher-forced passes over prompt + response. In
            `generate()` it is found from the first (prefill) call.

    Example:
        >>> with steer(handle, vec, layer=20, coef=4.0):
        ...     out = handle.model.generate(ids, max_new_tokens=40)
    """
    if scope not in SCOPES:
        raise PersonascopeError(f"unknown token scope {scope!r}: use one of {', '.join(SCOPES)}")
    if isinstance(coef, Tensor):
        if not bool(torch.isfinite(coef).all()):
            raise InputError("coef holds NaN or infinite values")
    else:
        check_number("coef", coef)
    check_number("value", value)
    manager = HookManager.of(model)
    layers = [layer] if isinstance(layer, int) else list(layer)
    ops: list[tuple[int, Operation, str]] = []
    for l in layers:
        manager.check_layer(l)
        direction = checked_direction(vector, l, manager)
        if mode == "add":
            ops.append((l, add_op(direction, coef, scope), "residual"))
        elif mode == "ablate":
            ops.append((l, ablate_op(direction, scope), "residual"))
        elif mode == "clamp":
            ops.append((l, clamp_op(direction, value, scope), "residual"))
        else:
            raise PersonascopeError(f"unknown steering mode {mode!r}: use add, ablate or clamp")
    manager, keys, lengths_key = add_ops(model, ops, prompt_lengths)
    return HookHandle(manager, keys, lengths_key)


# -- capture --------------------------------------------------------------------------------------------


class Capture(HookHandle):
    """Pooled activations at chosen layers, summed over every forward call while active.

    `mean(pool)` returns `[B, len(layers), d]` float32 (rows with no token in the pool are zero);
    `sums` and `counts` hold the running sums, so nothing per token is kept. Sums are float32 whatever the
    model's dtype; each layer's sum is made on that layer's device and kept on the first layer's device.
    """

    def __init__(self, manager: HookManager, layers: list[int], pools: list[str]) -> None:
        super().__init__(manager, [])
        self.layers = layers
        self.pools = pools
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def _accumulate(self, index: int) -> Operation:
        def op(hidden: Tensor, tokens: TokenContext) -> None:
            values = hidden.detach().float()
            for pool in self.pools:
                mask = tokens.pool_mask(pool, hidden.device)
                summed = torch.einsum("bt,btd->bd", mask.float(), values)
                if pool not in self.sums:
                    batch, width = summed.shape
                    self.sums[pool] = torch.zeros(batch, len(self.layers), width, device=hidden.device)
                    self.counts[pool] = torch.zeros(batch, len(self.layers), device=hidden.device)
                home = self.sums[pool].device
                self.sums[pool][:, index] += summed.to(home, non_blocking=True)
                self.counts[pool][:, index] += mask.sum(-1).to(home, non_blocking=True)
            return None

        return op

    def mean(self, pool: str = "response_avg") -> Tensor:
        if pool not in self.sums:
            raise PersonascopeError(f"nothing was captured for {pool!r}: captured pools are {self.pools}")
        return self.sums[pool] / self.counts[pool].clamp(min=1)[..., None]


def capture(
    model: ModelHandle | nn.Module,
    layers: int | Sequence[int],
    pools: str | Sequence[str] = ("response_avg",),
    *,
    prompt_lengths: Sequence[int] | Tensor | None = None,
    stop_after: bool = False,
) -> Capture:
    """Capture pooled activations at `layers` (HF `hidden_states` indices) until the handle is removed.

    Args:
        pools: any of `response_avg`, `prompt_avg`, `prompt_last`.
        prompt_lengths: prompt length per row when the input holds prompt + response.
        stop_after: end forward passes after the deepest hooked layer (call the model with `run_forward`).

    Example:
        >>> with capture(handle, [10, 20], "response_avg", prompt_lengths=lens) as cap:
        ...     run_forward(handle, input_ids=ids, attention_mask=mask)
        >>> cap.mean("response_avg").shape  # [B, 2, d]
    """
    manager = HookManager.of(model)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    pool_list = check_pools([pools] if isinstance(pools, str) else pools)
    cap = Capture(manager, layer_list, pool_list)
    ops = [(layer, cap._accumulate(i), "read") for i, layer in enumerate(layer_list)]
    manager, cap._keys, cap._prompt_lengths = add_ops(model, ops, prompt_lengths)
    if stop_after:
        cap._keys.append(manager.add_stop())
    return cap


def run_forward(model: ModelHandle | nn.Module, **inputs: Any) -> Any:
    """Call the model with `inputs` under `inference_mode`, returning None when a hook stopped it early."""
    module = as_module(model)
    with torch.inference_mode():
        try:
            return module(**inputs, use_cache=False)
        except StopForward:
            return None
