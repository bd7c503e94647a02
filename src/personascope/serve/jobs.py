"""What a request asks of the scheduler (`GenerationJob`), what it hears back (events), and a row's state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from personascope.serve.decode import RowSampling, TextStream


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
    """The row failed (its own sampling, or the batch it ran in); `message` says why."""

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


class Row:
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
        self.done: str | None = None  # stop, length, cancelled or failed
        self.error = ""
        self.closed = False

    def start(self, reading: Tensor | None) -> None:
        names = self.job.monitor
        prompt = {} if reading is None else {n: float(reading[c]) for n, c in zip(names, self.columns)}
        self.job.sink(Started(prompt))

    def take(self, token: int | None, ends: set[int]) -> None:
        """A sampled token (None: the row's sampling failed): the end of turn ends the row; `max_tokens` ends it
        after its last feed."""
        if token is None:
            self.done, self.error = "failed", "sampling failed: the next-token distribution is not finite"
            return
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
        self.job.sink(Delta(text, trace))
        self.unsent = []

    def finish(self, reason: str) -> None:
        self.closed = True
        if reason == "failed":
            self.job.sink(Failed(self.error))
            return
        rest = self.text.flush()
        if rest or self.unsent:
            self._send(rest)
        response: dict[str, float | None] = {}
        for name, column in zip(self.job.monitor, self.columns):
            response[name] = float(torch.stack([r[column] for r in self.readings]).mean()) if self.readings else None
        self.job.sink(Finished(reason, len(self.job.prompt_ids), self.count, response))
