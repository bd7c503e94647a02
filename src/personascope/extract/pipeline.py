"""The extraction pipeline: from a trait to a validated persona vector, stage by stage over a run directory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.evaluate.report import write_report
from personascope.evaluate.result import EvalSettings, Evaluation, LayerEval
from personascope.evaluate.search import evaluate_run
from personascope.extract.selection import PairSelection, select_pairs
from personascope.hooks import POOLS
from personascope.inference.activations import EncodedChat, encode, iter_activations
from personascope.inference.engines import check_engine, generate_with
from personascope.inference.generate import GenerationResult, SamplingConfig
from personascope.io.files import write_json
from personascope.io.records import RecordLog
from personascope.io.rundir import open_run
from personascope.judge.judges import Judge, judge_coherence, judge_trait, make_judge
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model
from personascope.traits import TraitSpec, load_trait
from personascope.traits.plan import plan_rows
from personascope.vector import PersonaVector
from personascope.vector.methods import get_method

_DERIVED = ("vectors", "eval.json", "vector.safetensors", "report.html")  # in stage order


@dataclass(frozen=True)
class ExtractConfig:
    """The settings of one extraction run.

    Attributes:
        trait: a built-in trait name or the path of a trait file.
        model: an embedded model name, HF id or local directory.
        judge: judge spec (`openai:MODEL`, `anthropic:MODEL`, `hf:MODEL`) or `none` (keep every pair).
        judge_base_url: server URL for an HTTP judge (not part of the run's identity).
        judge_timeout: seconds per judge request; judge_retries: retries of a request after a 429, 5xx, timeout
            or lost connection (it waits at least the server's Retry-After). Neither is part of the run's identity.
        samples: responses per (pair, extraction question, polarity).
        max_new_tokens: length limit of each response.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling.
        seed: base seed; each generation batch is seeded from it and its first row's id.
        method: `mean_diff` (the paper's), `pca` or `probe`.
        threshold: a pair is kept when its pos response scores at least this for the trait, its neg response less.
        coherence_threshold: both responses of a kept pair score at least this for coherence.
        eval_pairs: how many of the trait's system-prompt pairs (the first ones) answer the evaluation questions.
        eval_samples: responses per (pair, evaluation question, polarity).
        eval_layers: the layers evaluation sweeps (None: all).
        evaluation: the evaluation's settings (None: `EvalSettings()`, sized for a CPU).
        token_budget: padded tokens in one batch (generation and activations).
        max_batch: rows in one batch.
        lenient: accept a trait with other counts than 5 pairs and 20 + 20 questions.
        engine: what generates the contrastive responses: `hf` or `vllm` (see `personascope.inference.engines`).
    """

    trait: str
    model: str = DEFAULT_MODEL
    judge: str = "none"
    judge_base_url: str | None = None
    judge_timeout: float = 60.0
    judge_retries: int = 4
    samples: int = 1
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    method: str = "mean_diff"
    threshold: float = 50.0
    coherence_threshold: float = 50.0
    eval_pairs: int = 2
    eval_samples: int = 1
    eval_layers: tuple[int, ...] | None = None
    evaluation: EvalSettings | None = None
    token_budget: int = 16384
    max_batch: int = 64
    lenient: bool = False
    engine: str = "hf"

    def check(self) -> None:
        """Raise for settings that cannot work, naming the setting."""
        get_method(self.method)
        check_engine(self.engine)
        for name in ("samples", "max_new_tokens", "eval_pairs", "eval_samples", "token_budget", "max_batch"):
            if getattr(self, name) < 1:
                raise PersonascopeError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("threshold", "coherence_threshold"):
            if not 0 <= getattr(self, name) <= 100:
                raise PersonascopeError(f"{name} must be between 0 and 100, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise PersonascopeError(f"top_p must be in (0, 1], got {self.top_p}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class ExtractResult:
    """What a run produced.

    Attributes:
        run_dir: the run directory.
        vector: `DIR/vector.safetensors`, the recommended vector (best layer and coefficient in its metadata).
        vectors: `{position: path}` of the vectors at each pooling position.
        evaluation: the evaluation, as `eval.json` holds it.
        report: `DIR/report.html`.
        summary: `responses` (both splits), the extraction split's `pairs`, `empty_pairs`, `rejected_pairs` and
            `kept_pairs`, `judge_failures`, `judge_retries` (requests the judge sent again, over the directory's
            runs) and `generated` (responses generated by this call).
        judge_failed: the rows whose judging failed for good, with the reason (a rerun tries them again).
    """

    run_dir: Path
    vector: Path
    vectors: dict[str, Path]
    evaluation: Evaluation
    report: Path
    summary: dict[str, int] = field(default_factory=dict)
    judge_failed: dict[str, str] = field(default_factory=dict)

    def best_layer_stats(self) -> LayerEval:
        """The evaluation entry of the best layer (`auroc`, `report_auroc`, `margin_gain`, …)."""
        return self.evaluation.best


def extract(
    config: ExtractConfig, out_dir: str | Path, *, handle: ModelHandle | None = None, progress: bool = True
) -> ExtractResult:
    """Run (or resume) the extraction pipeline in `out_dir`.

    Args:
        config: the run's settings.
        out_dir: the run directory (created if needed).
        handle: an already loaded model (must be `config.model`); loaded from `config.model` otherwise.
        progress: show progress bars.

    Returns:
        Paths of the outputs, the evaluation and the run's counts.

    Raises:
        PersonascopeError: bad settings or trait file, an unknown judge spec, a directory holding a run with other
            settings, or too few usable pairs (the message says what to change). Written rows are kept.
    """
    config.check()
    run = Path(out_dir)
    spec = load_trait(config.trait, strict=not config.lenient)
    judge = make_judge(config.judge, base_url=config.judge_base_url, cache_path=run / "judge_cache.sqlite",
                       timeout=config.judge_timeout, max_retries=config.judge_retries)
    if handle is None:
        handle = load_model(config.model)
    elif config.model not in (handle.name, handle.source):
        raise PersonascopeError(f"the model handle is {handle.name!r} but the config names {config.model!r}")
    open_run(run, _identity(config, spec), ignored=NOT_IDENTITY)
    if not (run / "trait.json").exists():
        write_json(run / "trait.json", spec.to_dict())

    planned = plan_rows(spec, samples=config.samples, eval_pairs=config.eval_pairs,
                        eval_samples=config.eval_samples)
    generated = _generate(handle, planned, config, run, progress)
    rows = [r for r in (RecordLog(run / "responses.jsonl").rows().get(p["id"]) for p in planned) if r is not None]
    scores, failures = _judge(judge, spec, rows, run, progress) if judge is not None else (None, 0)
    selection = select_pairs(rows, scores, threshold=config.threshold, coherence_threshold=config.coherence_threshold)
    summary = {"responses": len(rows), "pairs": selection.total, "empty_pairs": selection.empty,
               "rejected_pairs": selection.rejected, "kept_pairs": len(selection.kept), "judge_failures": failures}
    _record(run, "summary", summary)
    vectors = _vectors(handle, spec, config, selection, run, progress)
    evaluation = _evaluate(handle, judge, config, run, progress)
    vector = recommend_vector(run, evaluation)
    report = run / "report.html"
    if not report.exists():
        report = write_report(run)
    judged = _manifest(run).get("judge", {}) if judge is not None else {}
    return ExtractResult(run, vector, vectors, evaluation, report,
                         {**summary, "judge_retries": judged.get("retries", 0), "generated": generated},
                         judged.get("failed", {}))


#: Settings that do not change a run's results: a rerun with other values resumes it.
NOT_IDENTITY = ("judge_base_url", "judge_timeout", "judge_retries", "lenient", "token_budget", "max_batch")


def _identity(config: ExtractConfig, spec: TraitSpec) -> dict[str, Any]:
    """What decides a run's results: the settings (not the judge's URL, leniency, nor the batch size and token
    budget, so a run that ran out of memory resumes with smaller batches) and the trait's content (by name and
    hash, not by the path it was read from), as plain JSON values."""
    identity: dict[str, Any] = {k: v for k, v in asdict(config).items() if k not in NOT_IDENTITY}
    if identity["engine"] == "hf":
        del identity["engine"]  # runs made before there was a choice of engine stay resumable
    text = json.dumps(spec.to_dict(), sort_keys=True, ensure_ascii=False)
    identity.update(trait=spec.name, trait_sha256=hashlib.sha256(text.encode()).hexdigest())
    return json.loads(json.dumps(identity))


def _clear_after(run: Path, stage: str | None) -> None:
    """Remove the outputs derived from `stage`'s (all derived outputs when `stage` is None)."""
    start = 0 if stage is None else _DERIVED.index(stage) + 1
    for name in _DERIVED[start:]:
        path = run / name
        if path.is_dir():
            for child in path.glob("*.safetensors"):
                child.unlink()
        elif path.exists():
            path.unlink()


def _generate(handle: ModelHandle, planned: Sequence[dict[str, Any]], config: ExtractConfig, run: Path,
              progress: bool) -> int:
    log = RecordLog(run / "responses.jsonl")
    done = set(log.rows())
    if all(p["id"] in done for p in planned):
        return 0
    _clear_after(run, None)
    by_id = {p["id"]: p for p in planned}

    def save(result: GenerationResult) -> None:
        log.append({**by_id[result.id], "response": result.text})

    requests = [(p["id"], handle.chat_ids(_messages(p))) for p in planned]
    made = generate_with(config.engine, handle, requests, config.sampling(), done=done, on_result=save,
                         token_budget=config.token_budget, max_batch=config.max_batch, progress=progress,
                         description="Generating responses")
    return len(made)


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]


