"""Validation of a persona vector on held-out data, and the choice of its layer and steering coefficient."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.evaluate.choice import (
    bootstrap_auroc,
    choose_by_balance,
    choose_by_judge,
    margin_grid,
    split_by_question,
)
from personascope.evaluate.curve import SteeringCurve, compare_with_prompting
from personascope.evaluate.margin import MarginSweep
from personascope.evaluate.quality import MIN_GAP, floors_text, judge_floors_text
from personascope.evaluate.result import Choice, EvalSettings, Evaluation, Example, LayerEval, Projections, Validation
from personascope.evaluate.separation import auroc, eval_labels, plain_chats, read_eval_rows, scan_projections, spread
from personascope.inference.activations import EncodedChat
from personascope.inference.engines import generate_with
from personascope.inference.generate import SamplingConfig
from personascope.io.files import write_json
from personascope.io.layers import check_layer
from personascope.io.progress import progress_bar
from personascope.judge.judges import Judge
from personascope.model import ModelHandle
from personascope.traits import TraitSpec, load_trait
from personascope.traits.plan import plan_rows
from personascope.vector import PersonaVector

AUROC_TOLERANCE = 0.05
"""Layers whose AUROC is within this of the best compete on margin gain."""
WEAK_AUROC = 0.6
"""Below this held-out AUROC at every layer, the evaluation warns that the vector hardly tracks the trait."""


def _candidate_layers(handle: ModelHandle, vector: PersonaVector, layers: Sequence[int] | None) -> list[int]:
    last = handle.num_layers
    if layers is None:
        return [l for l in range(1, last) if float(vector.directions[l].norm()) > 0]
    chosen = sorted(set(layers))
    for layer in chosen:
        check_layer(layer, last, low=1, high=last - 1)  # the last one feeds only the final norm
        if float(vector.directions[layer].norm()) == 0:
            raise PersonascopeError(f"the vector is all zeros at layer {layer}: leave that layer out")
    if not chosen:
        raise PersonascopeError("no layers to evaluate: give at least one")
    return chosen


def _margin_chats(
    chats: Sequence[EncodedChat], labels: Sequence[bool], settings: EvalSettings
) -> tuple[list[EncodedChat], list[EncodedChat]]:
    """Up to `margin_pairs` pos and neg chats, spread over the eval rows, cut to `margin_tokens` response tokens."""
    short = [EncodedChat(c.id, c.ids[: c.prompt_len + settings.margin_tokens], c.prompt_len) for c in chats]
    pos = spread([c for c, y in zip(short, labels) if y], settings.margin_pairs)
    neg = spread([c for c, y in zip(short, labels) if not y], settings.margin_pairs)
    return pos, neg


def _evaluate(handle: ModelHandle, vector: PersonaVector, trait: TraitSpec, rows: Sequence[dict[str, Any]], *,
              judge: Judge | None, layers: Sequence[int] | None, settings: EvalSettings,
              progress: bool) -> Evaluation:
    vector.check_model(handle)
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = round(now - clock, 2), now

    candidates = _candidate_layers(handle, vector, layers)
    labels = eval_labels(rows)
    split = split_by_question(rows, settings.split_seed)
    chats = plain_chats(handle, rows)
    projections, norm_tensor = scan_projections(handle, vector, chats, candidates, progress)
    sel, rep = split.select, split.report
    aurocs = {l: auroc(projections[sel, i], labels[sel]) for i, l in enumerate(candidates)}
    reported = {l: auroc(projections[rep, i], labels[rep]) for i, l in enumerate(candidates)}
    norms = {l: float(norm_tensor[i]) for i, l in enumerate(candidates)}
    lap("separation_s")

    top = max(aurocs.values())
    eligible = [l for l in candidates if aurocs[l] >= top - AUROC_TOLERANCE]
    pos, neg = _margin_chats([chats[i] for i in sel], [bool(labels[i]) for i in sel], settings)
    grid, refine = margin_grid(candidates, aurocs, layers is None, settings.grid_size)
    total = (1 + len(grid) + 2 * refine + len(settings.fractions)) * (len(pos) + len(neg))
    with progress_bar(total, "Likelihood margin", enabled=progress) as bar:
        sweep = MarginSweep(handle, vector, pos, neg, norms, settings, lambda n: bar.advance(0, n))
        best = sweep.search(grid, eligible, refine)
        sweep.measure(best, settings.fractions)
        bar.update(0, completed=total)
    notes = [] if not split.shared else [
        "the held-out rows could not be split by question (too few questions, or a part without pos or neg "
        "rows): the same rows chose the layer and report its AUROC"]
    if max(reported.values()) < WEAK_AUROC:
        notes.append(f"held-out AUROC is at most {max(reported.values()):.2f} at every layer: the vector barely "
                     "separates trait-positive from trait-negative responses, so the model hardly shows the trait "
                     "under its system prompts; a judge (--judge) keeping only pairs that show it, more --samples, "
                     "or a larger model may help")
    lap("margin_s")

    chosen_questions, reporting = set(split.select_questions), set(split.report_questions)
    questions = [q for q in trait.eval_questions if q in chosen_questions] or list(trait.eval_questions)
    questions = questions[: settings.curve_questions]
    curve = SteeringCurve(handle, vector, trait, judge, best, sweep, questions, settings, progress)
    curve.refine()
    balance = choose_by_balance(curve.points)
    judged = choose_by_judge(curve.points) if judge is not None else None
    pick = judged if judge is not None else balance
    if pick is None:
        pick = curve.points[1]
        notes.append(f"no steering strength at layer {best} kept every floor with "
                     + ("a judged trait score above the unsteered answers'" if judge is not None
                        else "a trait expression (where unmeasured, a margin gain) above 0")
                     + f"; recorded the weakest ({pick.fraction:g} of the residual norm): check the examples")
    opposite, role_play = curve.calibration.usable
    if not (opposite and role_play):
        contrast = ("either contrast" if not (opposite or role_play) else "the contrast against the "
                    + ("role-play" if opposite else "opposite") + " prompts")
        notes.append(f"the trait's system prompts barely change how the answers read on this model (less than "
                     f"{MIN_GAP:g} nats/token between plain and prompted answers on {contrast}): it cannot be "
                     "calibrated" + (", so trait expression rests on the other" if opposite or role_play
                                     else ", so trait expression cannot be measured"
                                     + ("" if judge is not None else
                                        " and the margin gain ranked the strengths that keep the floors")))
    if len(questions) < 2:
        notes.append("relevance needs two questions or more: it was not measured")
    lap("curve_s")
    report_questions = [q for q in trait.eval_questions if q in reporting][: settings.curve_questions] or questions
    comparison = compare_with_prompting(handle, vector, trait, best, pick.coef, report_questions, settings,
                                        curve.calibration.usable, progress)
    lap("comparison_s")

    column = candidates.index(best)
    labels_rep = labels[rep]
    low, high = bootstrap_auroc(projections[rep, column], labels_rep, settings.bootstrap, settings.split_seed)
    chosen_answers = curve.answers[curve.points.index(pick)]
    timings["total_s"] = round(time.perf_counter() - start, 2)
    coef_rule = (f"the highest judged trait score above the unsteered answers' among the strengths that keep "
                 f"{judge_floors_text()}" if judge is not None else
                 f"the highest trait expression above 0 among the strengths that keep every floor ({floors_text()}); "
                 "the highest margin gain above 0 where trait expression was measured at no strength")
    return Evaluation(
        trait=trait.name, model=handle.name, judge=judge.spec if judge is not None else "none",
        best_layer=best, best_coef=pick.coef, best_fraction=pick.fraction,
        coef_source="judge" if judge is not None else "balance",
        rule=(f"layer: highest margin gain at {settings.fraction:g} of the residual norm among layers with "
              f"selection-part AUROC >= max - {AUROC_TOLERANCE:g}; coef: of the curve's strengths (and one more "
              f"halfway to the next stronger than the first choice), {coef_rule}"),
        notes=notes,
        validation=Validation("by question", settings.split_seed, split.select_questions, split.report_questions,
                              len(sel), len(rep), reported[best], low, high, settings.bootstrap),
        baseline=sweep.baseline,
        layers=[LayerEval(l, aurocs[l], reported[l], sweep.gain(l), settings.fraction, sweep.coef(l, settings.fraction),
                          norms[l], float(vector.directions[l].norm()), l in eligible) for l in candidates],
        curve=curve.points,
        prompted=curve.prompted_quality,
        choice=Choice(balance.fraction if balance else None, judged.fraction if judged else None,
                      curve.agreement(balance, judged)),
        comparison=comparison,
        projections=Projections(best, [round(float(v), 4) for v in projections[rep, column][labels_rep]],
                                [round(float(v), 4) for v in projections[rep, column][~labels_rep]]),
        examples=[Example(*texts) for texts in zip(questions, curve.answers[0], chosen_answers, curve.prompted)
                  ][: settings.examples],
        counts={"eval_pos": int(labels.sum()), "eval_neg": int((~labels).sum()), "margin_pos": len(pos),
                "margin_neg": len(neg), "curve_questions": len(questions)},
        settings=settings, timings=timings,
        prompted_judgement=curve.prompted_judged.summary() if curve.prompted_judged is not None else None,
    )


def layers_tag(layers: Sequence[int]) -> str:
    """`6-10_12` for layers 6..10 and 12: the tag of `eval.layers-TAG.json`."""
    parts, run = [], [layers[0]]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == run[-1] + 1:
            run.append(layer)
            continue
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer] if layer is not None else []
    return "_".join(parts)


def eval_path(run_dir: Path, layers: Sequence[int] | None) -> Path:
    """Where an evaluation of a run is written: `eval.json` for the full sweep, `eval.layers-TAG.json` for chosen
    layers (beside it, never over it)."""
    return Path(run_dir) / ("eval.json" if layers is None else f"eval.layers-{layers_tag(sorted(set(layers)))}.json")


def evaluate_run(
    run_dir: Path,
    handle: ModelHandle,
    *,
    judge: Judge | None = None,
    vector_path: Path | None = None,
    layers: Sequence[int] | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
    out: Path | None = None,
) -> Evaluation:
    """Validate a run's vector on its eval split and choose the best layer and coefficient; writes `out`
    (default `eval_path(run_dir, layers)`: `DIR/eval.json`, or `DIR/eval.layers-TAG.json` when `layers` are given).

    Args:
        run_dir: a run directory of `personascope extract` (`trait.json`, `responses.jsonl`, `vectors/`).
        judge: a judge that also scores the steering curve's answers; None measures only what needs no judge.
        vector_path: the vector to evaluate (default `DIR/vectors/response_avg.safetensors`).
        layers: layers to evaluate (default 1..L-1, margin on a coarse grid refined around the best).

    Returns:
        The evaluation as written.

    Example:
        >>> result = evaluate_run(Path("runs/humorous"), load_model())
        >>> result.best_layer, result.best_coef, result.validation.auroc
    """
    run_dir = Path(run_dir)
    trait_path = run_dir / "trait.json"
    if not trait_path.exists():
        raise PersonascopeError(f"{run_dir} has no trait.json: is it a run directory of `personascope extract`?")
    trait = load_trait(trait_path, strict=False)
    path = Path(vector_path) if vector_path is not None else run_dir / "vectors" / "response_avg.safetensors"
    if vector_path is None and not path.exists():
        raise PersonascopeError(f"{run_dir} has no vectors/response_avg.safetensors yet: rerun the same "
                                "`personascope extract` command to finish the run")
    vector = PersonaVector.load(path, handle)
    rows, empty = read_eval_rows(run_dir / "responses.jsonl")
    result = _evaluate(handle, vector, trait, rows, judge=judge, layers=layers,
                       settings=settings or EvalSettings(), progress=progress)
    result.vector = str(path)
    result.counts["eval_empty_skipped"] = empty
    write_json(out if out is not None else eval_path(run_dir, layers), result)
    return result


def evaluate_vector(
    handle: ModelHandle,
    vector: PersonaVector,
    trait: TraitSpec,
    *,
    judge: Judge | None = None,
    layers: Sequence[int] | None = None,
    pairs: int = 2,
    max_new_tokens: int = 48,
    seed: int = 0,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> Evaluation:
    """Validate a bare vector file: answer the trait's eval questions under its first `pairs` pos and neg system
    prompts (sampled, `max_new_tokens` each, as `personascope extract` plans them), then evaluate as
    `evaluate_run` does. Nothing is written."""
    vector.check_model(handle)
    planned = plan_rows(trait, eval_pairs=pairs, splits=("eval",))
    requests = [(r["id"], handle.chat_ids([{"role": "system", "content": r["system"]},
                                           {"role": "user", "content": r["question"]}])) for r in planned]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    settings = settings or EvalSettings()
    answers = generate_with(settings.engine, handle, requests, sampling, progress=progress,
                            description="Eval responses")
    rows = [{**r, "response": a.text} for r, a in zip(planned, answers) if a.text.strip()]
    result = _evaluate(handle, vector, trait, rows, judge=judge, layers=layers, settings=settings, progress=progress)
    result.counts["eval_empty_skipped"] = len(planned) - len(rows)
    return result
