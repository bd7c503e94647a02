"""Steered generation for evaluation: greedy answers steered at a layer, and the judged steering curve."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from personascope.errors import PersonascopeError
from personascope.hooks import steer
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.judge.judges import Judge, judge_coherence, judge_trait
from personascope.model import ModelHandle
from personascope.traits import TraitSpec
from personascope.vector import PersonaVector

MIN_COHERENCE = 75.0
"""Mean judged coherence a steering coefficient must keep (the paper's cut-off)."""


def steered_answers(
    handle: ModelHandle,
    questions: Sequence[str],
    *,
    vector: PersonaVector | None = None,
    layer: int | None = None,
    coef: float = 0.0,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to `questions` (no system prompt), steered at `layer` by `coef` when a vector is given."""
    requests = [(f"q{i:03d}", handle.chat_ids([{"role": "user", "content": q}])) for i, q in enumerate(questions)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    if vector is None:
        steering, label = nullcontext(), "Unsteered answers"
    elif layer is None:
        raise PersonascopeError("steered answers need the layer to steer at")
    else:
        steering = steer(handle, vector, layer, coef, "response")
        label = f"Steered answers (layer {layer}, coef {coef:.3g})"
    with steering:
        results = generate_responses(handle, requests, sampling, progress=progress, description=label)
    return [r.text for r in results]


def mean_score(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def steering_curve(
    handle: ModelHandle,
    vector: PersonaVector,
    trait: TraitSpec,
    judge: Judge,
    layer: int,
    coefs: Sequence[float],
    *,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The paper's steering curve: for each coefficient, greedy answers to the trait's eval questions steered at
    `layer`, judged for the trait and for coherence. Returns `[{coef, trait, coherence, scored, failed}]`."""
    questions = list(trait.eval_questions)
    curve = []
    for coef in coefs:
        answers = steered_answers(handle, questions, vector=vector, layer=layer, coef=coef,
                                  max_new_tokens=max_new_tokens, progress=progress)
        pairs = list(zip(questions, answers))
        trait_scores = judge_trait(judge, trait, pairs, progress=progress)
        coherence = judge_coherence(judge, pairs, progress=progress)
        curve.append({
            "coef": float(coef),
            "trait": mean_score([r.score for r in trait_scores]),
            "coherence": mean_score([r.score for r in coherence]),
            "scored": sum(r.score is not None for r in trait_scores),
            "failed": sum(r.error is not None for r in [*trait_scores, *coherence]),
        })
    return curve


def best_judged(curve: Sequence[dict[str, Any]], min_coherence: float = MIN_COHERENCE) -> dict[str, Any] | None:
    """The curve point with the highest trait score among those with mean coherence ≥ `min_coherence`."""
    kept = [p for p in curve if p["trait"] is not None and p["coherence"] is not None
            and p["coherence"] >= min_coherence]
    return max(kept, key=lambda p: (p["trait"], -abs(p["coef"]))) if kept else None