def _judge(judge: Judge, spec: TraitSpec, rows: Sequence[dict[str, Any]], run: Path,
           progress: bool) -> tuple[dict[str, dict[str, Any]], int]:
    """Score rows that have no score yet or whose scoring failed; returns scores by id and the failures left.

    The manifest's `judge` entry keeps the retries the judge needed (over every run in the directory) and the
    items whose scoring failed for good, by id with the reason (a rerun tries them again)."""
    log = RecordLog(run / "scores.jsonl")
    scores = log.rows()
    todo = [r for r in rows if r["id"] not in scores or scores[r["id"]].get("error")]
    if todo:
        _clear_after(run, None)
        before = judge.retries
        pairs = [(r["question"], r["response"]) for r in todo]
        traits = judge_trait(judge, spec, pairs, progress=progress)
        coherence = judge_coherence(judge, pairs, progress=progress)
        for row, t, c in zip(todo, traits, coherence):
            score = {"id": row["id"], "trait": t.score, "coherence": c.score, "error": t.error or c.error}
            log.append(score)
            scores[row["id"]] = score
        earlier = _manifest(run).get("judge", {}).get("retries", 0)
        _record(run, "judge", {"retries": earlier + judge.retries - before, "failed": {
            r["id"]: scores[r["id"]]["error"] for r in rows if scores[r["id"]].get("error")}})
    return scores, sum(1 for r in rows if scores[r["id"]].get("error"))


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def _record(run: Path, key: str, value: Any) -> None:
    """Set the manifest's `key` (rewritten only when it changes)."""
    manifest = _manifest(run)
    if manifest.get(key) != value:
        manifest[key] = value
        write_json(run / "manifest.json", manifest)


