"""Contrastive chats: a trait's questions under its pos and neg system prompts, as rows with stable ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personascope.traits.spec import TraitSpec

SPLITS = ("extract", "eval")
POLARITIES = ("pos", "neg")


def row_id(split: str, polarity: str, pair: int, question: int, sample: int) -> str:
    """The stable id of one response row, e.g. `extract/pos/p2/q07/s0`."""
    return f"{split}/{polarity}/p{pair}/q{question:02d}/s{sample}"


def plan_rows(spec: TraitSpec, *, samples: int = 1, eval_pairs: int = 2, eval_samples: int = 1,
              splits: Sequence[str] = SPLITS) -> list[dict[str, Any]]:
    """Every contrastive chat a run answers (rows without `response`), in a fixed order.

    `extract`: each extraction question under every system-prompt pair, `samples` times per polarity; `eval`:
    each evaluation question under the first `eval_pairs` pairs, `eval_samples` times per polarity.
    """
    grids = {
        "extract": (spec.instruction, spec.extract_questions, samples),
        "eval": (spec.instruction[:eval_pairs], spec.eval_questions, eval_samples),
    }
    grids = {split: grids[split] for split in splits}
    rows = []
    for split, (pairs, questions, samples) in grids.items():
        for p, pair in enumerate(pairs):
            for q, question in enumerate(questions):
                for s in range(samples):
                    for polarity, system in (("pos", pair.pos), ("neg", pair.neg)):
                        rows.append({"id": row_id(split, polarity, p, q, s), "split": split, "polarity": polarity,
                                     "pair": p, "question_index": q, "sample": s, "system": system,
                                     "question": question})
    return rows
