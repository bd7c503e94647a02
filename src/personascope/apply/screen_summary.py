"""Screening results at a glance: ΔP statistics, the top rows, the filter cutoff and the histogram."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personascope.errors import PersonascopeError
from personascope.io.data import BadRow, ChatSample
from personascope.io.files import atomic_write

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
TOP_EXAMPLES = 10


@dataclass(frozen=True)
class RowScore:
    """The readings of one sample."""

    id: str
    projection: float
    base_projection: float

    @property
    def delta_p(self) -> float:
        return self.projection - self.base_projection


@dataclass(frozen=True)
class Screening:
    """Scores in dataset order, the rows left out (with reasons) and the ids whose text was cut to fit."""

    scores: list[RowScore]
    skipped: list[BadRow]
    truncated: list[str]


@dataclass(frozen=True)
class DeltaStats:
    """Mean, spread, range and percentiles (keys "1", "5", …, "99") of ΔP."""

    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[str, float]


@dataclass(frozen=True)
class TopRow:
    """One of the rows with the highest ΔP, with the start of its prompt and response."""

    id: str
    delta_p: float
    projection: float
    base_projection: float
    prompt: str
    response: str


@dataclass(frozen=True)
class FilterResult:
    """The filtered dataset: the top `top_percent` % by ΔP and/or the rows with ΔP ≥ `keep_below` removed (all
    with ΔP ≥ `cutoff`; `n_removed` of them); `n_kept` input rows written, `n_dropped` left out in all (unscored
    rows too)."""

    top_percent: float | None
    n_removed: int
    cutoff: float | None
    path: str
    keep_below: float | None = None
    n_kept: int = 0
    n_dropped: int = 0


@dataclass(frozen=True)
class ScreenSummary:
    """A screening run at a glance (written as `<out>.summary.json`)."""

    data: str
    model: str
    trait: str
    layer: int
    base: str
    n_rows: int
    n_scored: int
    n_skipped: int
    n_truncated: int
    delta_p: DeltaStats
    projection_mean: float
    base_projection_mean: float
    top: list[TopRow]
    filter: FilterResult | None = None


def summarize(screening: Screening, samples: Sequence[ChatSample], *, data: str, model: str, trait: str, layer: int,
              base: str, n_rows: int, top: int = TOP_EXAMPLES) -> ScreenSummary:
    """Mean, spread and percentiles of ΔP, mean readings, and the `top` samples by ΔP."""
    delta = np.array([s.delta_p for s in screening.scores])
    if delta.size == 0:
        raise PersonascopeError("no sample could be scored: see the skipped rows and their reasons")
    by_id = {s.id: s for s in samples}
    ranked = sorted(screening.scores, key=lambda s: -s.delta_p)[:top]
    return ScreenSummary(
        data=data, model=model, trait=trait, layer=layer, base=base, n_rows=n_rows,
        n_scored=int(delta.size),
        n_skipped=len(screening.skipped),
        n_truncated=len(screening.truncated),
        delta_p=DeltaStats(float(delta.mean()), float(delta.std()), float(delta.min()), float(delta.max()),
                           {str(p): float(np.percentile(delta, p)) for p in PERCENTILES}),
        projection_mean=float(np.mean([s.projection for s in screening.scores])),
        base_projection_mean=float(np.mean([s.base_projection for s in screening.scores])),
        top=[TopRow(s.id, s.delta_p, s.projection, s.base_projection, _last_user(by_id[s.id])[:200],
                    by_id[s.id].response[:300]) for s in ranked],
    )


def _last_user(sample: ChatSample) -> str:
    return next((m["content"] for m in reversed(sample.prompt) if m["role"] == "user"), "")


def top_ids(scores: Sequence[RowScore], percent: float) -> tuple[set[str], float]:
    """The ids of the top `percent` % of rows by ΔP (rounded up; ties by dataset order) and the lowest ΔP
    among them."""
    if not 0 < percent < 100:
        raise PersonascopeError(f"top percentage must be between 0 and 100 (exclusive), got {percent}")
    count = math.ceil(len(scores) * percent / 100)
    ranked = sorted(scores, key=lambda s: -s.delta_p)[:count]
    return {s.id for s in ranked}, ranked[-1].delta_p


def plot_histogram(delta: Sequence[float], path: Path, title: str, cutoff: float | None = None) -> Path:
    """A histogram of ΔP as a PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(delta, bins=max(10, min(60, len(delta) // 10)), color="#4c72b0")
    axes.axvline(0.0, color="black", linewidth=0.8)
    if cutoff is not None:
        axes.axvline(cutoff, color="#c44e52", linestyle="--", label=f"filter cutoff ΔP ≥ {cutoff:.3g}")
        axes.legend()
    axes.set(title=title, xlabel="ΔP = projection − base projection", ylabel="samples")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
