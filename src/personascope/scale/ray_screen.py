"""Screening with Ray Data: the dataset streams through an actor pool holding one model per worker, into
resumable shards, then into the same files as `screen_dataset`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from personascope.apply.screen import (
    TOP_EXAMPLES,
    RowScore,
    Screening,
    ScreenReport,
    check_outputs,
    finish_screen,
    output_paths,
    score_samples,
)
from personascope.errors import PersonascopeError
from personascope.inference.engines import check_engine
from personascope.inference.generate import SamplingConfig
from personascope.io.data import BadRow, ChatSample, to_sample, write_rows
from personascope.io.progress import progress_bar
from personascope.io.rundir import open_run
from personascope.scale.shards import ShardWriter, read_shard

INDEX = "__personascope_index"


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run.

    Attributes:
        address: `local` (start a Ray instance in this process, sized for `workers`), `auto` (the running
            cluster, e.g. after `ray start --head`) or a cluster address (`ray://host:10001`, `host:6379`).
        workers: scoring actors, each holding one model.
        gpus_per_worker: GPUs each actor reserves (0 on a CPU; fractions share a GPU).
        cpus_per_worker: CPUs each actor reserves (its torch threads).
        shard_rows: consecutive rows per output shard (the unit a killed run resumes by).
    """

    address: str = "local"
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shard_rows: int = 1000

    def check(self) -> None:
        if self.workers < 1 or self.shard_rows < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise PersonascopeError(f"bad Ray settings {asdict(self)}: workers and shard rows must be at least 1, "
                                    "CPUs per worker above 0 and GPUs per worker not negative")


class _Scorer:
    """A Ray Data actor: loads the model and the vector once, then scores batches of rows."""

    def __init__(self, model: str, load: dict[str, Any], vector: str, layer: int, base: str,
                 sampling: dict[str, Any], engine: str, on_long: str, max_batch: int, threads: int) -> None:
        import torch

        from personascope.model import load_model
        from personascope.vector import PersonaVector

        torch.set_num_threads(threads)
        self.handle = load_model(model, **load)
        self.vector = PersonaVector.load(vector, self.handle)
        self.options = {"layer": layer, "base": base, "sampling": SamplingConfig(**sampling), "engine": engine,
                        "on_long": on_long, "max_batch": max_batch, "progress": False}

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        records: list[tuple[int, str, str, dict[str, Any]]] = []
        samples: list[ChatSample] = []
        where: dict[str, int] = {}
        for row in table.to_pylist():
            index = int(row.pop(INDEX))
            item = to_sample(row, index)
            if isinstance(item, ChatSample) and item.id in where:
                item = BadRow(item.id, "duplicate id")
            if isinstance(item, BadRow):
                records.append((index, "skipped", item.id, {"id": item.id, "action": "skipped", "reason": item.reason}))
                continue
            where[item.id] = index
            samples.append(item)
        if samples:
            screening = score_samples(self.handle, samples, self.vector, **self.options)
            fields = {s.id: s.fields for s in samples}
            for score in screening.scores:
                records.append((where[score.id], "scored", score.id, {
                    **fields[score.id], "projection": score.projection, "base_projection": score.base_projection,
                    "delta_p": score.delta_p}))
            for bad in screening.skipped:
                records.append((where[bad.id], "skipped", bad.id, {"id": bad.id, "action": "skipped",
                                                                   "reason": bad.reason}))
            for rid in screening.truncated:
                records.append((where[rid], "truncated", rid, {"id": rid, "action": "truncated",
                                                               "reason": "cut to fit the context length"}))
        return pa.table({INDEX: [r[0] for r in records], "kind": [r[1] for r in records],
                         "id": [r[2] for r in records],
                         "record": [json.dumps(r[3], ensure_ascii=False, default=str) for r in records]})


