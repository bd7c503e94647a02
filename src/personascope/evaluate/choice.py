"""Honest choices: held-out rows split by question into a part that chooses and a part that reports (with a
bootstrap interval), the layers to measure, and the rules that pick the steering strength."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from personascope.evaluate.result import CurvePoint
from personascope.evaluate.separation import auroc

SELECT_SHARE = 0.5
"""Share of the held-out questions whose rows choose the layer; the rest report its AUROC."""


@dataclass(frozen=True)
class RowSplit:
    """Row indices of the selection and report parts and their questions; `shared` when both are all rows
    (fewer than two questions, or a part without pos or neg rows)."""

    select: list[int]
    report: list[int]
    select_questions: list[str]
    report_questions: list[str]
    shared: bool


def split_by_question(rows: Sequence[dict[str, Any]], seed: int, share: float = SELECT_SHARE) -> RowSplit:
    """Shuffle the distinct questions (seeded), give the first `share` to selection and the rest to report, so no
    question has rows on both sides."""
    questions = sorted({str(r["question"]) for r in rows})
    random.Random(seed).shuffle(questions)
    k = min(len(questions) - 1, max(1, round(len(questions) * share)))
    chosen = set(questions[:k])
    select = [i for i, r in enumerate(rows) if r["question"] in chosen]
    report = [i for i, r in enumerate(rows) if r["question"] not in chosen]

    def both(part: list[int]) -> bool:
        return {rows[i]["polarity"] for i in part} >= {"pos", "neg"}

    if len(questions) < 2 or not both(select) or not both(report):
        everything = list(range(len(rows)))
        return RowSplit(everything, everything, questions, questions, True)
    return RowSplit(select, report, sorted(chosen), sorted(set(questions) - chosen), False)


def bootstrap_auroc(scores: Tensor, labels: Tensor, resamples: int, seed: int) -> tuple[float | None, float | None]:
    """A 95% percentile interval of AUROC over `resamples` resamplings of the rows (None without enough)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        picked = labels[index]
        if bool(picked.all()) or not bool(picked.any()):
            continue
        values.append(auroc(scores[index], picked))
    if len(values) < 10:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def margin_grid(candidates: list[int], aurocs: dict[int, float], default: bool, size: int) -> tuple[list[int], bool]:
    """The layers whose margin is measured first, and whether to refine around the best of them.

    Explicitly chosen layers are all measured; by default every `stride`-th layer (about `size` of them) and
    the best-AUROC layer, then the neighbours of the best (so with stride 3 every layer near it is measured).
    """
    if not default:
        return candidates, False
    stride = max(1, math.ceil(len(candidates) / size))
    return sorted({*candidates[::stride], max(candidates, key=aurocs.__getitem__)}), stride > 1


def choose_by_balance(curve: Sequence[CurvePoint]) -> CurvePoint | None:
    """The judge-free choice, from a curve that starts with the unsteered point: among the strengths that keep
    every floor of `evaluate.quality`, the one with the highest trait expression above 0 (ties to the weaker).
    Where trait expression was measured at no strength (the trait's prompts move neither contrast), the margin
    gain ranks them instead: how much steering favours the trait-positive responses over the negative ones.
    None when no strength qualifies."""
    steered = curve[1:]
    measured = any(p.quality.trait.value is not None for p in steered)

    def score(point: CurvePoint) -> float:
        return (point.quality.trait.value or 0.0) if measured else point.margin_gain

    kept = [p for p in steered if p.kept and score(p) > 0]
    return max(kept, key=lambda p: (score(p), -p.fraction)) if kept else None


def choose_by_judge(curve: Sequence[CurvePoint]) -> CurvePoint | None:
    """The judged choice: among the strengths whose judged coherence and relevance keep their floors
    (`judge_kept`), the highest judged trait score above the unsteered answers' (ties to the weaker)."""
    plain = curve[0].judgement
    base = plain.trait if plain is not None and plain.trait is not None else -math.inf
    kept = [p for p in curve[1:] if p.judge_kept and p.judgement is not None and p.judgement.trait is not None
            and p.judgement.trait > base]
    return max(kept, key=lambda p: (p.judgement.trait, -p.fraction)) if kept else None  # type: ignore[union-attr]
