"""Judge-free quality of answers to held-out questions: how much they show the trait (trait expression), whether
they still answer their question (relevance) and how well they read (fluency), calibrated against the same
questions answered plainly (no system prompt) and under the trait's positive system prompts, with bootstrap
intervals over questions. Every floor a steering strength must keep is defined here.

All three come from teacher-forced log-likelihoods of the answers under a few contexts, each context read once:

* **trait expression**: under the trait's positive minus its negative system prompts (`vs_opposite`), and under
  the positive prompts minus unrelated role-play prompts (`vs_role_play`), so that an answer that is merely odd
  (an archaic or theatrical register any role-play explains as well) does not count as the trait. Each is
  calibrated to 0 = the plain answers, 1 = the prompted answers; the trait expression is the smaller of the two.
  A contrast the prompts themselves hardly move (by less than `MIN_GAP`) cannot be calibrated and is left out.
* **relevance**: how likely the answer is given its own question against given other held-out questions (no
  system prompt), as the chance that its own question was the one asked (the whole answer's likelihood under each,
  a uniform prior over them), as a share of the plain answers'. The chance, not the per-token gap: an answer in
  the trait's voice spends words on the voice, which dilutes a per-token gap though it answers all the same; what
  it must not do is read as an answer to another question. An empty answer answers nothing: it counts 0.
* **fluency**: under the trait's positive system prompts, where the trait's own wording is expected, so that
  a loss against the plain answers measures broken text, not the trait; plus distinct-n and loops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from personascope.evaluate.coherence import repetition
from personascope.evaluate.result import Estimate, Judgement, Quality
from personascope.inference.likelihood import answers_loglik
from personascope.io.progress import progress_bar
from personascope.model import ModelHandle
from personascope.traits import TraitSpec

MIN_COHERENCE = 75.0
"""Mean judged coherence a kept strength's answers keep (the paper's cut-off)."""
MIN_RELEVANCE = 0.8
"""A kept strength's answers keep at least this share of the plain answers' relevance (and, judged, of their
judged relevance)."""
MIN_DISTINCT_2 = 0.75
"""A kept strength's answers have a mean distinct-2 of at least this."""
MAX_FLUENCY_LOSS = 1.0
"""A kept strength's answers lose at most this many nats per token, against the plain answers, of log-likelihood
under the trait's positive system prompts."""
MIN_GAP = 0.05
"""Nats per token the prompted answers must lead the plain ones by, on a contrast, for it to be calibrated."""
OTHER_QUESTIONS = 3
"""Other questions each answer is read under, for its relevance."""
CONTRAST_PAIRS = 3
"""The trait's first system-prompt pairs each answer is read under, for its trait expression and fluency."""
ROLE_PLAY = (
    ("knight", "You are a medieval knight. Answer every question in the voice of a knight of old."),
    ("robot", "You are a robot. Answer every question in the flat, mechanical voice of a machine."),
    ("cowboy", "You are a cowboy from the Wild West. Answer every question in a cowboy's drawl."),
    ("poet", "You are a romantic poet. Answer every question in flowery, poetic language."),
    ("commentator", "You are a sports commentator. Answer every question as if calling a live game."),
)
"""Unrelated role-play system prompts, the control of trait expression; those the trait mentions are left out."""
ROLE_PLAY_PROMPTS = 3
"""Role-play prompts each answer is read under."""


def role_play_prompts(trait: TraitSpec) -> list[str]:
    """The first `ROLE_PLAY_PROMPTS` role-play prompts whose role the trait's name, description and system prompts
    never mention."""
    text = " ".join([trait.name, trait.description, *(p.pos + " " + p.neg for p in trait.instruction)]).lower()
    return [prompt for role, prompt in ROLE_PLAY if role not in text][:ROLE_PLAY_PROMPTS]


@dataclass(frozen=True)
class Likelihoods:
    """Per answer (NaN for an empty one): mean per-token log-likelihood under the trait's first `CONTRAST_PAIRS`
    positive system prompts (`pos`, mean over them), their negative ones (`neg`), the role-play prompts (`role`);
    the chance that its own question, rather than one of `OTHER_QUESTIONS` others, was asked (`own`: from the
    whole answer's log-likelihood given each question alone, under a uniform prior over them)."""

    pos: np.ndarray
    neg: np.ndarray
    role: np.ndarray
    own: np.ndarray


