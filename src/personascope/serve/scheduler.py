"""Micro-batching: concurrent requests share one forward pass, each row with its own steering and sampling.

One worker thread owns the model. It takes the requests that have arrived (waiting `batch_wait` seconds after
the first, up to `max_batch` rows and `token_budget` padded tokens), left-pads them, prefills, then runs its
own KV-cached decode loop. Steering is a per-row sum of vectors: one `steer` operation per (vector, layer,
scope) in the batch with a `[B]` coefficient tensor (0 for rows that do not use it); monitoring reads every
registered vector through one `GenerationTrace`. Rows that finish or whose client went away are dropped from
the batch (cache, mask and operations are cut to the remaining rows). New requests wait for the running batch
to end (no continuous batching).

Token readings: the projection of a response token is read at that token's own position (the forward that
feeds it), so a row's response projection is the mean over its response tokens, as the held-out `response_avg`
evaluation defines it; a monitored row that stops at `max_tokens` gets one more (batched) step to read its last
token. The prompt projection is the reading at the last prompt token (the prefill's last column).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from personascope.batching import left_pad
from personascope.generate import _end_ids
from personascope.hooks import HookHandle, HookManager, steer
from personascope.monitor import GenerationTrace
from personascope.serve.decode import RowSampling, TextStream, next_tokens
from personascope.serve.registry import Registry

log = logging.getLogger("personascope.serve")


@dataclass(frozen=True)
class SteerOp:
    """Add `coef` × the registered vector `name` at `layer` over `scope`."""

    name: str
    layer: int
    scope: str
    coef: float


@dataclass(frozen=True)
class Started:
    """The prompt was read: its projection per monitored vector."""

    prompt: dict[str, float]


@dataclass(frozen=True)
class Delta:
    """New text, and (with `trace`) one projection per token behind it, per monitored vector."""

    text: str
    tokens: int
    trace: dict[str, list[float]]


@dataclass(frozen=True)
class Finished:
    """The row ended (`stop`, `length` or `cancelled`); `response` = mean projection over response tokens."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    response: dict[str, float | None]


@dataclass(frozen=True)
class Failed:
    message: str


Event = Started | Delta | Finished | Failed


