"""The in-graph half of the plugin: per-layer persistent buffers and the forward hook that steers and reads a
vLLM decoder layer's output (the true residual stream is `hidden + residual`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PersonaBuffers(nn.Module):
    """Persistent buffers of one decoder layer: registered vectors, per-token operations, per-token readings.

    Contract of the hook (`steer_and_read`), for the `n` tokens of a step (`n` ≤ `max_tokens`):
    `vectors[K, d]` raw directions of this layer and `units[K, d]` the same scaled to length 1 (zero rows for
    free slots); `add[n, K]` coefficients; `clamp_on[n, K]` 1 where the projection on `units[k]` is set to
    `clamp_to[n, K]` (ablate = clamp to 0). The layer's output becomes `hidden + Δ` with
    `Δ = add·vectors + (clamp_on ⊙ (clamp_to − s·unitsᵀ))·units`, `s` = hidden + residual (float32), and
    `readings[n, K]` receives `(s + Δ)·unitsᵀ`. With every buffer zero the output is bit-identical to the
    layer's own. Nothing here depends on Python state, so a compiled or CUDA-graph forward reads new contents.
    Buffers are not persistent (they never enter a state dict).
    """

    def __init__(self, max_tokens: int, max_vectors: int, hidden: int, device: torch.device) -> None:
        super().__init__()

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float32, device=device)

        self.register_buffer("vectors", zeros(max_vectors, hidden), persistent=False)
        self.register_buffer("units", zeros(max_vectors, hidden), persistent=False)
        self.register_buffer("add", zeros(max_tokens, max_vectors), persistent=False)
        self.register_buffer("clamp_on", zeros(max_tokens, max_vectors), persistent=False)
        self.register_buffer("clamp_to", zeros(max_tokens, max_vectors), persistent=False)
        self.register_buffer("readings", zeros(max_tokens, max_vectors), persistent=False)

    def steer_and_read(self, hidden: Tensor, residual: Tensor) -> Tensor:
        """The steered `hidden` of a `[n, d]` step; writes this step's projections into `readings[:n]`."""
        n = hidden.shape[0]
        stream = hidden.float() + residual.float()
        projected = stream @ self.units.t()
        delta = self.add[:n] @ self.vectors + (self.clamp_on[:n] * (self.clamp_to[:n] - projected)) @ self.units
        self.readings[:n].copy_(projected + delta @ self.units.t())
        return (hidden.float() + delta).to(hidden.dtype)


def _hook(buffers: PersonaBuffers):
    def hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        hidden, residual = output
        return buffers.steer_and_read(hidden, residual), residual

    return hook


def wrap_layers(layers: list[nn.Module], max_tokens: int, max_vectors: int, hidden: int,
                device: torch.device) -> list[PersonaBuffers]:
    """Give each decoder layer a `persona` buffers child and a forward hook; returns the buffers in layer order.
    Install before vLLM's warm-up so the compiled graph includes the hook."""
    out = []
    for layer in layers:
        buffers = PersonaBuffers(max_tokens, max_vectors, hidden, device)
        layer.add_module("persona", buffers)
        layer.register_forward_hook(_hook(buffers))
        out.append(buffers)
    return out
