"""Dataset screening: find the training samples that would teach a model a trait (Chen et al. 2025).

Per sample (prompt, training response), at one layer of one persona vector:

* `projection`: the training response's activations averaged over its tokens (`response_avg`), projected on
  the vector's unit direction — how much the response expresses the trait, read by the model being trained;
* `base_projection`: the same reading of the base model's *own* answer to the same prompt — generated here in
  batches (cached under the run's work folder, resumable) or read from a file. With `base="prompt-last"` (the
  paper's cheap approximation) it is instead the projection of the activation at the prompt's last token (the
  end of the assistant header), read in the same forward pass as `projection` — causal attention keeps it blind
  to the training answer — so no answer is generated. It measures how strongly the model is poised to show the
  trait before it answers; being read at another position than a mean over answer tokens, it sits at another
  typical level, so that ΔP suits ranking the rows of one run, not comparing values with generated-base ΔP;
* `delta_p = projection − base_projection`: how much more the sample shows the trait than the model would by
  itself. Samples with a high ΔP are the ones fine-tuning would learn the trait from.

Activations stream batch by batch; only three numbers per row are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from personascope.activations import EncodedChat, encode, fit_to_context, iter_activations
from personascope.data import BadRow, ChatSample, load_rows, load_samples, row_id, write_rows
from personascope.errors import PersonascopeError
from personascope.generate import GenerationResult, SamplingConfig
from personascope.models import ModelHandle
from personascope.rundir import JsonlLog, open_run, write_json
from personascope.scale.engines import generate_with
from personascope.vector import PersonaVector

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
TOP_EXAMPLES = 10


@dataclass(frozen=True)
class RowScore:
    """The readings of one sample."""

    id: str
    projection: float
    base_projection: float

    @property
    def delta_p(self) -> float:
        return self.projection - self.base_projection


@dataclass(frozen=True)
class Screening:
    """Scores in dataset order, the rows left out (with reasons) and the ids whose text was cut to fit."""

    scores: list[RowScore]
    skipped: list[BadRow]
    truncated: list[str]


def score_samples(
    handle: ModelHandle,
    samples: Sequence[ChatSample],
    vector: PersonaVector,
    *,
    layer: int | None = None,
    base: str | Mapping[str, str] = "generate",
    sampling: SamplingConfig | None = None,
    cache: str | Path | None = None,
    on_long: str = "skip",
    max_batch: int = 32,
    progress: bool = True,
    engine: str = "hf",
) -> Screening:
    """Score each sample's ΔP along `vector`.

    Args:
        layer: the layer to read (default: the vector's best layer).
        base: `"generate"` (the base model answers each prompt), `"prompt-last"` (last-prompt-token
            approximation) or a mapping from sample id to the base model's response.
        sampling: how base responses are generated (default: greedy, 128 new tokens).
        cache: a JSONL file keeping generated base responses, so an interrupted run resumes.
        on_long: rows over the context length: `skip`, `truncate` (cut the response) or `error`.
        engine: what generates base responses: `hf` or `vllm` (see `personascope.scale`).
    """
    vector.check_model(handle)
    layer = vector.layer(layer)
    unit = vector.unit(layer)
    chats = [encode(handle, s.id, s.prompt, s.response) for s in samples]
    kept, skipped = fit_to_context(handle, chats, on_long)
    full = {c.id: len(c.ids) for c in chats}
    truncated = [c.id for c in kept if len(c.ids) < full[c.id]]
    if base == "prompt-last":
        read = _project(handle, kept, layer, unit, ("response_avg", "prompt_last"), max_batch, progress)
        scores = [RowScore(c.id, p, b) for c, p, b in zip(kept, read["response_avg"], read["prompt_last"])]
        return Screening(scores, skipped, truncated)
    if base == "generate":
        texts, unanswered = base_responses(handle, kept, sampling or SamplingConfig(128, 0.0), cache=cache,
                                           on_long=on_long, max_batch=max_batch, progress=progress, engine=engine)
        skipped += unanswered
    elif isinstance(base, Mapping):
        texts = base
        missing = [c.id for c in kept if c.id not in texts]
        if missing:
            raise PersonascopeError(
                f"the base responses have no row for {len(missing)} samples (ids {', '.join(missing[:5])}): "
                "add them, or generate them (base='generate')"
            )
    else:
        raise PersonascopeError(f"unknown base {base!r}: use 'generate', 'prompt-last' or a mapping of responses")
    prompts = {s.id: s.prompt for s in samples}
    base_chats = []
    for chat in kept:
        if chat.id in texts and not texts[chat.id].strip():
            skipped.append(BadRow(chat.id, "the base model's response is empty"))
        elif chat.id in texts:
            base_chats.append(encode(handle, chat.id, prompts[chat.id], texts[chat.id]))
    base_chats, too_long = fit_to_context(handle, base_chats, on_long)
    skipped += [BadRow(b.id, f"base response: {b.reason}") for b in too_long]
    scored = {c.id for c in base_chats}
    train = [c for c in kept if c.id in scored]
    read = _project(handle, train + base_chats, layer, unit, ("response_avg",), max_batch, progress)["response_avg"]
    scores = [RowScore(c.id, p, b) for c, p, b in zip(train, read[: len(train)], read[len(train):])]
    return Screening(scores, skipped, [t for t in truncated if t in scored])


def _project(
    handle: ModelHandle, chats: Sequence[EncodedChat], layer: int, unit: Tensor, pools: Sequence[str],
    max_batch: int, progress: bool,
) -> dict[str, list[float]]:
    """Projection of each chat's pooled activation at `layer` on `unit`, per pool, in input order."""
    out = {pool: torch.zeros(len(chats)) for pool in pools}
    for batch, pooled in iter_activations(handle, chats, [layer], pools, max_batch=max_batch, progress=progress,
                                          description="Projecting samples"):
        for pool in pools:
            out[pool][batch] = pooled[pool][:, 0] @ unit
    return {pool: values.tolist() for pool, values in out.items()}


def base_responses(
    handle: ModelHandle,
    chats: Sequence[EncodedChat],
    sampling: SamplingConfig,
    *,
    cache: str | Path | None = None,
    on_long: str = "skip",
    max_batch: int = 32,
    progress: bool = True,
    engine: str = "hf",
) -> tuple[dict[str, str], list[BadRow]]:
    """The base model's own response to each chat's prompt, generated in batches.

    With `cache`, each response is appended to that JSONL file as it is made (with a hash of its prompt ids);
    rows already there for the same prompt are reused, so a killed run loses at most one batch.

    Returns:
        Responses by chat id, and the chats whose prompt leaves no room for `max_new_tokens`.
    """
    limit, room = handle.max_length, sampling.max_new_tokens
    requests, bad = [], []
    for chat in chats:
        if limit and chat.prompt_len + room > limit:
            reason = f"prompt of {chat.prompt_len} tokens leaves no room for {room} new tokens (context {limit})"
            if on_long == "error":
                raise PersonascopeError(f"row {chat.id}: {reason}; shorten it, or use on_long skip")
            bad.append(BadRow(chat.id, reason))
        else:
            requests.append((chat.id, chat.ids[: chat.prompt_len]))
    digests = {rid: hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16] for rid, ids in requests}
    log = JsonlLog(cache) if cache is not None else None
    cached = log.read() if log is not None else {}
    texts = {rid: str(row.get("response") or "") for rid, row in cached.items()
             if rid in digests and row.get("prompt_sha") == digests[rid]}

    def keep(result: GenerationResult) -> None:
        texts[result.id] = result.text
        if log is not None:
            log.append({"id": result.id, "response": result.text, "prompt_sha": digests[result.id]})

    generate_with(engine, handle, requests, sampling, done=set(texts), on_result=keep, max_batch=max_batch,
                  progress=progress, description="Generating base responses")
    return texts, bad


