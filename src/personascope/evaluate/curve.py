"""The steering curve at the chosen layer: held-out questions answered plainly, under the trait's positive system
prompts and at each steering strength, each strength measured (and judged) against the plain and prompted answers;
and steering at the chosen strength beside prompting on other questions."""

from __future__ import annotations

from personascope.evaluate.choice import choose_by_balance, choose_by_judge
from personascope.evaluate.margin import MarginSweep
from personascope.evaluate.quality import (
    Calibration,
    Likelihoods,
    floor_failures,
    judge_failures,
    measure,
    read_likelihoods,
    spearman,
)
from personascope.evaluate.result import Agreement, Comparison, CurvePoint, EvalSettings, Quality
from personascope.evaluate.steering import JudgedAnswers, judge_answers, prompted_answers, steered_answers
from personascope.inference.generate import default_decoding
from personascope.judge.judges import Judge
from personascope.model import ModelHandle
from personascope.traits import TraitSpec
from personascope.vector import PersonaVector


class SteeringCurve:
    """Answers to the curve's questions plainly, under the trait's positive system prompts and at steering
    strengths of one layer, each strength measured against the plain and prompted answers (and judged)."""

    def __init__(self, handle: ModelHandle, vector: PersonaVector, trait: TraitSpec, judge: Judge | None,
                 layer: int, sweep: MarginSweep, questions: list[str], settings: EvalSettings,
                 progress: bool) -> None:
        self.handle, self.vector, self.trait, self.judge, self.layer = handle, vector, trait, judge, layer
        self.sweep, self.questions, self.settings, self.progress = sweep, questions, settings, progress
        self.decoding = default_decoding(handle, max_new_tokens=settings.curve_max_new_tokens)  # as `generate`
        plain = self._answers(0.0)
        self.prompted = prompted_answers(handle, trait, questions, self.decoding, engine=settings.engine,
                                         progress=progress)
        fractions = sorted(settings.fractions)
        steered = [self._answers(f) for f in fractions]
        liks = self._read([plain, self.prompted, *steered])
        self.calibration = Calibration(liks[0], liks[1])
        self.plain_quality = self._measure(plain, liks[0])
        self.prompted_quality = self._measure(self.prompted, liks[1])
        self.prompted_judged = self._judge(self.prompted)
        self.plain_judged = self._judge(plain)
        self.points: list[CurvePoint] = []
        self.answers: list[list[str]] = []
        self.judged: list[JudgedAnswers | None] = []
        self.liks: list[Likelihoods] = []
        self._add([0.0, *fractions], [plain, *steered], [liks[0], *liks[2:]])

    def _answers(self, fraction: float) -> list[str]:
        vector = self.vector if fraction else None
        return steered_answers(self.handle, self.questions, vector=vector, layer=self.layer,
                               coef=self.sweep.coef(self.layer, fraction), sampling=self.decoding,
                               engine=self.settings.engine, progress=self.progress)

    def _read(self, sets: list[list[str]]) -> list[Likelihoods]:
        return read_likelihoods(self.handle, self.trait, self.questions, sets, token_budget=self.settings.token_budget,
                                progress=self.progress)

    def _measure(self, texts: list[str], lik: Likelihoods) -> Quality:
        return measure(texts, lik, self.calibration, resamples=self.settings.bootstrap, seed=self.settings.split_seed)

    def _judge(self, texts: list[str]) -> JudgedAnswers | None:
        if self.judge is None:
            return None
        return judge_answers(self.judge, self.trait, self.questions, texts, progress=self.progress)

    def _add(self, fractions: list[float], sets: list[list[str]], liks: list[Likelihoods]) -> None:
        self.sweep.measure(self.layer, [f for f in fractions if f])
        for fraction, texts, lik in zip(fractions, sets, liks):
            quality = self.plain_quality if fraction == 0 else self._measure(texts, lik)
            failures = floor_failures(quality, self.plain_quality)
            judged = self.plain_judged if fraction == 0 else self._judge(texts)
            judgement = judged.summary() if judged is not None else None
            judge_kept = None
            if judgement is not None and self.plain_judged is not None:
                judge_kept = not judge_failures(judgement, self.plain_judged.summary())
            gains = self.sweep.results.get(self.layer, {}).get(fraction, (0.0, 0.0, 0.0))
            self.points.append(CurvePoint(fraction, self.sweep.coef(self.layer, fraction), *gains, quality,
                                          not failures, failures, judgement, judge_kept))
            self.answers.append(texts)
            self.judged.append(judged)
            self.liks.append(lik)
        order = sorted(range(len(self.points)), key=lambda k: self.points[k].fraction)
        self.points, self.answers, self.judged, self.liks = ([items[k] for k in order] for items in
                                                             (self.points, self.answers, self.judged, self.liks))

    def choose(self) -> CurvePoint | None:
        """The strength the rule in force picks (the judge's with a judge)."""
        return choose_by_judge(self.points) if self.judge is not None else choose_by_balance(self.points)

    def refine(self) -> None:
        """Add the strength halfway between the choice and the next stronger one (half the weakest when nothing
        qualifies), where the floors are crossed."""
        pick, steered = self.choose(), [p.fraction for p in self.points[1:]]
        if pick is None:
            fraction = steered[0] / 2
        else:
            stronger = [f for f in steered if f > pick.fraction]
            if not stronger:
                return
            fraction = (pick.fraction + stronger[0]) / 2
        texts = self._answers(fraction)
        self._add([fraction], [texts], self._read([texts]))

    def agreement(self, balance: CurvePoint | None, judged: CurvePoint | None) -> Agreement | None:
        """Rank agreement of judged and judge-free trait and relevance over the curve's answers."""
        if self.judge is None:
            return None
        traits, relevances, judged_traits, judged_relevances = [], [], [], []
        for lik, scores in zip(self.liks, self.judged):
            trait, relevance = self.calibration.per_answer(lik)
            traits += trait.tolist()
            relevances += relevance.tolist()
            judged_traits += scores.trait if scores is not None else []
            judged_relevances += scores.relevance if scores is not None else []
        trait_rho, n = spearman(judged_traits, traits)
        relevance_rho, _ = spearman(judged_relevances, relevances)
        same = (balance.fraction if balance else None) == (judged.fraction if judged else None)
        return Agreement(same, trait_rho, relevance_rho, n)


def compare_with_prompting(handle: ModelHandle, vector: PersonaVector, trait: TraitSpec, layer: int, coef: float,
                           questions: list[str], settings: EvalSettings, usable: tuple[bool, bool],
                           progress: bool) -> Comparison:
    """Plain, steered (at `coef`) and prompted answers to `questions`, measured side by side with the trait
    contrasts the curve found `usable`."""
    decoding = default_decoding(handle, max_new_tokens=settings.curve_max_new_tokens)
    sets = [steered_answers(handle, questions, sampling=decoding, engine=settings.engine, progress=progress),
            steered_answers(handle, questions, vector=vector, layer=layer, coef=coef, sampling=decoding,
                            engine=settings.engine, progress=progress),
            prompted_answers(handle, trait, questions, decoding, engine=settings.engine, progress=progress)]
    liks = read_likelihoods(handle, trait, questions, sets, token_budget=settings.token_budget, progress=progress)
    calibration = Calibration(liks[0], liks[2], usable)
    plain, steered, prompted = (measure(texts, lik, calibration, resamples=settings.bootstrap,
                                        seed=settings.split_seed) for texts, lik in zip(sets, liks))
    return Comparison(questions, plain, steered, prompted)
