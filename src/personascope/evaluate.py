"""Validation of a persona vector on held-out data, and the choice of its layer and steering coefficient.

Three measurements, all on the evaluation split (questions never used for extraction):

* **separation** — held-out pos and neg responses re-encoded WITHOUT their system prompt (user question +
  response); the `response_avg` projection on the unit vector separates them (AUROC per layer).
* **likelihood margin** (judge-free, DESIGN.md; computed by `personascope.likelihood`) — teacher-forced under the
  model with no system prompt, steered at one layer: mean per-token log-likelihood of pos responses minus that of
  neg responses. Its *gain* over the unsteered margin, at a coefficient scaled to the layer's typical residual
  norm, must be positive.
* **steering curve** (with a judge) — greedy generation on the eval questions steered at several coefficients;
  trait and coherence scores per coefficient, as in the paper.

Layer rule: among layers 1..L-1 whose AUROC is within `AUROC_TOLERANCE` of the best, the one with the highest
margin gain at `EvalSettings.fraction` of its residual norm. The margin is measured on a coarse grid of about ten
layers (plus the best-AUROC layer), then at the neighbours of the grid's best, so the chosen layer beats every
measured layer around it. Coefficient rule: with a judge, the highest mean trait score keeping mean coherence
≥ `MIN_COHERENCE`; without one, from a sweep of fractions at the chosen layer, the fraction under which the model
best predicts the held-out trait-positive responses (the largest pos log-likelihood gain) among those that raise
the margin — larger coefficients start to break the text and lower it.

A coefficient on the raw vector row and a fraction relate by `coef = fraction · norm(l) / |v_l|`, where
`norm(l)` is the mean residual norm at layer `l` over the eval response tokens; `steer(handle, vec, l, coef)`
then adds a vector of length `fraction · norm(l)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.activations import EncodedChat, encode, fit_to_context, read_activations
from personascope.errors import PersonascopeError
from personascope.generate import SamplingConfig, generate_responses
from personascope.hooks import HookManager, TokenContext, steer
from personascope.judges import Judge, judge_coherence, judge_trait
from personascope.likelihood import response_loglik
from personascope.models import ModelHandle
from personascope.progress import progress_bar
from personascope.rundir import JsonlLog, write_json
from personascope.traits import TraitSpec, load_trait
from personascope.vector import PersonaVector

AUROC_TOLERANCE = 0.05
"""Layers whose AUROC is within this of the best compete on margin gain."""
MIN_COHERENCE = 75.0
"""Mean judged coherence a steering coefficient must keep (the paper's cut-off)."""
WEAK_AUROC = 0.6
"""Below this held-out AUROC at every layer, the evaluation warns that the vector hardly tracks the trait."""
_ROW_FIELDS = ("id", "split", "polarity", "question", "response")


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


# -- rows and chats -----------------------------------------------------------------------------------------


def read_eval_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The eval-split rows of a run's `responses.jsonl` with a non-empty response, and how many were empty."""
    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"{path} does not exist: run `personascope extract` into this directory first")
    rows, empty = [], 0
    for row in JsonlLog(path).read().values():
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