def _drop_done(table: Any, done: frozenset[int], recorded: frozenset[int], shard_rows: int) -> Any:
    """Rows of `table` that are not recorded yet: neither in a finished shard nor among `recorded` rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if done:
        shard = pc.divide(table[INDEX], pa.scalar(shard_rows, table[INDEX].type))
        table = table.filter(pc.invert(pc.is_in(shard, pa.array(sorted(done), table[INDEX].type))))
    if recorded:
        table = table.filter(pc.invert(pc.is_in(table[INDEX], pa.array(sorted(recorded), table[INDEX].type))))
    return table


#: The `ray.data` reader of each input format.
READERS = {".jsonl": "read_json", ".json": "read_json", ".parquet": "read_parquet"}


def _connect(ray: Any, settings: RaySettings) -> bool:
    """Join or start Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    if settings.address == "local":
        cpus = math.ceil(settings.workers * settings.cpus_per_worker) + 1  # one more for the read and zip tasks
        ray.init(num_cpus=cpus, num_gpus=math.ceil(settings.workers * settings.gpus_per_worker),
                 include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=settings.address, log_to_driver=False)
    return True


def ray_screen(
    data: str | Path,
    vector: str | Path,
    out: str | Path,
    *,
    model: str,
    layer: int | None = None,
    base: str = "generate",
    sampling: SamplingConfig | None = None,
    engine: str = "hf",
    on_long: str = "skip",
    top_percent: float | None = None,
    filtered_out: str | Path | None = None,
    keep_below: float | None = None,
    max_batch: int = 32,
    settings: RaySettings | None = None,
    load: dict[str, Any] | None = None,
    progress: bool = True,
) -> ScreenReport:
    """`screen_dataset` on Ray: the same files and summary, written from shards scored by `settings.workers`
    actors. `data` and `vector` must be readable from every node (a shared file system or object store).

    Args:
        model: the model each worker loads (embedded name, HF id or directory).
        base: `generate` (base answers made in the workers, by `engine`) or `prompt-last`.
        load: keyword arguments of `load_model` in each worker (`device`, `dtype`, `device_map`).
    """
    try:
        import ray
    except ImportError:
        raise PersonascopeError("--ray needs Ray Data: pip install 'personascope[scale]' (or run make setup)") from None
    from personascope.vector import PersonaVector

    settings = settings or RaySettings()
    settings.check()
    if top_percent is not None and not 0 < top_percent < 100:
        raise PersonascopeError(f"top percentage must be between 0 and 100 (exclusive), got {top_percent}")
    check_engine(engine)
    if base not in ("generate", "prompt-last"):
        raise PersonascopeError("with --ray the base is 'generate' or 'prompt-last', not a file of responses")
    data, out, vector = Path(data), Path(out), Path(vector).resolve()
    inputs = check_outputs(data, out, None, top_percent, filtered_out, keep_below)
    if not data.exists():
        raise PersonascopeError(f"dataset {data} does not exist")
    if data.suffix.lower() not in READERS:
        raise PersonascopeError(f"--ray reads .jsonl or .parquet files, not {data.name}: convert it, or drop --ray")
    sampling = sampling or SamplingConfig(128, 0.0)
    vec = PersonaVector.load(vector)  # the driver loads no model: the workers check the vector against theirs
    layer = vec.layer(layer)
    paths = output_paths(out)
    stat = data.stat()  # a file rewritten in place starts the shards afresh
    identity = {"data": str(data.resolve()), "data_bytes": stat.st_size, "data_mtime_ns": stat.st_mtime_ns,
                "model": model, "vector_sha256": _sha256(vector), "layer": layer,
                "base": base, "sampling": asdict(sampling), "engine": engine, "on_long": on_long,
                "shard_rows": settings.shard_rows}
    writer = ShardWriter(open_run(paths["work"] / "ray", identity), settings.shard_rows)
    started = _connect(ray, settings)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # `zip` pairs rows with their index by position
        dataset = getattr(ray.data, READERS[data.suffix.lower()])(str(data.resolve()))
        try:
            n_rows = dataset.count()
        except Exception as exc:  # pyarrow's parse errors arrive wrapped in Ray's
            lines = str(exc).strip().splitlines()
            raise PersonascopeError(f"ray.data cannot read {data}: {lines[-1] if lines else exc!r}") from None
        writer.plan(n_rows)
        if writer.pending:
            _run_pipeline(ray, dataset, n_rows, writer, settings, progress, dict(
                model=model, load=load or {}, vector=str(vector), layer=layer, base=base, sampling=asdict(sampling),
                engine=engine, on_long=on_long, max_batch=max_batch, threads=max(1, int(settings.cpus_per_worker))))
    finally:
        if started:
            ray.shutdown()
    return _assemble(writer, data, out, inputs, vec.model or model, vec.trait, layer, base, n_rows, top_percent,
                     filtered_out, keep_below)