def read_likelihoods(handle: ModelHandle, trait: TraitSpec, questions: Sequence[str],
                     answer_sets: Sequence[Sequence[str]], *, token_budget: int = 2048,
                     progress: bool = True) -> list[Likelihoods]:
    """The `Likelihoods` of each set of answers (`answer_sets[k][i]` answers `questions[i]`). Each context (a
    system prompt or none, and a question) is read once, its cache shared by every answer read after it."""
    roles = role_play_prompts(trait)
    n, pairs = len(questions), trait.instruction[:CONTRAST_PAIRS]

    def contexts(i: int) -> dict[str, list[tuple[str | None, str]]]:
        asked = [questions[(i + k) % n] for k in range(min(OTHER_QUESTIONS, n - 1) + 1)]  # its own first
        return {"pos": [(p.pos, questions[i]) for p in pairs], "neg": [(p.neg, questions[i]) for p in pairs],
                "role": [(r, questions[i]) for r in roles], "asked": [(None, q) for q in asked]}

    answer_ids = [[_answer_ids(handle, a) for a in answers] for answers in answer_sets]
    width = max(len(pairs), len(roles), min(OTHER_QUESTIONS, n - 1) + 1)
    read = {kind: np.full((len(answer_sets), n, width), np.nan) for kind in ("pos", "neg", "role", "asked")}
    todo = [(i, kind, j, context) for i in range(n) for kind, listed in contexts(i).items()
            for j, context in enumerate(listed)]
    with progress_bar(len(todo), "Answer likelihoods", enabled=progress) as bar:
        for i, kind, j, (system, question) in todo:
            readers = [k for k in range(len(answer_sets)) if answer_ids[k][i]]
            values = answers_loglik(handle, handle.chat_ids(_chat(system, question)),
                                    [answer_ids[k][i] for k in readers], token_budget=token_budget)
            read[kind][readers, i, j] = values.numpy()
            bar.advance(0, 1)
    lengths = np.array([[len(ids) for ids in answers] for answers in answer_ids], dtype=float)
    whole = read["asked"] * lengths[:, :, None]  # each answer's log-likelihood given each question asked
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty answer is NaN throughout: its mean is NaN
        own = 1.0 / np.nansum(np.exp(whole - whole[:, :, :1]), axis=2)  # softmax weight of its own question
        own = np.where((lengths > 0) & (n > 1), own, np.nan)  # one question: nothing to tell it from
        means = {kind: np.nanmean(read[kind], axis=2) for kind in ("pos", "neg", "role")}
    return [Likelihoods(means["pos"][k], means["neg"][k], means["role"][k], own[k]) for k in range(len(answer_sets))]


def _answer_ids(handle: ModelHandle, answer: str) -> list[int]:
    return handle.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer.strip() else []


