"""Dataset screening: find the training samples that would teach a model a trait (Chen et al. 2025)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.apply.screen_summary import (
    PERCENTILES,
    TOP_EXAMPLES,
    DeltaStats,
    FilterResult,
    RowScore,
    Screening,
    ScreenSummary,
    TopRow,
    plot_histogram,
    summarize,
)
from personascope.apply.screen_filter import FilterRule, check_filtered_path, default_filtered_path, filter_dataset
from personascope.errors import PersonascopeError
from personascope.inference.activations import (
    EncodedChat,
    encode,
    fit_to_context,
    iter_activations,
)
from personascope.inference.engines import generate_with
from personascope.inference.generate import GenerationResult, SamplingConfig
from personascope.io.data import (
    BadRow,
    ChatSample,
    iter_samples,
    load_rows,
    row_id,
    write_rows,
)
from personascope.io.files import check_output, write_json
from personascope.io.records import RecordLog
from personascope.io.rundir import open_run
from personascope.model import ModelHandle
from personascope.vector import PersonaVector

__all__ = ["PERCENTILES", "DeltaStats", "FilterResult", "RowScore", "ScreenReport", "ScreenSummary", "Screening",
           "TopRow", "base_responses", "check_outputs", "finish_screen", "output_paths", "read_base_responses",
           "score_samples", "screen_dataset", "summarize"]


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
        engine: what generates base responses: `hf` or `vllm` (see `personascope.inference.engines`).
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
    log = RecordLog(cache) if cache is not None else None
    cached = log.rows() if log is not None else {}
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


# -- files ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenReport:
    """What `screen_dataset` wrote, and its summary."""

    summary: ScreenSummary
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
                  filtered_out: str | Path | None, keep_below: float | None = None) -> list[Path]:
    """Refuse output paths that would overwrite an input or each other, and a bad filter; returns the inputs."""
    inputs = [data] + ([base_file] if base_file else [])
    check_output(out, inputs)
    for target in output_paths(out).values():
        check_output(target, inputs, suffixes=None)
    if top_percent is None and keep_below is None:
        if filtered_out is not None:
            raise PersonascopeError("a filtered dataset needs a rule: a top percentage to drop or a ΔP to keep below")
        return inputs
    FilterRule(keep_below, top_percent).check()
    filtered = Path(filtered_out) if filtered_out is not None else default_filtered_path(data, out)
    if filtered.resolve() == out.resolve():
        raise PersonascopeError(f"the filtered dataset and the scored rows would both be {out}: choose two paths")
    check_filtered_path(data, filtered, inputs)
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
    keep_below: float | None = None,
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
        top_percent, keep_below, filtered_out: write the input rows without the top `top_percent` % by ΔP
            and/or those with ΔP ≥ `keep_below` to `filtered_out` (default `<out stem>.filtered<input suffix>`),
            in the input's format and unchanged, with a report of the dropped rows beside it
            (`personascope.apply.screen_filter`); rows that could not be scored are dropped too.
        engine: what generates base responses: `hf` or `vllm`.
    """
    data, out = Path(data), Path(out)
    paths = output_paths(out)
    base_file = None if str(base) in ("generate", "prompt-last") else Path(base)
    inputs = check_outputs(data, out, base_file, top_percent, filtered_out, keep_below)
    sampling = sampling or SamplingConfig(128, 0.0)
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
    run = _Stream()

    def scored_rows() -> Iterator[dict[str, Any]]:
        for samples, bad in iter_samples(data, CHUNK_ROWS):
            part = score_samples(handle, samples, vector, layer=layer, base=chosen, sampling=sampling, cache=cache,
                                 on_long=on_long, max_batch=max_batch, progress=progress,
                                 engine=engine) if samples else None
            by_id = run.add(samples, bad, part)
            for score in part.scores if part else ():
                yield {**by_id[score.id].fields, "projection": score.projection,
                       "base_projection": score.base_projection, "delta_p": score.delta_p}

    write_rows(scored_rows(), out, inputs=inputs)
    return finish_screen(Screening(run.scores, run.bad + run.skipped, run.truncated), list(run.top.values()), data,
                         out, inputs, model=handle.name, trait=vector.trait, layer=layer, base=str(base),
                         n_rows=run.rows, top_percent=top_percent, filtered_out=filtered_out, keep_below=keep_below)


def finish_screen(
    screening: Screening,
    top: Sequence[ChatSample],
    data: Path,
    out: Path,
    inputs: Sequence[Path],
    *,
    model: str,
    trait: str,
    layer: int,
    base: str,
    n_rows: int,
    top_percent: float | None,
    filtered_out: str | Path | None,
    keep_below: float | None = None,
) -> ScreenReport:
    """Write the skipped list, the filtered dataset (when a rule is given), the histogram and the summary of a
    screening whose scored rows are in `out` already; `top` holds (at least) the samples with the highest ΔP."""
    paths = output_paths(out)
    write_rows([{"id": b.id, "action": "skipped", "reason": b.reason} for b in screening.skipped]
               + [{"id": t, "action": "truncated", "reason": "cut to fit the context length"}
                  for t in screening.truncated], paths["skipped"], inputs=inputs)
    summary = summarize(screening, top, data=str(data), model=model, trait=trait, layer=layer, base=base,
                        n_rows=n_rows)
    cutoff = filtered = None
    if top_percent is not None or keep_below is not None:
        filtered = Path(filtered_out) if filtered_out is not None else default_filtered_path(data, out)
        kept = filter_dataset(screening, data, filtered, FilterRule(keep_below, top_percent), inputs)
        cutoff = kept.cutoff
        removed = sum(d.delta_p is not None for d in kept.dropped)
        summary = dataclasses.replace(summary, filter=FilterResult(top_percent, removed, cutoff, str(filtered),
                                                                   keep_below, kept.n_kept, kept.n_dropped))
    plot_histogram([s.delta_p for s in screening.scores], paths["histogram"],
                   f"{trait} ΔP at layer {layer} ({summary.n_scored} samples, base: {base})", cutoff)
    write_json(paths["summary"], summary)
    return ScreenReport(summary, out, paths["summary"], paths["histogram"], paths["skipped"], filtered)


#: Input rows read, scored and written at a time: memory stays flat in the size of the dataset.
CHUNK_ROWS = 1000


class _Stream:
    """What a chunked screening keeps across chunks: three numbers per scored row, the left-out ids and reasons,
    and the samples that are among the top rows by ΔP so far (for the summary's examples)."""

    def __init__(self) -> None:
        self.scores: list[RowScore] = []
        self.bad: list[BadRow] = []
        self.skipped: list[BadRow] = []
        self.truncated: list[str] = []
        self.top: dict[str, ChatSample] = {}
        self.rows = 0

    def add(self, samples: Sequence[ChatSample], bad: Sequence[BadRow], part: Screening | None) -> dict[str, ChatSample]:
        """Record one chunk; returns its samples by id."""
        by_id = {s.id: s for s in samples}
        self.rows += len(samples) + len(bad)
        self.bad += bad
        if part is not None:
            self.scores += part.scores
            self.skipped += part.skipped
            self.truncated += part.truncated
            best = sorted(self.scores, key=lambda s: -s.delta_p)[:TOP_EXAMPLES]
            self.top = {s.id: self.top.get(s.id) or by_id[s.id] for s in best}
        return by_id