def _run_pipeline(ray: Any, dataset: Any, n_rows: int, writer: ShardWriter, settings: RaySettings, progress: bool,
                  scorer: dict[str, Any]) -> None:
    """Score the unfinished shards' rows and hand each record to the shard writer."""
    indexed = dataset.zip(ray.data.range(n_rows).rename_columns({"id": INDEX}))
    todo = indexed.map_batches(_drop_done, fn_kwargs={"done": frozenset(writer.done),
                                                      "recorded": frozenset(writer.recorded),
                                                      "shard_rows": settings.shard_rows}, batch_format="pyarrow")
    scored = todo.map_batches(
        _Scorer, fn_constructor_kwargs=scorer, batch_format="pyarrow", batch_size=4 * scorer["max_batch"],
        compute=ray.data.ActorPoolStrategy(size=settings.workers), num_cpus=settings.cpus_per_worker,
        num_gpus=settings.gpus_per_worker or None,
    )
    try:
        with progress_bar(writer.pending_rows, "Screening (Ray)", enabled=progress) as bar:
            for table in scored.iter_batches(batch_format="pyarrow", batch_size=None):
                rows = writer.add(table[INDEX].to_pylist(), table["kind"].to_pylist(), table["id"].to_pylist(),
                                  [json.loads(record) for record in table["record"].to_pylist()])
                bar.advance(0, rows)
    except ray.exceptions.RayError as exc:
        cause = str(exc).strip().splitlines()
        raise PersonascopeError(f"a Ray worker failed ({writer.finished} shards are kept for a rerun): "
                                f"{cause[-1] if cause else type(exc).__name__}") from None
    writer.check_complete()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(writer: ShardWriter) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """Every record of the finished shards, in row order."""
    for shard in range(writer.count):
        yield from read_shard(writer.path(shard))


def _assemble(writer: ShardWriter, data: Path, out: Path, inputs: list[Path], model: str, trait: str, layer: int,
              base: str, n_rows: int, top_percent: float | None, filtered_out: str | Path | None,
              keep_below: float | None) -> ScreenReport:
    """Stream the finished shards into the scored rows, then write the rest as `screen_dataset` does.

    Ids are made unique over the whole file here, as `iter_samples` does (a worker sees only its batches): a row
    whose id an earlier row had is left out as a duplicate, whatever its worker made of it."""
    scores: list[RowScore] = []
    skipped: list[BadRow] = []
    truncated: list[tuple[int, str]] = []
    seen: set[str] = set()
    kept: set[int] = set()

    def scored() -> Iterator[dict[str, Any]]:
        for index, kind, row_id, record in _records(writer):
            if kind == "truncated":
                truncated.append((index, row_id))
                continue
            if row_id in seen:
                skipped.append(BadRow(row_id, "duplicate id"))
            elif kind == "skipped":
                skipped.append(BadRow(row_id, record["reason"]))
            else:
                kept.add(index)
                scores.append(RowScore(row_id, record["projection"], record["base_projection"]))
                yield record
            seen.add(row_id)

    write_rows(scored(), out, inputs=inputs)
    best = {s.id for s in sorted(scores, key=lambda s: -s.delta_p)[:TOP_EXAMPLES]}
    top = [to_sample(record, index) for index, kind, row_id, record in _records(writer)
           if kind == "scored" and index in kept and row_id in best]
    screening = Screening(scores, skipped, [row_id for index, row_id in truncated if index in kept])
    return finish_screen(screening, [s for s in top if isinstance(s, ChatSample)], data, out, inputs, model=model,
                         trait=trait, layer=layer, base=base, n_rows=n_rows, top_percent=top_percent,
                         filtered_out=filtered_out, keep_below=keep_below)