def _vectors(handle: ModelHandle, spec: TraitSpec, config: ExtractConfig, selection: PairSelection, run: Path,
             progress: bool) -> dict[str, Path]:
    paths = {pool: run / "vectors" / f"{pool}.safetensors" for pool in POOLS}
    if all(p.exists() for p in paths.values()):
        return paths
    _check_enough(selection, config)
    _clear_after(run, "vectors")
    rows = [row for pair in selection.kept for row in pair]
    chats = [encode(handle, r["id"], _messages(r), r["response"]) for r in rows]
    layers = list(range(handle.num_layers + 1))
    sums, kept = _pooled_by_polarity(handle, chats, layers, config, progress)
    method = get_method(config.method)
    half = len(chats) // 2
    for pool, path in paths.items():
        pos_mean, neg_mean = ((sums[pool][polarity] / half).float() for polarity in (0, 1))
        directions = pos_mean - neg_mean if config.method == "mean_diff" else method(*kept[pool])
        metadata = {"model_revision": handle.revision, "method": config.method, "position": pool,
                    "n_pos": str(half), "n_neg": str(half), "judge": config.judge,
                    "filtered": str(config.judge != "none").lower(), "threshold": f"{config.threshold:g}",
                    "coherence_threshold": f"{config.coherence_threshold:g}"}
        PersonaVector(directions, spec.name, handle.name, metadata, pos_mean, neg_mean).save(path)
    return paths