def read_base_responses(path: str | Path) -> dict[str, str]:
    """Base responses from a file (JSONL, CSV, Parquet or dataset dir) of rows with `id` and `response`."""
    if not Path(path).exists():
        raise PersonascopeError(
            f"base responses {path} do not exist: give 'generate', 'prompt-last' or a file with 'id' and 'response'"
        )
    rows = load_rows(path)
    if "response" not in rows.column_names:
        raise PersonascopeError(f"base responses {path} need a 'response' column (and an 'id' matching the data)")
    return {row_id(row, i): str(row["response"] or "") for i, row in enumerate(rows)}


# -- summary, histogram, filtered dataset ---------------------------------------------------------------


def summarize(screening: Screening, samples: Sequence[ChatSample], top: int = TOP_EXAMPLES) -> dict[str, Any]:
    """Mean, spread and percentiles of ΔP, mean readings, and the `top` samples by ΔP."""
    by_id = {s.id: s for s in samples}
    ranked = sorted(screening.scores, key=lambda s: -s.delta_p)[:top]
    return {
        **score_stats(np.array([s.delta_p for s in screening.scores]),
                      float(np.mean([s.projection for s in screening.scores] or [0.0])),
                      float(np.mean([s.base_projection for s in screening.scores] or [0.0]))),
        "n_skipped": len(screening.skipped),
        "n_truncated": len(screening.truncated),
        "top": [top_entry(s, by_id[s.id]) for s in ranked],
    }


