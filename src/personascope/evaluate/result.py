"""The evaluation's result as typed dataclasses: what `eval.json` holds (docs/ARCHITECTURE.md documents the shape)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError


@dataclass(frozen=True)
class EvalSettings:
    """Knobs of an evaluation; the defaults keep the embedded model's run to a few minutes on a CPU.

    Attributes:
        margin_pairs: pos and neg responses (each) scored for the likelihood margin, spread over the eval rows.
        margin_tokens: leading response tokens scored per response.
        fraction: the fraction of the residual norm at which every candidate layer's margin gain is measured.
        fractions: steering strengths (fractions of the residual norm) on the chosen layer's curve.
        grid_size: about how many layers get a margin measurement before refining around the best.
        curve_questions: held-out questions answered (`default_decoding`) plainly, under the trait's positive
            system prompts and at each strength, from the part that chose the layer; as many from the report part
            compare steering at the chosen strength with prompting.
        curve_max_new_tokens: tokens per answer on the curve.
        examples: curve questions shown in the report with their plain, chosen-strength and prompted answers.
        token_budget: padded tokens per teacher-forced batch (logits are kept only for response positions).
        split_seed: seed of the split of the held-out questions into a selection and a report part.
        bootstrap: resamples of the report part's rows for the AUROC interval, and of the questions for the
            intervals of trait expression and relevance.
        engine: what generates the curve's answers: `hf` or `vllm` (steered on vLLM's workers).
    """

    margin_pairs: int = 8
    margin_tokens: int = 48
    fraction: float = 0.5
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75)
    grid_size: int = 10
    curve_questions: int = 10
    curve_max_new_tokens: int = 48
    examples: int = 3
    token_budget: int = 2048
    split_seed: int = 0
    bootstrap: int = 1000
    engine: str = "hf"


@dataclass(frozen=True)
class LayerEval:
    """One candidate layer: held-out AUROC on the selection and report parts, margin gain, scale."""

    layer: int
    auroc: float
    report_auroc: float | None
    margin_gain: float | None
    fraction: float
    coef: float
    residual_norm: float
    vector_norm: float
    eligible: bool


@dataclass(frozen=True)
class Estimate:
    """A mean over questions with its 95% bootstrap interval over them (None where it cannot be measured)."""

    value: float | None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Quality:
    """Judge-free measures of one set of answers to held-out questions (`evaluate.quality` computes them).

    `trait`: trait expression, 0 = the plain answers (no system prompt), 1 = the answers given under the trait's
    positive system prompts: the smaller of `vs_opposite` (log-likelihood under the positive minus the negative
    system prompts) and `vs_role_play` (positive prompts minus unrelated role-play prompts), each calibrated so.
    `relevance`: the chance that the answer's own question, rather than one of a few other questions, was asked
    (whole-answer log-likelihood given each, softmaxed), as a share of the plain answers'. `fluency`: mean
    per-token log-likelihood under the trait's positive system prompts; `fluency_loss`: how much lower it is than
    the plain answers'. `distinct_2`, `distinct_3`: distinct word bigrams/trigrams over all, mean over answers;
    `loop_answers`: answers with a word n-gram repeated `LOOP_REPEATS` times in a row; `longest_loop`: the most
    consecutive repeats; `empty`: empty answers.
    """

    trait: Estimate
    vs_opposite: float | None
    vs_role_play: float | None
    relevance: Estimate
    fluency: float | None
    fluency_loss: float | None
    distinct_2: float
    distinct_3: float
    loop_answers: int
    longest_loop: int
    empty: int


@dataclass(frozen=True)
class Judgement:
    """A judge's mean trait, coherence and relevance scores (0-100) of a set of answers; how many were scored
    and how many requests failed."""

    trait: float | None
    coherence: float | None
    relevance: float | None
    judged: int
    failed: int


@dataclass(frozen=True)
class CurvePoint:
    """One steering strength at the chosen layer.

    `margin_gain`, `pos_gain`, `neg_gain`: nats per token, teacher-forced, against no steering. `quality`: the
    answers' trait expression, relevance and fluency; `kept`: whether it stays within every floor (`failures`
    names those it broke); `judgement`, `judge_kept`: the same by a judge (None without one).
    """

    fraction: float
    coef: float
    margin_gain: float
    pos_gain: float
    neg_gain: float
    quality: Quality
    kept: bool
    failures: list[str]
    judgement: Judgement | None = None
    judge_kept: bool | None = None


@dataclass(frozen=True)
class Comparison:
    """Steering at the chosen strength beside prompting, on the report part's questions (not those that chose):
    `plain` (no system prompt), `steered`, `prompted` (the trait's positive system prompts)."""

    questions: list[str]
    plain: Quality
    steered: Quality
    prompted: Quality


@dataclass(frozen=True)
class Agreement:
    """How the judge-free and the judged choices agree: the same strength or not, and Spearman correlations over
    the curve's answers between judged trait and trait expression, and judged relevance and relevance."""

    same_choice: bool
    trait_spearman: float | None
    relevance_spearman: float | None
    answers: int


@dataclass(frozen=True)
class Choice:
    """The strength each rule picked (None: none qualified): judge-free by `evaluate.quality`'s floors, and by a
    judge's scores when there is one; `agreement` between them (with a judge)."""

    balance_fraction: float | None
    judge_fraction: float | None = None
    agreement: Agreement | None = None


@dataclass(frozen=True)
class Validation:
    """How the held-out rows were used: one part (by question) chose the layer, the other reports its AUROC."""

    split: str
    seed: int
    select_questions: list[str]
    report_questions: list[str]
    select_rows: int
    report_rows: int
    auroc: float | None
    auroc_low: float | None
    auroc_high: float | None
    resamples: int


@dataclass(frozen=True)
class Baseline:
    """Unsteered mean per-token log-likelihood of the margin's pos and neg responses, and their difference."""

    pos_ll: float
    neg_ll: float
    margin: float


@dataclass(frozen=True)
class Projections:
    """Projections of the report part's pos and neg responses on the unit vector at `layer`."""

    layer: int
    pos: list[float]
    neg: list[float]


@dataclass(frozen=True)
class Example:
    """A held-out question answered without steering, with steering at the chosen layer and coefficient, and
    under one of the trait's positive system prompts."""

    question: str
    unsteered: str
    steered: str
    prompted: str


@dataclass
class Evaluation:
    """A validated vector: the choice (`best_layer`, `best_coef`), how it was made and everything measured."""

    trait: str
    model: str
    judge: str
    best_layer: int
    best_coef: float
    best_fraction: float
    coef_source: str
    rule: str
    notes: list[str]
    validation: Validation
    baseline: Baseline
    layers: list[LayerEval]
    curve: list[CurvePoint]
    prompted: Quality
    choice: Choice
    comparison: Comparison
    projections: Projections
    examples: list[Example]
    counts: dict[str, int]
    settings: EvalSettings
    timings: dict[str, float]
    prompted_judgement: Judgement | None = None
    vector: str | None = None

    def layer(self, layer: int) -> LayerEval | None:
        """The entry of `layer`, or None when it was not evaluated."""
        return next((e for e in self.layers if e.layer == layer), None)

    @property
    def best(self) -> LayerEval:
        """The entry of the chosen layer."""
        entry = self.layer(self.best_layer)
        if entry is None:
            raise PersonascopeError(f"the evaluation has no entry for its best layer {self.best_layer}")
        return entry

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """Read an `eval.json` written by `evaluate_run`; a clear error for one of another shape."""
        path = Path(path)
        try:
            return _build(cls, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise PersonascopeError(f"cannot read {path} ({exc}); rerun `personascope evaluate` on the run") from None


def _build(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as an instance of the annotated type `kind` (dataclasses, lists, optionals)."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"unknown field {sorted(unknown)[0]!r} of {kind.__name__}")
        return kind(**{k: _build(hints[k], v) for k, v in value.items()})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _build(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_build(args[0], v) for v in value)
    return value
