"""`serve --engine vllm`: the scheduler's interface over vLLM's engine (continuous batching, paged KV cache),
each request steered and read on the workers by the persona plugin."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from typing import Any

from personascope.inference.vllm_engine import (
    engine_for,
    prompt_for,
    register_vector,
    take_readings,
)
from personascope.serve.decode import TextStream
from personascope.serve.jobs import Delta, Failed, Finished, GenerationJob, Started
from personascope.serve.registry import Registry
from personascope.serve.scheduler import Scheduler
from personascope.vllm_plugin import EXTRA_KEY, PersonaSpec, SteerItem

log = logging.getLogger("personascope.serve")


class _Request:
    """A job inside the engine: its text stream and the readings received so far (position P-1 first)."""

    def __init__(self, job: GenerationJob, tokenizer: Any, spec: PersonaSpec) -> None:
        self.job, self.spec = job, spec
        self.text = TextStream(tokenizer, job.sampling.stop)
        self.readings: dict[str, list[float]] = {n: [] for n in job.monitor}
        self.sent = 0  # answer tokens whose readings were sent in a trace
        self.started = False
        self.count = 0

    @property
    def monitored(self) -> bool:
        return bool(self.job.monitor)

    def add_readings(self, reading: dict[str, Any]) -> None:
        for name in self.job.monitor:
            self.readings[name].extend(reading["tokens"].get(name, []))

    def prompt(self) -> dict[str, float]:
        return {n: v[0] for n, v in self.readings.items() if v}

    def unsent_trace(self) -> dict[str, list[float]]:
        """Readings of the answer tokens not yet sent in a trace (token `t` is read at its own position, P + t),
        up to the tokens sent so far."""
        upto = min([self.count, *(len(v) - 1 for v in self.readings.values())])
        if upto <= self.sent:
            return {}
        trace = {n: v[1 + self.sent: 1 + upto] for n, v in self.readings.items()}
        self.sent = upto
        return trace

    def response_mean(self) -> dict[str, float | None]:
        """Mean reading over the answer tokens kept."""
        kept = {n: v[1: 1 + self.count] for n, v in self.readings.items()}
        return {n: (sum(v) / len(v) if v else None) for n, v in kept.items()}


class VllmScheduler(Scheduler):
    """The `Scheduler` on vLLM: the same queue, calls, bounds and health, with vLLM's engine stepping the jobs
    (continuous batching: a job joins the running batch at the next step).

    A monitored row asks the engine for one token more than it may keep, so that the last kept token is read
    too (its reading comes from the forward pass that feeds it); that extra token is never sent.
    """

    def __init__(self, registry: Registry, **settings: Any) -> None:
        super().__init__(registry, **settings)  # max_batch, token_budget and batch_wait do not apply: vLLM schedules
        self._end_ids = sorted(self._ends)
        self._active: dict[str, _Request] = {}
        self._llm: Any = None

    def start(self) -> None:
        if self._llm is None:
            self._llm = engine_for(self.handle)
            for name, served in self.registry.vectors.items():
                register_vector(self._llm, served.vector, name, served.layer)
        super().start()

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self._llm.llm_engine
        try:
            while self._take(block=not self._active):
                self._cancel_abandoned(engine)
                if not engine.has_unfinished_requests():
                    continue
                start = time.perf_counter()
                try:
                    outputs = engine.step()
                    self._deliver(engine, outputs)
                except Exception as exc:  # fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_active(engine, f"generation failed: {exc}")
                    continue
                finally:
                    self._held = [r.job for r in self._active.values()]
                if self.on_batch is not None and outputs:
                    self.on_batch(len(outputs), sum(len(o.outputs[0].token_ids) for o in outputs),
                                  time.perf_counter() - start)
        finally:
            self._fail_active(engine, "the server is shutting down")

    def _take(self, block: bool) -> bool:
        """Start the jobs and run the calls that wait; False when asked to stop."""
        while True:
            try:
                item = self._next(None if block else 0)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if not isinstance(item, GenerationJob):
                self._run_call(item)
            elif not item.cancelled.is_set():
                self._add(item)

    def _add(self, job: GenerationJob) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        key = uuid.uuid4().hex
        steer = tuple(SteerItem(op.name, op.coef, op.layer, "add", op.scope) for op in job.steer)
        spec = PersonaSpec(steer, tuple(job.monitor), key if job.monitor else None)
        s = job.sampling
        greedy = s.temperature <= 0
        params = SamplingParams(
            n=1, max_tokens=s.max_tokens + (1 if job.monitor else 0), temperature=0.0 if greedy else s.temperature,
            top_p=1.0 if greedy else s.top_p, seed=s.seed, repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
            stop_token_ids=self._end_ids, skip_special_tokens=True, detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_KEY: spec.to_json()} if steer or job.monitor else None,
        )
        try:  # outputs and aborts name the request by the id given here (vLLM adds a suffix internally)
            self._llm.llm_engine.add_request(key, prompt_for(job.prompt_ids, spec), params)
        except Exception as exc:
            log.exception("request refused by the engine")
            job.sink(Failed(f"generation failed: {exc}"))
            return
        self._active[key] = _Request(job, self.handle.tokenizer, spec)

    def _cancel_abandoned(self, engine: Any) -> None:
        gone = [rid for rid, r in self._active.items() if r.job.cancelled.is_set()]
        if gone:
            engine.abort_request(gone)
            for rid in gone:
                self._end(rid, "cancelled")

    def _deliver(self, engine: Any, outputs: list[Any]) -> None:
        live = [o for o in outputs if o.request_id in self._active]
        self._fetch_readings([r for o in live if (r := self._active[o.request_id]).monitored
                              and (r.job.trace or not r.started or o.finished)])
        stopped = []
        for output in live:
            request = self._active[output.request_id]
            job = request.job
            if not request.started:
                request.started = True
                job.sink(Started(request.prompt()))
            pieces = []
            for token in output.outputs[0].token_ids:
                if token in self._ends or request.count >= job.sampling.max_tokens or request.text.stopped:
                    break
                request.count += 1
                pieces.append(request.text.push(token))
            text = "".join(pieces)
            trace = request.unsent_trace() if job.trace else {}
            if text or trace:
                job.sink(Delta(text, trace))
            if request.text.stopped:
                stopped.append(output.request_id)
                self._end(output.request_id, "stop")
            elif output.finished:
                reason = output.outputs[0].finish_reason
                self._end(output.request_id, "length" if request.count >= job.sampling.max_tokens or
                          reason == "length" else "stop")
        if stopped:
            engine.abort_request(stopped)

    def _fetch_readings(self, requests: list[_Request]) -> None:
        if not requests:
            return
        readings = take_readings(self._llm, [r.spec.key for r in requests],
                                 [len(r.job.prompt_ids) for r in requests])
        for request, reading in zip(requests, readings):
            request.add_readings(reading)

    def _end(self, request_id: str, reason: str) -> None:
        request = self._active.pop(request_id)
        if request.monitored:
            self._fetch_readings([request])  # those of the last steps
        rest = request.text.flush()
        trace = request.unsent_trace() if request.job.trace else {}
        if rest or trace:
            request.job.sink(Delta(rest, trace))
        request.job.sink(Finished(reason, len(request.job.prompt_ids), request.count, request.response_mean()))
        if self.on_row is not None:
            self.on_row(reason, request.count)

    def _fail_active(self, engine: Any, message: str) -> None:
        if self._active:
            engine.abort_request(list(self._active))
        for request in self._active.values():
            request.job.sink(Failed(message))
            if self.on_row is not None:
                self.on_row("failed", request.count)
        self._active.clear()