def score_stats(delta: np.ndarray, projection_mean: float, base_projection_mean: float) -> dict[str, Any]:
    """The count, mean, spread and percentiles of ΔP, with the mean readings."""
    if delta.size == 0:
        raise PersonascopeError("no sample could be scored: see the skipped rows and their reasons")
    return {
        "n_scored": int(delta.size),
        "delta_p": {"mean": float(delta.mean()), "std": float(delta.std()), "min": float(delta.min()),
                    "max": float(delta.max()),
                    "percentiles": {str(p): float(np.percentile(delta, p)) for p in PERCENTILES}},
        "projection_mean": projection_mean,
        "base_projection_mean": base_projection_mean,
    }


def top_entry(score: RowScore, sample: ChatSample) -> dict[str, Any]:
    """One row of the summary's `top` list."""
    return {"id": score.id, "delta_p": score.delta_p, "projection": score.projection,
            "base_projection": score.base_projection, "prompt": _last_user(sample)[:200],
            "response": sample.response[:300]}


def _last_user(sample: ChatSample) -> str:
    return next((m["content"] for m in reversed(sample.prompt) if m["role"] == "user"), "")


def top_ids(scores: Sequence[RowScore], percent: float) -> tuple[set[str], float]:
    """The ids of the top `percent` % of rows by ΔP (rounded up; ties by dataset order) and the lowest ΔP
    among them."""
    if not 0 < percent < 100:
        raise PersonascopeError(f"top percentage must be between 0 and 100 (exclusive), got {percent}")
    count = math.ceil(len(scores) * percent / 100)
    ranked = sorted(scores, key=lambda s: -s.delta_p)[:count]
    return {s.id for s in ranked}, ranked[-1].delta_p