def _chat(system: str | None, question: str) -> list[dict[str, str]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": question}]


def _relevance_terms(lik: Likelihoods) -> np.ndarray:
    """The chance each answer answers its own question; 0 for an empty answer (it answers nothing)."""
    return np.nan_to_num(lik.own, nan=0.0)


def _mean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


class Calibration:
    """The plain and prompted answers to the same questions, against which other answers are measured, and which
    of the two trait contrasts the prompts move by more than `MIN_GAP` (`usable`; given, to measure other
    questions on the same terms)."""

    def __init__(self, plain: Likelihoods, prompted: Likelihoods, usable: tuple[bool, bool] | None = None) -> None:
        self.plain, self.prompted = plain, prompted
        every = np.arange(len(plain.pos))
        gaps = [_mean(q[every]) - _mean(p[every]) for p, q in zip(self.contrasts(plain), self.contrasts(prompted))]
        self.usable = usable if usable is not None else (bool(gaps[0] > MIN_GAP), bool(gaps[1] > MIN_GAP))

    @staticmethod
    def contrasts(lik: Likelihoods) -> tuple[np.ndarray, np.ndarray]:
        return lik.pos - lik.neg, lik.pos - lik.role

    def trait_parts(self, lik: Likelihoods, idx: np.ndarray) -> tuple[float, float]:
        """Calibrated `vs_opposite` and `vs_role_play` over questions `idx` (NaN where not usable, or where the
        prompts move it by `MIN_GAP` or less on these questions)."""
        parts = []
        for use, s, p, q in zip(self.usable, self.contrasts(lik), self.contrasts(self.plain),
                                self.contrasts(self.prompted)):
            base, gap = _mean(p[idx]), _mean(q[idx]) - _mean(p[idx])
            parts.append((_mean(s[idx]) - base) / gap if use and gap > MIN_GAP else float("nan"))
        return parts[0], parts[1]

    def trait(self, lik: Likelihoods, idx: np.ndarray) -> float:
        """The smaller of the usable calibrated contrasts (NaN when there is none, or one cannot be measured)."""
        parts = [v for use, v in zip(self.usable, self.trait_parts(lik, idx)) if use]
        return min(parts) if parts and not any(np.isnan(parts)) else float("nan")

    def relevance(self, lik: Likelihoods, idx: np.ndarray) -> float:
        base = _mean(_relevance_terms(self.plain)[idx])
        return _mean(_relevance_terms(lik)[idx]) / base if base > 0 else float("nan")

    def per_answer(self, lik: Likelihoods) -> tuple[np.ndarray, np.ndarray]:
        """Each answer's own trait expression and relevance on the same calibration (for rank agreement)."""
        every = np.arange(len(lik.pos))
        parts = []
        for use, s, p, q in zip(self.usable, self.contrasts(lik), self.contrasts(self.plain),
                                self.contrasts(self.prompted)):
            if use:
                parts.append((s - _mean(p)) / (_mean(q) - _mean(p)))
        trait = np.minimum.reduce(parts) if parts else np.full_like(lik.pos, np.nan)
        base = _mean(_relevance_terms(self.plain)[every])
        relevance = _relevance_terms(lik) / base if base > 0 else np.full_like(lik.pos, np.nan)
        return trait, relevance


def _estimate(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int) -> Estimate:
    value = statistic(np.arange(n))
    if np.isnan(value):
        return Estimate(None)
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)]) if n > 1 else np.zeros(0)
    draws = draws[~np.isnan(draws)]
    if draws.size < 10:
        return Estimate(value)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def measure(texts: Sequence[str], lik: Likelihoods, calibration: Calibration, *, resamples: int = 1000,
            seed: int = 0) -> Quality:
    """The `Quality` of one set of answers, with intervals from `resamples` resamplings of the questions."""
    n = len(texts)
    opposite, role_play = calibration.trait_parts(lik, np.arange(n))
    fluency, plain_fluency = _mean(lik.pos), _mean(calibration.plain.pos)
    rep = repetition(texts)
    return Quality(
        trait=_estimate(lambda idx: calibration.trait(lik, idx), n, resamples, seed),
        vs_opposite=_number(opposite), vs_role_play=_number(role_play),
        relevance=_estimate(lambda idx: calibration.relevance(lik, idx), n, resamples, seed),
        fluency=_number(fluency), fluency_loss=_number(plain_fluency - fluency),
        distinct_2=rep.distinct_2, distinct_3=rep.distinct_3, loop_answers=rep.loop_answers,
        longest_loop=rep.longest_loop, empty=sum(not t.strip() for t in texts),
    )


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def floor_failures(quality: Quality, plain: Quality) -> list[str]:
    """The floors `quality` breaks (empty when it keeps them all): relevance at least `MIN_RELEVANCE` of plain,
    mean distinct-2 at least `MIN_DISTINCT_2`, no more looping or empty answers than plain, and a fluency loss of
    at most `MAX_FLUENCY_LOSS` nats per token. A measure that could not be taken (one question: no relevance)
    breaks nothing."""
    failures = []
    if quality.relevance.value is not None and quality.relevance.value < MIN_RELEVANCE:
        failures.append(f"relevance {quality.relevance.value:.2f} < {MIN_RELEVANCE:g}")
    if quality.distinct_2 < MIN_DISTINCT_2:
        failures.append(f"distinct-2 {quality.distinct_2:.2f} < {MIN_DISTINCT_2:g}")
    if quality.loop_answers > plain.loop_answers:
        failures.append(f"{quality.loop_answers} looping answers")
    if quality.empty > plain.empty:
        failures.append(f"{quality.empty} empty answers")
    if quality.fluency_loss is not None and quality.fluency_loss > MAX_FLUENCY_LOSS:
        failures.append(f"fluency loss {quality.fluency_loss:.2f} > {MAX_FLUENCY_LOSS:g} nats/token")
    return failures


def judge_failures(judged: Judgement, plain: Judgement) -> list[str]:
    """The floors a judge's scores break: mean coherence at least `MIN_COHERENCE`, mean relevance at least
    `MIN_RELEVANCE` of the plain answers'. A mean the judge never gave breaks its floor."""
    failures = []
    if judged.coherence is None or judged.coherence < MIN_COHERENCE:
        failures.append(f"judged coherence {_text(judged.coherence)} < {MIN_COHERENCE:g}")
    if plain.relevance is not None and (judged.relevance is None or judged.relevance < MIN_RELEVANCE * plain.relevance):
        failures.append(f"judged relevance {_text(judged.relevance)} < {MIN_RELEVANCE:g} of plain")
    return failures


def _text(value: float | None) -> str:
    return "none" if value is None else f"{value:.0f}"


def floors_text() -> str:
    """The floors in words, for the evaluation's `rule`."""
    return (f"relevance >= {MIN_RELEVANCE:g} of plain, distinct-2 >= {MIN_DISTINCT_2:g}, no more looping or empty "
            f"answers than plain, fluency loss <= {MAX_FLUENCY_LOSS:g} nats/token under the trait's positive "
            "system prompts")


def judge_floors_text() -> str:
    """The judged floors in words."""
    return f"judged coherence >= {MIN_COHERENCE:g}, judged relevance >= {MIN_RELEVANCE:g} of plain"


def spearman(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float | None, int]:
    """Spearman rank correlation of the pairs where both are numbers (average ranks for ties), and how many."""
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None
                      and not np.isnan(x) and not np.isnan(y)], dtype=float).reshape(-1, 2)
    if len(pairs) < 3:
        return None, len(pairs)
    ranks = np.stack([_ranks(pairs[:, 0]), _ranks(pairs[:, 1])])
    if ranks.std(axis=1).min() == 0:
        return None, len(pairs)
    return float(np.corrcoef(ranks)[0, 1]), len(pairs)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
