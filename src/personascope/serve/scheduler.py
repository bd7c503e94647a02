"""Micro-batching: concurrent requests share one forward pass, each row with its own steering and sampling."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from personascope.apply.monitor import GenerationTrace
from personascope.hooks import HookHandle, HookManager, steer
from personascope.inference.generate import end_ids
from personascope.model.batching import left_pad
from personascope.model.cache import cache_keyword, cache_of
from personascope.serve.decode import next_tokens
from personascope.serve.jobs import Failed, GenerationJob, Row
from personascope.serve.registry import Registry

log = logging.getLogger("personascope.serve")

#: A batch waits for more requests at most this many times `batch_wait` in all.
GATHER_LIMIT = 10


class _Call:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class Unavailable(Exception):
    """`submit` refused a job: the queue is full or the worker is not running."""


class Scheduler:
    """The model's worker thread: `submit` generation jobs, `call` anything else that needs the model.

    At most `max_queue` jobs wait (`submit` raises `Unavailable` beyond). A failure fails only the rows it touched
    (one row's sampling, or one batch) and the worker goes on with the next. `on_batch(rows, tokens, seconds)` runs
    after each batch, `on_row(reason, tokens)` as each row ends (`stop`, `length`, `cancelled` or `failed`, and
    the tokens it had generated).
    """

    def __init__(self, registry: Registry, *, max_batch: int = 16, token_budget: int = 16384,
                 batch_wait: float = 0.02, max_queue: int = 256,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_row: Callable[[str, int], None] | None = None) -> None:
        self.registry = registry
        self.handle = registry.handle
        self.max_batch, self.token_budget, self.batch_wait = max_batch, token_budget, batch_wait
        self.max_queue = max_queue
        self.on_batch, self.on_row = on_batch, on_row
        self._queue: queue.Queue[GenerationJob | _Call | None] = queue.Queue()
        self._backlog: deque[GenerationJob | _Call] = deque()
        self._ends = end_ids(self.handle)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start-again (`revive`) against `stop`
        self._stopping = False
        self._held: list[GenerationJob] = []  # the jobs of the running batch

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="personascope-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, fail what waits, and end the thread."""
        with self._lock:
            self._stopping = True
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

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before `start`, after `stop`, or should it ever die)."""
        return self._thread is not None and self._thread.is_alive()

    def revive(self) -> bool:
        """Start a new worker thread if the last one ended without `stop` (it died); True if it did. The jobs it
        held fail; what waits in the queue is served by the new thread."""
        with self._lock:
            if self._stopping or self._thread is None or self._thread.is_alive():
                return False
            log.error("the model worker thread had ended: starting a new one")
            for job in self._held:  # what the dead thread held hears why (a finished job's listener is gone)
                job.sink(Failed("the model worker failed; retry"))
            self._held = []
            self.start()
            return True

    def submit(self, job: GenerationJob) -> None:
        """Queue `job`; `Unavailable` when `max_queue` jobs already wait or the worker is not running."""
        if not self.alive:
            raise Unavailable("the model worker is not running")
        if self.waiting >= self.max_queue:
            raise Unavailable(f"the server is busy: {self.waiting} requests are waiting")
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
                self._held = jobs
                self._run_batch(jobs)
                self._held = []
                if stop:
                    return

    def _gather(self, first: GenerationJob) -> tuple[list[GenerationJob], bool]:
        """The jobs that keep arriving, each within `batch_wait` of the one before (a burst of clients joins
        whole), for at most `GATHER_LIMIT` × `batch_wait` in all, within the batch limits."""
        jobs, deferred = [first], []
        start = time.monotonic()
        stop = False
        while len(jobs) < self.max_batch:
            now = time.monotonic()
            wait = min(self.batch_wait, start + GATHER_LIMIT * self.batch_wait - now)
            try:
                item = self._next(max(0.0, wait))
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
        """Run `jobs` as one batch: a job whose row cannot be built fails alone, a failing batch fails its own
        rows only; nothing escapes to the worker loop."""
        rows = []
        for job in jobs:
            if job.cancelled.is_set():  # its client left while it waited: it never costs a token
                if self.on_row is not None:
                    self.on_row("cancelled", 0)
                continue
            try:
                rows.append(Row(job, [self.registry.names.index(n) for n in job.monitor], self.handle.tokenizer))
            except Exception as exc:
                log.warning("a request was refused by the worker: %s", exc)
                self._fail(job, f"the request could not be run: {exc}")
        if not rows:
            return
        batch: _Batch | None = None
        try:
            batch = _Batch(self, rows)
            batch.run()
        except Exception as exc:
            log.exception("batch of %d failed", len(rows))
            for row in batch.rows if batch is not None else rows:
                if not row.closed:
                    self._fail(row.job, f"generation failed: {exc}", row.count)
        finally:
            if batch is not None:
                batch.close()

    def _fail(self, job: GenerationJob, message: str, tokens: int = 0) -> None:
        job.sink(Failed(message))
        if self.on_row is not None:
            self.on_row("failed", tokens)


class _Batch:
    """One running batch: its rows, KV cache, mask, steering operations and readings."""

    def __init__(self, scheduler: Scheduler, rows: list[Row]) -> None:
        self.s = scheduler
        self.handle = scheduler.handle
        self.rows = rows
        self.manager = HookManager.of(self.handle)
        monitored = any(r.job.monitor for r in rows)
        self.trace = GenerationTrace(self.handle, scheduler.registry.probe) if monitored else None
        self.steering: list[HookHandle] = []
        self.lengths_key: int | None = None
        self.tokens = 0

    def run(self) -> None:
        device, size = self.handle.device, len(self.rows)
        start = time.perf_counter()
        ids, mask, positions = left_pad([r.job.prompt_ids for r in self.rows], self.handle.tokenizer.pad_token_id)
        self.mask, self.positions = mask.to(device), positions.to(device)
        self._install()
        out = self.handle.model(input_ids=ids.to(device), attention_mask=self.mask, position_ids=self.positions,
                                use_cache=True)
        self.cache, logits = cache_of(out), out.logits[:, -1]
        readings = self._readings()
        for i, row in enumerate(self.rows):
            row.start(None if readings is None else readings[i])
        while True:
            chosen = next_tokens(logits, [r.job.sampling for r in self.rows], [r.generator for r in self.rows],
                                 [r.job.prompt_ids + r.text.tokens for r in self.rows],
                                 [r.text.tokens for r in self.rows])
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
                                    use_cache=True, **{cache_keyword(self.handle.model): self.cache})
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
                    self.s.on_row(row.done, row.count)
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
        self.lengths_key = self.manager.push_prompt_lengths([len(r.job.prompt_ids) for r in rows])
        if self.trace is not None:
            self.trace.begin()

    def _remove_ops(self) -> None:
        for handle in self.steering:
            handle.remove()
        self.steering = []
        if self.lengths_key is not None:
            self.manager.pop_prompt_lengths(self.lengths_key)
            self.lengths_key = None
        if self.trace is not None:
            self.trace.end()

    def close(self) -> None:
        self._remove_ops()