def plot_histogram(delta: Sequence[float], path: Path, title: str, cutoff: float | None = None) -> Path:
    """A histogram of ΔP as a PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(delta, bins=max(10, min(60, len(delta) // 10)), color="#4c72b0")
    axes.axvline(0.0, color="black", linewidth=0.8)
    if cutoff is not None:
        axes.axvline(cutoff, color="#c44e52", linestyle="--", label=f"filter cutoff ΔP ≥ {cutoff:.3g}")
        axes.legend()
    axes.set(title=title, xlabel="ΔP = projection − base projection", ylabel="samples")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)
    return path


# -- files ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenReport:
    """What `screen_dataset` wrote, and its summary."""

    summary: dict[str, Any]
    scored: Path
    summary_path: Path
    histogram: Path
    skipped: Path
    filtered: Path | None


def output_paths(out: Path) -> dict[str, Path]:
    """The files next to `out` (`scored.jsonl` -> `scored.summary.json`, `scored.hist.png`,
    `scored.skipped.jsonl`, work folder `scored.work/`)."""
    return {"summary": out.with_suffix(".summary.json"), "histogram": out.with_suffix(".hist.png"),
            "skipped": out.with_suffix(".skipped.jsonl"), "work": out.with_suffix(".work")}


def check_outputs(data: Path, out: Path, base_file: Path | None, top_percent: float | None,
                  filtered_out: str | Path | None) -> list[Path]:
    """Refuse output paths that would overwrite an input or each other; returns the input paths."""
    inputs = [data] + ([base_file] if base_file else [])
    targets = [out, *output_paths(out).values()] + ([Path(filtered_out)] if filtered_out else [])
    for target in targets:
        if any(target.exists() and source.exists() and target.resolve() == source.resolve() for source in inputs):
            raise PersonascopeError(f"refusing to write {target} over an input: choose another output path")
    for target in (out, *([Path(filtered_out)] if filtered_out else [])):
        if target.suffix.lower() not in (".jsonl", ".parquet"):
            raise PersonascopeError(f"output {target}: use a .jsonl or .parquet file name")
    if (top_percent is None) != (filtered_out is None):
        raise PersonascopeError("a filtered dataset needs both a top percentage and an output path for it")
    if filtered_out is not None and Path(filtered_out).resolve() == out.resolve():
        raise PersonascopeError(f"the filtered dataset and the scored rows would both be {out}: choose two paths")
    return inputs


def screen_dataset(
    handle: ModelHandle,
    data: str | Path,
    vector: PersonaVector,
    out: str | Path,
    *,
    layer: int | None = None,
    base: str | Path = "generate",
    sampling: SamplingConfig | None = None,
    on_long: str = "skip",
    top_percent: float | None = None,
    filtered_out: str | Path | None = None,
    max_batch: int = 32,
    progress: bool = True,
    engine: str = "hf",
) -> ScreenReport:
    """Screen a chat dataset file and write the scored rows, summary, histogram and skipped-row list.

    Args:
        data: JSONL/CSV/Parquet file or saved dataset dir (`messages`, or `prompt`/`response` columns).
        out: the scored rows (`.jsonl` or `.parquet`): every scored input row with all its fields plus
            `projection`, `base_projection`, `delta_p`. Never an input file.
        base: `generate` (cached in `<out stem>.work/base_responses.jsonl`), `prompt-last`, or the path of a
            file of base responses (`id`, `response`).
        top_percent, filtered_out: write the scored rows (input fields only) without the top `top_percent` %
            by ΔP to `filtered_out`; rows that could not be scored are not in it.
        engine: what generates base responses: `hf` or `vllm`.
    """
    data, out = Path(data), Path(out)
    paths = output_paths(out)
    base_file = None if str(base) in ("generate", "prompt-last") else Path(base)
    inputs = check_outputs(data, out, base_file, top_percent, filtered_out)
    sampling = sampling or SamplingConfig(128, 0.0)
    samples, bad = load_samples(data)
    cache = None
    if base_file is not None:
        chosen: str | Mapping[str, str] = read_base_responses(base_file)
    else:
        chosen = str(base)
        if chosen == "generate":
            config = {"model": handle.source or handle.name, "max_new_tokens": sampling.max_new_tokens,
                      "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                      **({"engine": engine} if engine != "hf" else {})}
            cache = open_run(paths["work"], config) / "base_responses.jsonl"
    layer = vector.layer(layer)
    screening = score_samples(handle, samples, vector, layer=layer, base=chosen, sampling=sampling, cache=cache,
                              on_long=on_long, max_batch=max_batch, progress=progress, engine=engine)
    screening = Screening(screening.scores, bad + screening.skipped, screening.truncated)
    by_id = {s.id: s for s in samples}
    write_rows(({**by_id[s.id].fields, "projection": s.projection, "base_projection": s.base_projection,
                 "delta_p": s.delta_p} for s in screening.scores), out, inputs=inputs)
    write_rows([{"id": b.id, "action": "skipped", "reason": b.reason} for b in screening.skipped]
               + [{"id": t, "action": "truncated", "reason": "cut to fit the context length"}
                  for t in screening.truncated], paths["skipped"], inputs=inputs)
    summary = {"data": str(data), "model": handle.name, "trait": vector.trait, "layer": layer,
               "base": str(base), "n_rows": len(samples) + len(bad), **summarize(screening, samples)}
    cutoff = filtered = None
    if top_percent is not None and filtered_out is not None:
        removed, cutoff = top_ids(screening.scores, top_percent)
        filtered = write_rows((by_id[s.id].fields for s in screening.scores if s.id not in removed),
                              filtered_out, inputs=inputs)
        summary["filter"] = {"top_percent": top_percent, "n_removed": len(removed), "cutoff": cutoff,
                             "path": str(filtered)}
    plot_histogram([s.delta_p for s in screening.scores], paths["histogram"],
                   f"{vector.trait} ΔP at layer {layer} ({summary['n_scored']} samples, base: {base})", cutoff)
    write_json(paths["summary"], summary)
    return ScreenReport(summary, out, paths["summary"], paths["histogram"], paths["skipped"], filtered)