@dataclass
class GenerationJob:
    """One chat completion to run; `sink` receives its events (from the worker thread)."""

    prompt_ids: list[int]
    sampling: RowSampling
    sink: Callable[[Event], None]
    steer: tuple[SteerOp, ...] = ()
    monitor: tuple[str, ...] = ()
    trace: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A job's state inside a running batch."""

    def __init__(self, job: GenerationJob, columns: list[int], tokenizer: Any) -> None:
        self.job = job
        self.columns = columns
        self.generator = job.sampling.generator()
        self.text = TextStream(tokenizer, job.sampling.stop)
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.count = 0
        self.final = False
        self.readings: list[Tensor] = []
        self.unsent: list[Tensor] = []
        self.done: str | None = None
        self.closed = False

    def start(self, reading: Tensor | None) -> None:
        names = self.job.monitor
        prompt = {} if reading is None else {n: float(reading[c]) for n, c in zip(names, self.columns)}
        self.job.sink(Started(prompt))

    def take(self, token: int, ends: set[int]) -> None:
        """A sampled token: the end of turn ends the row; `max_tokens` ends it after its last feed."""
        if token in ends:
            self.done = "stop"
            return
        self.pending, self.count = token, self.count + 1
        if self.count >= self.job.sampling.max_tokens:
            if self.columns:
                self.final = True  # read the last token at the next step, then end
            else:
                self.fed(None)
                self.done = self.done or "length"

    def fed(self, reading: Tensor | None) -> None:
        """The pending token went through the model (`reading`: its projections): send its text."""
        assert self.pending is not None
        if reading is not None:
            self.readings.append(reading)
            self.unsent.append(reading)
        delta = self.text.push(self.pending)
        self.pending = None
        if delta or self.text.stopped:
            self._send(delta)
        if self.text.stopped:
            self.done = "stop"
        elif self.final:
            self.done = "length"

    def _send(self, text: str) -> None:
        trace = {}
        if self.job.trace and self.unsent:
            trace = {n: [float(r[c]) for r in self.unsent] for n, c in zip(self.job.monitor, self.columns)}
        self.job.sink(Delta(text, len(self.unsent), trace))
        self.unsent = []

    def finish(self, reason: str) -> None:
        self.closed = True
        rest = self.text.flush()
        if rest or self.unsent:
            self._send(rest)
        response: dict[str, float | None] = {}
        for name, column in zip(self.job.monitor, self.columns):
            response[name] = float(torch.stack([r[column] for r in self.readings]).mean()) if self.readings else None
        self.job.sink(Finished(reason, len(self.job.prompt_ids), self.count, response))


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output (`cache` since transformers 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_keyword(model: Any) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Call:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class Scheduler:
    """The model's worker thread: `submit` generation jobs, `call` anything else that needs the model.

    `on_batch(rows, tokens, seconds)` runs after each batch, `on_row(reason)` as each row ends.
    """

    def __init__(self, registry: Registry, *, max_batch: int = 16, token_budget: int = 16384,
                 batch_wait: float = 0.005, on_batch: Callable[[int, int, float], None] | None = None,
                 on_row: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.handle = registry.handle
        self.max_batch, self.token_budget, self.batch_wait = max_batch, token_budget, batch_wait
        self.on_batch, self.on_row = on_batch, on_row
        self._queue: queue.Queue[GenerationJob | _Call | None] = queue.Queue()
        self._backlog: deque[GenerationJob | _Call] = deque()
        self._ends = _end_ids(self.handle)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="personascope-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, fail what waits, and end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._backlog.append(item)
        for item in self._backlog:
            if isinstance(item, _Call):
                item.future.set_exception(RuntimeError("the server is shutting down"))
            else:
                item.sink(Failed("the server is shutting down"))
        self._backlog.clear()

    def submit(self, job: GenerationJob) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the worker thread between batches."""
        item = _Call(fn)
        self._queue.put(item)
        return item.future

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._backlog)

    # -- the worker -------------------------------------------------------------------------------------

    def _next(self, timeout: float | None) -> GenerationJob | _Call | None:
        if self._backlog:
            return self._backlog.popleft()
        return self._queue.get(timeout=timeout)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                item = self._next(None)
                if item is None:
                    return
                if isinstance(item, _Call):
                    self._run_call(item)
                    continue
                jobs, stop = self._gather(item)
                jobs = [j for j in jobs if not j.cancelled.is_set()]
                if jobs:
                    self._run_batch(jobs)
                if stop:
                    return

    def _gather(self, first: GenerationJob) -> tuple[list[GenerationJob], bool]:
        """The jobs that arrive within `batch_wait` of the first, within the batch limits."""
        jobs, deferred = [first], []
        deadline = time.monotonic() + self.batch_wait
        stop = False
        while len(jobs) < self.max_batch:
            try:
                item = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if isinstance(item, _Call) or not self._fits(jobs, item):
                deferred.append(item)
                if not isinstance(item, _Call):
                    break
                continue
            jobs.append(item)
        self._backlog.extendleft(reversed(deferred))
        return jobs, stop

    def _fits(self, jobs: list[GenerationJob], job: GenerationJob) -> bool:
        rows = [*jobs, job]
        width = max(len(j.prompt_ids) for j in rows) + max(j.sampling.max_tokens for j in rows)
        return len(rows) * width <= self.token_budget

    def _run_call(self, item: _Call) -> None:
        try:
            item.future.set_result(item.fn())
        except BaseException as exc:  # handed to the caller
            item.future.set_exception(exc)

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        batch = _Batch(self, jobs)
        try:
            batch.run()
        except Exception as exc:
            log.exception("batch of %d failed", len(jobs))
            for row in batch.rows:
                if not row.closed:
                    row.job.sink(Failed(f"generation failed: {exc}"))
        finally:
            batch.close()


class _Batch:
    """One running batch: its rows, KV cache, mask, steering operations and readings."""

    def __init__(self, scheduler: Scheduler, jobs: list[GenerationJob]) -> None:
        self.s = scheduler
        registry = scheduler.registry
        self.handle = scheduler.handle
        self.rows = [_Row(j, [registry.names.index(n) for n in j.monitor], self.handle.tokenizer) for j in jobs]
        self.manager = HookManager.of(self.handle)
        self.trace = GenerationTrace(self.handle, registry.probe) if any(j.monitor for j in jobs) else None
        self.steering: list[HookHandle] = []
        self.lengths_pushed = False
        self.tokens = 0

    def run(self) -> None:
        device, size = self.handle.device, len(self.rows)
        start = time.perf_counter()
        ids, mask, positions = left_pad([r.job.prompt_ids for r in self.rows], self.handle.tokenizer.pad_token_id)
        self.mask, self.positions = mask.to(device), positions.to(device)
        self._install()
        out = self.handle.model(input_ids=ids.to(device), attention_mask=self.mask, position_ids=self.positions,
                                use_cache=True)
        self.cache, logits = _cache_of(out), out.logits[:, -1]
        readings = self._readings()
        for i, row in enumerate(self.rows):
            row.start(None if readings is None else readings[i])
        while True:
            chosen = next_tokens(logits, [r.job.sampling for r in self.rows], [r.generator for r in self.rows])
            for row, token in zip(self.rows, chosen):
                row.take(token, self.s._ends)
            self.tokens += len(self.rows)
            self._drop_finished()
            if not self.rows:
                break
            feed = torch.tensor([[r.pending] for r in self.rows], device=device)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
            self.positions = self.positions[:, -1:] + 1
            out = self.handle.model(input_ids=feed, attention_mask=self.mask, position_ids=self.positions,
                                    use_cache=True, **{_cache_keyword(self.handle.model): self.cache})
            logits = out.logits[:, -1]
            readings = self._readings()
            for i, row in enumerate(self.rows):
                row.fed(None if readings is None else readings[i])
            kept = self._drop_finished()
            if not self.rows:
                break
            if kept is not None:
                logits = logits[kept]
        if self.s.on_batch is not None:
            self.s.on_batch(size, self.tokens, time.perf_counter() - start)

    def _readings(self) -> Tensor | None:
        return None if self.trace is None else self.trace.latest()

    def _drop_finished(self) -> Tensor | None:
        """End finished or abandoned rows and cut the batch to the rest; the kept indices when it shrank."""
        keep = []
        for i, row in enumerate(self.rows):
            if row.done is None and row.job.cancelled.is_set():
                row.done = "cancelled"
            if row.done is None:
                keep.append(i)
            else:
                row.finish(row.done)
                if self.s.on_row is not None:
                    self.s.on_row(row.done)
        if len(keep) == len(self.rows):
            return None
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return None
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self._install()
        return index

    def _install(self) -> None:
        """(Re)build the steering operations, prompt lengths and readings for the current rows."""
        self._remove_ops()
        registry, rows = self.s.registry, self.rows
        coefs: dict[tuple[str, int, str], Tensor] = {}
        for i, row in enumerate(rows):
            for op in row.job.steer:
                key = (op.name, op.layer, op.scope)
                coefs.setdefault(key, torch.zeros(len(rows)))[i] += op.coef
        for (name, layer, scope), coef in coefs.items():
            self.steering.append(steer(self.handle, registry.get(name).vector, layer, coef, scope))  # type: ignore[arg-type]
        self.manager.push_prompt_lengths([len(r.job.prompt_ids) for r in rows])
        self.lengths_pushed = True
        if self.trace is not None:
            self.trace.begin()

    def _remove_ops(self) -> None:
        for handle in self.steering:
            handle.remove()
        self.steering = []
        if self.lengths_pushed:
            self.manager.pop_prompt_lengths()
            self.lengths_pushed = False
        if self.trace is not None:
            self.trace.end()

    def close(self) -> None:
        self._remove_ops()
