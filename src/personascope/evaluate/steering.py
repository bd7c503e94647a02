"""Steered generation for evaluation: answers steered at a layer, and a judge's view of them."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

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
    sampling: SamplingConfig | None = None,
    progress: bool = True,
) -> list[str]:
    """Answers to `questions` (no system prompt), steered at `layer` by `coef` when a vector is given; greedy
    with `max_new_tokens` unless `sampling` says otherwise."""
    requests = [(f"q{i:03d}", handle.chat_ids([{"role": "user", "content": q}])) for i, q in enumerate(questions)]
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
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


@dataclass(frozen=True)
class Judged:
    """A judge's mean trait and coherence scores (0-100) of some answers, how many were scored and failed."""

    trait: float | None
    coherence: float | None
    scored: int
    failed: int

    def keeps_coherence(self, min_coherence: float = MIN_COHERENCE) -> bool:
        return self.coherence is not None and self.coherence >= min_coherence


def judge_answers(judge: Judge, trait: TraitSpec, questions: Sequence[str], answers: Sequence[str], *,
                  progress: bool = True) -> Judged:
    """Score (question, answer) pairs for the trait and for coherence, as the paper's steering curve does."""
    pairs = list(zip(questions, answers))
    trait_scores = judge_trait(judge, trait, pairs, progress=progress)
    coherence = judge_coherence(judge, pairs, progress=progress)
    return Judged(mean_score([r.score for r in trait_scores]), mean_score([r.score for r in coherence]),
                  sum(r.score is not None for r in trait_scores),
                  sum(r.error is not None for r in [*trait_scores, *coherence]))
