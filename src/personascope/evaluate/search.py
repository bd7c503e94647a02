"""Validation of a persona vector on held-out data, and the choice of its layer and steering coefficient."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.evaluate.separation import (
    auroc,
    eval_labels,
    plain_chats,
    read_eval_rows,
    scan_projections,
    spread,
)
from personascope.evaluate.steering import (
    MIN_COHERENCE,
    best_judged,
    steered_answers,
    steering_curve,
)
from personascope.inference.activations import EncodedChat
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.inference.likelihood import response_loglik
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



@dataclass(frozen=True)
class EvalSettings:
    """Knobs of an evaluation; the defaults keep the embedded model's run to a few minutes on a CPU.

    Attributes:
        margin_pairs: pos and neg responses (each) scored for the likelihood margin, spread over the eval rows.
        margin_tokens: leading response tokens scored per response.
        fraction: the fraction of the residual norm at which every candidate layer's margin gain is measured.
        sweep_fractions: fractions measured at the chosen layer to pick the judge-free coefficient.
        grid_size: about how many layers get a margin measurement before refining around the best.
        judge_fractions: steering-curve coefficients, as fractions of the chosen layer's residual norm.
        judge_max_new_tokens: tokens per steered answer on the curve.
        examples: eval questions answered unsteered and steered (greedy) for the report.
        example_max_new_tokens: tokens per example answer.
        token_budget: padded tokens per teacher-forced batch (logits are kept only for response positions).
    """

    margin_pairs: int = 8
    margin_tokens: int = 48
    fraction: float = 0.5
    sweep_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    grid_size: int = 10
    judge_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5)
    judge_max_new_tokens: int = 64
    examples: int = 3
    example_max_new_tokens: int = 40
    token_budget: int = 2048


class _MarginSweep:
    """Margin gains at chosen layers and fractions of the residual norm, against one unsteered baseline."""

    def __init__(self, handle: ModelHandle, vector: PersonaVector, pos: list[EncodedChat],
                 neg: list[EncodedChat], norms: dict[int, float], settings: EvalSettings,
                 advance: Callable[[int], None]) -> None:
        self.handle, self.vector, self.norms, self.settings = handle, vector, norms, settings
        self.chats, self.split, self.advance = [*pos, *neg], len(pos), advance
        self.results: dict[int, dict[float, dict[str, float]]] = {}
        first = next(iter(norms))
        self.baseline = self._means(self._loglik(first, [0.0])[0])

    def _loglik(self, layer: int, coefs: list[float]) -> Tensor:
        return response_loglik(self.handle, self.vector, layer, coefs, self.chats,
                               token_budget=self.settings.token_budget, advance=self.advance)

    def _means(self, ll: Tensor) -> dict[str, float]:
        pos, neg = float(ll[: self.split].mean()), float(ll[self.split:].mean())
        return {"pos_ll": pos, "neg_ll": neg, "margin": pos - neg}

    def coef(self, layer: int, fraction: float) -> float:
        return fraction * self.norms[layer] / float(self.vector.directions[layer].norm())

    def measure(self, layer: int, fractions: Sequence[float]) -> None:
        todo = [f for f in fractions if f not in self.results.get(layer, {})]
        if not todo:
            return
        ll = self._loglik(layer, [self.coef(layer, f) for f in todo])
        for k, fraction in enumerate(todo):
            m = self._means(ll[k])
            self.results.setdefault(layer, {})[fraction] = {
                "fraction": fraction,
                "coef": self.coef(layer, fraction),
                "margin_gain": m["margin"] - self.baseline["margin"],
                "pos_gain": m["pos_ll"] - self.baseline["pos_ll"],
                "neg_gain": m["neg_ll"] - self.baseline["neg_ll"],
            }

    def gain(self, layer: int) -> float | None:
        entry = self.results.get(layer, {}).get(self.settings.fraction)
        return None if entry is None else entry["margin_gain"]

    def search(self, grid: Sequence[int], eligible: Sequence[int], refine: bool) -> int:
        """Measure `grid` (then the neighbours of its best when `refine`); the eligible layer with the top gain."""
        for layer in grid:
            self.measure(layer, [self.settings.fraction])
        best = max((l for l in eligible if self.gain(l) is not None), key=lambda l: self.gain(l) or 0.0)
        if not refine:
            return best
        for layer in (best - 1, best + 1):
            if layer in eligible:
                self.measure(layer, [self.settings.fraction])
        return max((l for l in eligible if self.gain(l) is not None), key=lambda l: self.gain(l) or 0.0)


# -- the whole evaluation -----------------------------------------------------------------------------------


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
    chats: Sequence[EncodedChat], labels: Tensor, settings: EvalSettings
) -> tuple[list[EncodedChat], list[EncodedChat]]:
    """Up to `margin_pairs` pos and neg chats, spread over the eval rows, cut to `margin_tokens` response tokens."""
    short = [EncodedChat(c.id, c.ids[: c.prompt_len + settings.margin_tokens], c.prompt_len) for c in chats]
    pos = spread([c for c, y in zip(short, labels) if y], settings.margin_pairs)
    neg = spread([c for c, y in zip(short, labels) if not y], settings.margin_pairs)
    return pos, neg


def _grid(candidates: list[int], aurocs: dict[int, float], default: bool, size: int) -> tuple[list[int], bool]:
    """The layers whose margin is measured first, and whether to refine around the best of them.

    Explicitly chosen layers are all measured; by default every `stride`-th layer (about `size` of them) and
    the best-AUROC layer, then the neighbours of the best (so with stride 3 every layer near it is measured).
    """
    if not default:
        return candidates, False
    stride = max(1, math.ceil(len(candidates) / size))
    return sorted({*candidates[::stride], max(candidates, key=aurocs.__getitem__)}), stride > 1


def _judge_free_choice(at_best: list[dict[str, Any]], fraction: float, layer: int) -> tuple[dict[str, Any], list[str]]:
    """Of the fractions measured at the chosen layer, the one with the largest pos log-likelihood gain among those
    that raise the margin (stronger steering starts to break the text and lowers it)."""
    raising = [e for e in at_best if e["margin_gain"] > 0]
    if raising:
        return max(raising, key=lambda e: e["pos_gain"]), []
    fallback = next(e for e in at_best if e["fraction"] == fraction)
    return fallback, [f"steering toward the trait did not raise the likelihood margin at layer {layer}"]


def _evaluate(
    handle: ModelHandle,
    vector: PersonaVector,
    trait: TraitSpec,
    rows: Sequence[dict[str, Any]],
    *,
    judge: Judge | None,
    layers: Sequence[int] | None,
    settings: EvalSettings,
    progress: bool,
) -> dict[str, Any]:
    vector.check_model(handle)
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = round(now - clock, 2), now

    candidates = _candidate_layers(handle, vector, layers)
    labels = eval_labels(rows)
    chats = plain_chats(handle, rows)
    projections, norm_tensor = scan_projections(handle, vector, chats, candidates, progress)
    aurocs = {l: auroc(projections[:, i], labels) for i, l in enumerate(candidates)}
    norms = {l: float(norm_tensor[i]) for i, l in enumerate(candidates)}
    lap("separation_s")

    top = max(aurocs.values())
    eligible = [l for l in candidates if aurocs[l] >= top - AUROC_TOLERANCE]
    pos, neg = _margin_chats(chats, labels, settings)
    grid, refine = _grid(candidates, aurocs, layers is None, settings.grid_size)
    total = (1 + len(grid) + 2 * refine + len(settings.sweep_fractions)) * (len(pos) + len(neg))
    with progress_bar(total, "Likelihood margin", enabled=progress) as bar:
        sweep = _MarginSweep(handle, vector, pos, neg, norms, settings, lambda n: bar.advance(0, n))
        best = sweep.search(grid, eligible, refine)
        sweep.measure(best, settings.sweep_fractions)
        bar.update(0, completed=total)
    at_best = sorted(sweep.results[best].values(), key=lambda e: e["fraction"])
    chosen, notes = _judge_free_choice(at_best, settings.fraction, best)
    if top < WEAK_AUROC:
        notes.append(f"held-out AUROC is at most {top:.2f} at every layer: the vector barely separates trait-positive "
                     "from trait-negative responses, so the model hardly shows the trait under its system prompts; "
                     "a judge (--judge) keeping only pairs that show it, more --samples, or a larger model may help")
    lap("margin_s")

    curve, coef_source = None, "margin"
    if judge is not None:
        curve = steering_curve(handle, vector, trait, judge, best,
                               [sweep.coef(best, f) for f in settings.judge_fractions],
                               max_new_tokens=settings.judge_max_new_tokens, progress=progress)
        for point, fraction in zip(curve, settings.judge_fractions):
            point["fraction"] = fraction
        pick = best_judged(curve)
        if pick is None:
            notes.append(f"no steering coefficient kept mean coherence >= {MIN_COHERENCE:g}; kept the margin's choice")
        else:
            chosen, coef_source = pick, "judge"
        lap("steering_curve_s")

    questions = list(trait.eval_questions[: settings.examples])
    plain = steered_answers(handle, questions, max_new_tokens=settings.example_max_new_tokens, progress=progress)
    steered = steered_answers(handle, questions, vector=vector, layer=best, coef=chosen["coef"],
                              max_new_tokens=settings.example_max_new_tokens, progress=progress)
    lap("examples_s")
    timings["total_s"] = round(time.perf_counter() - start, 2)

    column = candidates.index(best)
    return {
        "trait": trait.name,
        "model": handle.name,
        "best_layer": best,
        "best_coef": chosen["coef"],
        "best_fraction": chosen["fraction"],
        "coef_source": coef_source,
        "rule": (f"layer: highest margin gain at {settings.fraction:g} of the residual norm among layers with "
                 f"AUROC >= max - {AUROC_TOLERANCE:g}; coef: "
                 + (f"highest judged trait score with coherence >= {MIN_COHERENCE:g}" if coef_source == "judge"
                    else "largest pos log-likelihood gain among fractions that raise the margin")),
        "notes": notes,
        "baseline": sweep.baseline,
        "layers": [
            {
                "layer": l,
                "auroc": aurocs[l],
                "margin_gain": sweep.gain(l),
                "fraction": settings.fraction,
                "coef": sweep.coef(l, settings.fraction),
                "residual_norm": norms[l],
                "vector_norm": float(vector.directions[l].norm()),
                "eligible": l in eligible,
            }
            for l in candidates
        ],
        "sweep": at_best,
        "steering_curve": curve,
        "projections": {
            "layer": best,
            "pos": [round(float(v), 4) for v in projections[labels, column]],
            "neg": [round(float(v), 4) for v in projections[~labels, column]],
        },
        "examples": [{"question": q, "unsteered": a, "steered": b} for q, a, b in zip(questions, plain, steered)],
        "counts": {"eval_pos": int(labels.sum()), "eval_neg": int((~labels).sum()),
                   "margin_pos": len(pos), "margin_neg": len(neg)},
        "settings": asdict(settings),
        "judge": judge.spec if judge is not None else "none",
        "timings": timings,
    }


def evaluate_run(
    run_dir: Path,
    handle: ModelHandle,
    *,
    judge: Judge | None = None,
    vector_path: Path | None = None,
    layers: Sequence[int] | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate a run's vector on its eval split and choose the best layer and coefficient; writes `DIR/eval.json`.

    Args:
        run_dir: a run directory of `personascope extract` (`trait.json`, `responses.jsonl`, `vectors/`).
        judge: a judge for the steering curve; None measures only what needs no judge.
        vector_path: the vector to evaluate (default `DIR/vectors/response_avg.safetensors`).
        layers: layers to evaluate (default 1..L-1, margin on a coarse grid refined around the best).

    Returns:
        The evaluation (`best_layer`, `best_coef`, `best_fraction`, `layers`, `steering_curve`, …) as written.

    Example:
        >>> result = evaluate_run(Path("runs/humorous"), load_model())
        >>> result["best_layer"], result["best_coef"]
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
    result["vector"] = str(path)
    result["counts"]["eval_empty_skipped"] = empty
    write_json(run_dir / "eval.json", result)
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
) -> dict[str, Any]:
    """Validate a bare vector file: answer the trait's eval questions under its first `pairs` pos and neg system
    prompts (sampled, `max_new_tokens` each, as `personascope extract` plans them), then evaluate as
    `evaluate_run` does. Nothing is written."""
    vector.check_model(handle)
    planned = plan_rows(trait, eval_pairs=pairs, splits=("eval",))
    requests = [(r["id"], handle.chat_ids([{"role": "system", "content": r["system"]},
                                           {"role": "user", "content": r["question"]}])) for r in planned]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    answers = generate_responses(handle, requests, sampling, progress=progress, description="Eval responses")
    rows = [{**r, "response": a.text} for r, a in zip(planned, answers) if a.text.strip()]
    result = _evaluate(handle, vector, trait, rows, judge=judge, layers=layers,
                       settings=settings or EvalSettings(), progress=progress)
    result["counts"]["eval_empty_skipped"] = len(planned) - len(rows)
    return result
