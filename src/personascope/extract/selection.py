"""Which (pos, neg) response pairs an extraction keeps: non-empty, and with a judge, pos scored as showing the
trait, neg as not, both coherent (the paper's filter)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from personascope.traits.plan import POLARITIES


@dataclass(frozen=True)
class PairSelection:
    """Which (pos, neg) response pairs of a split were kept, and why the others were not."""

    kept: list[tuple[dict[str, Any], dict[str, Any]]]
    total: int
    empty: int
    rejected: int



def select_pairs(
    rows: Iterable[dict[str, Any]],
    scores: dict[str, dict[str, Any]] | None,
    *,
    split: str = "extract",
    threshold: float = 50.0,
    coherence_threshold: float = 50.0,
) -> PairSelection:
    """Pair the pos and neg rows of `split` and keep the pairs fit for extraction.

    A pair with an empty response is dropped (counted in `empty`). Without `scores` (judge `none`) every other
    pair is kept; with scores, as the reference: pos trait ≥ `threshold`, neg trait < `threshold`, both coherence
    ≥ `coherence_threshold` (a missing or failed score rejects the pair).
    """
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["split"] == split:
            by_key.setdefault((row["pair"], row["question_index"], row["sample"]), {})[row["polarity"]] = row
    kept, empty, rejected, total = [], 0, 0, 0
    for key in sorted(by_key):
        pair = by_key[key]
        if set(pair) != set(POLARITIES):
            continue
        total += 1
        pos, neg = pair["pos"], pair["neg"]
        if not pos["response"].strip() or not neg["response"].strip():
            empty += 1
        elif scores is None or _passes(scores.get(pos["id"]), scores.get(neg["id"]), threshold, coherence_threshold):
            kept.append((pos, neg))
        else:
            rejected += 1
    return PairSelection(kept, total, empty, rejected)


def _passes(pos: dict[str, Any] | None, neg: dict[str, Any] | None, threshold: float, coherence: float) -> bool:
    values = [s.get(k) if s else None for s in (pos, neg) for k in ("trait", "coherence")]
    if any(v is None for v in values):
        return False
    pos_trait, pos_coherence, neg_trait, neg_coherence = values
    return pos_trait >= threshold and neg_trait < threshold and min(pos_coherence, neg_coherence) >= coherence
