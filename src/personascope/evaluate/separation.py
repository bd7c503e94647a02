"""Held-out separation: eval responses re-read without their system prompt and projected on the vector;
AUROC of pos vs neg per layer, and the mean residual norm that scales steering coefficients."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.hooks import HookManager, TokenContext
from personascope.inference.activations import (
    EncodedChat,
    encode,
    fit_to_context,
    read_activations,
)
from personascope.io.records import RecordLog
from personascope.model import ModelHandle
from personascope.vector import PersonaVector

_ROW_FIELDS = ("id", "split", "polarity", "question", "response")


def read_eval_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The eval-split rows of a run's `responses.jsonl` with a non-empty response, and how many were empty."""
    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"{path} does not exist: run `personascope extract` into this directory first")
    rows, empty = [], 0
    for row in RecordLog(path).rows().values():
        missing = [k for k in _ROW_FIELDS if k not in row]
        if missing:
            raise PersonascopeError(f"{path}: row {row.get('id')!r} lacks {', '.join(missing)}; rerun extract")
        if row["split"] != "eval":
            continue
        if not str(row["response"]).strip():
            empty += 1
            continue
        rows.append(row)
    return rows, empty


def plain_chats(handle: ModelHandle, rows: Sequence[dict[str, Any]]) -> list[EncodedChat]:
    """Encode `question` + `response` rows WITHOUT their system prompt (as the model is used by default)."""
    chats = [encode(handle, str(r["id"]), [{"role": "user", "content": r["question"]}], r["response"]) for r in rows]
    kept, _ = fit_to_context(handle, chats, "truncate")
    if len(kept) != len(chats):
        raise PersonascopeError("an eval question alone is longer than the model's context; shorten it")
    return kept


def eval_labels(rows: Sequence[dict[str, Any]]) -> Tensor:
    polarity = [r["polarity"] for r in rows]
    unknown = sorted(set(polarity) - {"pos", "neg"})
    if unknown:
        raise PersonascopeError(f"eval rows have polarity {unknown[0]!r}: use 'pos' or 'neg'")
    if "pos" not in polarity or "neg" not in polarity:
        raise PersonascopeError(
            f"the eval split needs pos and neg responses, found {polarity.count('pos')} pos and "
            f"{polarity.count('neg')} neg (empty responses are skipped); generate more eval rows"
        )
    return torch.tensor([p == "pos" for p in polarity])


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """Up to `k` items evenly spaced over `items` (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


@contextmanager
def _residual_norms(handle: ModelHandle, layers: Sequence[int]) -> Iterator[Callable[[], Tensor]]:
    """Meter the mean residual norm over response tokens at `layers` while the block runs; yields a reader."""
    manager = HookManager.of(handle)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def meter(index: int) -> Callable[[Tensor, TokenContext], None]:
        def op(hidden: Tensor, tokens: TokenContext) -> None:
            mask = tokens.pool_mask("response_avg", hidden.device)
            sums[index] += float(hidden.detach().float().norm(dim=-1)[mask].sum())
            counts[index] += float(mask.sum())

        return op

    keys = [manager.add(layer, meter(i)) for i, layer in enumerate(layers)]
    try:
        yield lambda: (sums / counts.clamp(min=1)).float()
    finally:
        for key in keys:
            manager.remove(key)


def scan_projections(
    handle: ModelHandle, vector: PersonaVector, chats: Sequence[EncodedChat], layers: Sequence[int], progress: bool
) -> tuple[Tensor, Tensor]:
    """One batched pass (stopping at the deepest layer): projections `[N, len(layers)]` and mean norms."""
    units = torch.stack([vector.unit(layer) for layer in layers])
    with _residual_norms(handle, layers) as norms:
        pooled = read_activations(handle, chats, layers, ("response_avg",), progress=progress,
                                  description="Held-out projections")["response_avg"]
    return torch.einsum("nld,ld->nl", pooled, units), norms()


def auroc(scores: Tensor, labels: Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), scores.numpy()))


def separation(
    handle: ModelHandle, vector: PersonaVector, eval_rows: Sequence[dict[str, Any]], layers: Sequence[int],
    *, progress: bool = False,
) -> dict[int, float]:
    """AUROC, per layer, of the pos vs neg eval responses' `response_avg` projection on the unit vector.

    Args:
        eval_rows: rows with `id`, `polarity` (pos|neg), `question` and `response`; encoded without system prompt.
        layers: layers to score (one pass, stopping at the deepest).

    Example:
        >>> separation(handle, vec, rows, [8, 12, 16])
        {8: 0.81, 12: 0.93, 16: 0.9}
    """
    vector.check_model(handle)
    labels = eval_labels(eval_rows)
    projections, _ = scan_projections(handle, vector, plain_chats(handle, eval_rows), layers, progress)
    return {layer: auroc(projections[:, i], labels) for i, layer in enumerate(layers)}