def _labels(rows: Sequence[dict[str, Any]]) -> Tensor:
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


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """Up to `k` items evenly spaced over `items` (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


# -- separation ---------------------------------------------------------------------------------------------


@contextmanager
def _residual_norms(handle: ModelHandle, layers: Sequence[int]) -> Iterator[Callable[[], Tensor]]:
    """Meter the mean residual norm over response tokens at `layers` while the block runs; yields a reader."""
    manager = HookManager.of(handle)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def meter(index: int) -> Callable[[Tensor, TokenContext], None]:
        def op(hidden: Tensor, tokens: TokenContext) -> None:
            mask = tokens.pool_mask("response_avg")
            sums[index] += float(hidden.detach().float().norm(dim=-1)[mask].sum())
            counts[index] += float(mask.sum())

        return op

    keys = [manager.add(layer, meter(i)) for i, layer in enumerate(layers)]
    try:
        yield lambda: (sums / counts.clamp(min=1)).float()
    finally:
        for key in keys:
            manager.remove(key)


def _scan(
    handle: ModelHandle, vector: PersonaVector, chats: Sequence[EncodedChat], layers: Sequence[int], progress: bool
) -> tuple[Tensor, Tensor]:
    """One batched pass (stopping at the deepest layer): projections `[N, len(layers)]` and mean norms."""
    units = torch.stack([vector.unit(layer) for layer in layers])
    with _residual_norms(handle, layers) as norms:
        pooled = read_activations(handle, chats, layers, ("response_avg",), progress=progress,
                                  description="Held-out projections")["response_avg"]
    return torch.einsum("nld,ld->nl", pooled, units), norms()


def _auroc(scores: Tensor, labels: Tensor) -> float:
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
    labels = _labels(eval_rows)
    projections, _ = _scan(handle, vector, plain_chats(handle, eval_rows), layers, progress)
    return {layer: _auroc(projections[:, i], labels) for i, layer in enumerate(layers)}


# -- layer and coefficient search ----------------------------------------------------------------------


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


# -- steered generation -------------------------------------------------------------------------------------


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


def _mean(values: Sequence[float | None]) -> float | None:
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
            "trait": _mean([r.score for r in trait_scores]),
            "coherence": _mean([r.score for r in coherence]),
            "scored": sum(r.score is not None for r in trait_scores),
            "failed": sum(r.error is not None for r in [*trait_scores, *coherence]),
        })
    return curve


def best_judged(curve: Sequence[dict[str, Any]], min_coherence: float = MIN_COHERENCE) -> dict[str, Any] | None:
    """The curve point with the highest trait score among those with mean coherence ≥ `min_coherence`."""
    kept = [p for p in curve if p["trait"] is not None and p["coherence"] is not None
            and p["coherence"] >= min_coherence]
    return max(kept, key=lambda p: (p["trait"], -abs(p["coef"]))) if kept else None


# -- the whole evaluation -----------------------------------------------------------------------------------


def _candidate_layers(handle: ModelHandle, vector: PersonaVector, layers: Sequence[int] | None) -> list[int]:
    last = handle.num_layers
    if layers is None:
        return [l for l in range(1, last) if float(vector.directions[l].norm()) > 0]
    chosen = sorted(set(layers))
    for layer in chosen:
        if not 0 < layer < last:
            raise PersonascopeError(f"layer {layer} cannot be evaluated: choose layers 1..{last - 1} "
                                    "(0 is the embeddings, the last one feeds only the final norm)")
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
    pos = _spread([c for c, y in zip(short, labels) if y], settings.margin_pairs)
    neg = _spread([c for c, y in zip(short, labels) if not y], settings.margin_pairs)
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
    labels = _labels(rows)
    chats = plain_chats(handle, rows)
    projections, norm_tensor = _scan(handle, vector, chats, candidates, progress)
    aurocs = {l: _auroc(projections[:, i], labels) for i, l in enumerate(candidates)}
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
    from personascope.extract import ExtractConfig, plan_rows

    vector.check_model(handle)
    planned = [r for r in plan_rows(trait, ExtractConfig(trait=trait.name, eval_pairs=pairs)) if r["split"] == "eval"]
    requests = [(r["id"], handle.chat_ids([{"role": "system", "content": r["system"]},
                                           {"role": "user", "content": r["question"]}])) for r in planned]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    answers = generate_responses(handle, requests, sampling, progress=progress, description="Eval responses")
    rows = [{**r, "response": a.text} for r, a in zip(planned, answers) if a.text.strip()]
    result = _evaluate(handle, vector, trait, rows, judge=judge, layers=layers,
                       settings=settings or EvalSettings(), progress=progress)
    result["counts"]["eval_empty_skipped"] = len(planned) - len(rows)
    return result