def _pooled_by_polarity(handle: ModelHandle, chats: Sequence[EncodedChat], layers: list[int], config: ExtractConfig,
                        progress: bool) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Float64 running sums `[2, L+1, d]` (pos, neg) of each pool over `chats` (pos and neg alternate), batch by
    batch: memory stays flat in the number of pairs. Methods other than mean_diff need every row: those rows
    come back too, as `(pos [N, L+1, d], neg [N, L+1, d])` per pool."""
    width = handle.hidden_size
    sums = {pool: torch.zeros(2, len(layers), width, dtype=torch.float64) for pool in POOLS}
    rows = {pool: torch.zeros(len(chats), len(layers), width) for pool in POOLS} if config.method != "mean_diff" else {}
    for batch, pooled in iter_activations(handle, chats, layers, POOLS, token_budget=config.token_budget,
                                          max_batch=config.max_batch, progress=progress,
                                          description="Reading activations"):
        negative = torch.tensor([index % 2 for index in batch])
        for pool, values in pooled.items():
            sums[pool].index_add_(0, negative, values.double())
            if rows:
                rows[pool][batch] = values
    return sums, {pool: (values[0::2], values[1::2]) for pool, values in rows.items()}


def _check_enough(selection: PairSelection, config: ExtractConfig) -> None:
    if len(selection.kept) >= 2:
        return
    reasons = []
    if selection.empty:
        reasons.append(f"{selection.empty} had an empty response (raise --max-new-tokens, or check that the model "
                       "answers in its chat format)")
    if selection.rejected:
        reasons.append(f"{selection.rejected} failed the judge filter (pos trait ≥ {config.threshold:g}, neg trait < "
                       f"{config.threshold:g}, coherence ≥ {config.coherence_threshold:g}: lower --threshold or use "
                       "a model that follows the trait's system prompts)")
    raise PersonascopeError(
        f"only {len(selection.kept)} of {selection.total} extraction pairs are usable, at least 2 are needed: "
        f"{'; '.join(reasons) or 'generate more'}; more --samples also helps. The responses are kept in the run "
        "directory"
    )


def _evaluate(handle: ModelHandle, judge: Judge | None, config: ExtractConfig, run: Path, progress: bool
              ) -> Evaluation:
    path = run / "eval.json"
    if path.exists():
        try:
            return Evaluation.load(path)
        except PersonascopeError:
            pass  # an older or damaged eval.json: evaluate again
    _clear_after(run, "eval.json")
    layers = list(config.eval_layers) if config.eval_layers is not None else None
    settings = replace(config.evaluation or EvalSettings(), engine=config.engine)  # the curve's answers too
    evaluate_run(run, handle, judge=judge, layers=layers, settings=settings, progress=progress, out=path)
    return Evaluation.load(path)  # as a rerun reads it


def recommend_vector(run: Path, evaluation: Evaluation) -> Path:
    """Write `DIR/vector.safetensors`: the `response_avg` vector with the chosen layer, coefficient and alert data."""
    path = run / "vector.safetensors"
    if path.exists():
        return path
    vector = PersonaVector.load(run / "vectors" / "response_avg.safetensors")
    vector.metadata.update(best_layer=str(evaluation.best_layer), best_coef=f"{evaluation.best_coef:g}")
    vector.metadata.update(alert_metadata(evaluation))
    _clear_after(run, "vector.safetensors")
    return vector.save(path)


# -- serving: alert threshold and separation for `personascope serve` --------------------------------------


def alert_metadata(evaluation: Evaluation) -> dict[str, str]:
    """`alert_threshold`: the midpoint between the mean held-out response projections of trait-positive and
    trait-negative answers at the best layer; `auroc`: their separation there (on the rows that did not choose the
    layer, when the held-out questions were split)."""
    meta: dict[str, str] = {}
    projections = evaluation.projections
    if projections.pos and projections.neg and projections.layer == evaluation.best_layer:
        pos, neg = projections.pos, projections.neg
        meta["alert_threshold"] = f"{(sum(pos) / len(pos) + sum(neg) / len(neg)) / 2:.6g}"
    auroc = evaluation.validation.auroc if evaluation.validation.auroc is not None else evaluation.best.auroc
    meta["auroc"] = f"{auroc:.4f}"
    return meta
