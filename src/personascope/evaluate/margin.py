"""Likelihood-margin gains of steering at chosen layers and strengths, against one unsteered baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from personascope.evaluate.result import Baseline, EvalSettings
from personascope.inference.activations import EncodedChat
from personascope.inference.likelihood import response_loglik
from personascope.model import ModelHandle
from personascope.vector import PersonaVector


class MarginSweep:
    """Margin gains at chosen layers and fractions of the residual norm, against one unsteered baseline."""

    def __init__(self, handle: ModelHandle, vector: PersonaVector, pos: list[EncodedChat],
                 neg: list[EncodedChat], norms: dict[int, float], settings: EvalSettings,
                 advance: Callable[[int], None]) -> None:
        self.handle, self.vector, self.norms, self.settings = handle, vector, norms, settings
        self.chats, self.split, self.advance = [*pos, *neg], len(pos), advance
        self.results: dict[int, dict[float, tuple[float, float, float]]] = {}  # (margin, pos, neg) gains
        first = next(iter(norms))
        self.baseline = self._means(self._loglik(first, [0.0])[0])

    def _loglik(self, layer: int, coefs: list[float]) -> Tensor:
        return response_loglik(self.handle, self.vector, layer, coefs, self.chats,
                               token_budget=self.settings.token_budget, advance=self.advance)

    def _means(self, ll: Tensor) -> Baseline:
        pos, neg = float(ll[: self.split].mean()), float(ll[self.split:].mean())
        return Baseline(pos, neg, pos - neg)

    def coef(self, layer: int, fraction: float) -> float:
        return fraction * self.norms[layer] / float(self.vector.directions[layer].norm())

    def measure(self, layer: int, fractions: Sequence[float]) -> None:
        todo = [f for f in fractions if f not in self.results.get(layer, {})]
        if not todo:
            return
        ll = self._loglik(layer, [self.coef(layer, f) for f in todo])
        for k, fraction in enumerate(todo):
            m, b = self._means(ll[k]), self.baseline
            self.results.setdefault(layer, {})[fraction] = (m.margin - b.margin, m.pos_ll - b.pos_ll,
                                                            m.neg_ll - b.neg_ll)

    def gain(self, layer: int) -> float | None:
        entry = self.results.get(layer, {}).get(self.settings.fraction)
        return None if entry is None else entry[0]

    def search(self, grid: Sequence[int], eligible: Sequence[int], refine: bool) -> int:
        """Measure `grid` (then the neighbours of its best when `refine`); the eligible layer with the top gain."""
        for layer in grid:
            self.measure(layer, [self.settings.fraction])
        best = max((l for l in eligible if self.gain(l) is not None), key=lambda l: self.gain(l) or 0.0)
        if not refine:
            return best
        for layer in (best - 1, best + 1):
            if layer in eligible:
                self.measure(layer, [self.settings.fraction])
        return max((l for l in eligible if self.gain(l) is not None), key=lambda l: self.gain(l) or 0.0)
