"""The per-step half of the plugin, on each vLLM worker: registered vectors, filling the layer buffers from the
step's batch metadata before the forward, filing monitor readings after it, and the worker extension's RPCs."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from personascope.errors import PersonascopeError
from personascope.vector import PersonaVector
from personascope.vllm_plugin.layers import PersonaBuffers
from personascope.vllm_plugin.spec import EXTRA_KEY, PersonaSpec, Readings, parse_spec

log = logging.getLogger("personascope.vllm")

#: Readings of finished requests kept for collection (oldest dropped first).
MAX_KEPT_READINGS = 4096


@dataclass(frozen=True)
class Registered:
    """A vector on the workers: its buffer slot and the layer it is read at (and steered at by default)."""

    name: str
    slot: int
    layer: int


@dataclass(frozen=True)
class _Plan:
    """One request's resolved spec: (layer, slot, op, scope, coef, value) per intervention, (name, layer, slot)
    per monitored vector."""

    steer: tuple[tuple[int, int, str, str, float, float], ...]
    monitor: tuple[tuple[str, int, int], ...]
    key: str | None


def scope_mask(scope: str, positions: np.ndarray, prompt_tokens: int) -> np.ndarray:
    """Which of a request's `positions` are in `scope`: `prompt` = the prompt's positions, `response` = the last
    prompt position and every later one (their outputs pick answer tokens), `all`."""
    if scope == "prompt":
        return positions < prompt_tokens
    if scope == "response":
        return positions >= prompt_tokens - 1
    return np.ones(len(positions), dtype=bool)


class PersonaState:
    """Everything the plugin keeps on one worker's model runner (`runner.persona`)."""

    def __init__(self, runner: Any, buffers: Sequence[PersonaBuffers]) -> None:
        self.runner = runner
        self.buffers = list(buffers)
        self.num_layers = len(self.buffers)
        self.max_vectors = self.buffers[0].vectors.shape[0]
        self.vectors: dict[str, Registered] = {}
        self.readings: OrderedDict[str, dict[str, dict[int, float]]] = OrderedDict()
        self._plans: dict[str, tuple[Any, _Plan | None]] = {}
        self._dirty: set[int] = set()
        self._saved_generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}

    # -- vectors --------------------------------------------------------------------------------------------
    def register(self, name: str, path: str, layer: int | None = None) -> Registered:
        """Load a vector file into the next free slot (or over the slot of the same name)."""
        vector = PersonaVector.load(path)
        hidden = self.buffers[0].vectors.shape[1]
        if vector.num_layers != self.num_layers or vector.hidden_size != hidden:
            raise PersonascopeError(
                f"vector {path} has {vector.num_layers} layers of width {vector.hidden_size}, but the served model "
                f"has {self.num_layers} of width {hidden}: it was made for another model")
        read_at = vector.layer(layer)
        if read_at == self.num_layers:
            raise PersonascopeError(f"vector {name!r}: layer {read_at} is after the final norm, which vLLM layers "
                                    f"do not expose: use a layer below {self.num_layers}")
        slot = self.vectors[name].slot if name in self.vectors else len(self.vectors)
        if slot >= self.max_vectors:
            raise PersonascopeError(f"the workers hold {self.max_vectors} vectors at most "
                                    f"(additional_config personascope.max_vectors)")
        for index, buffers in enumerate(self.buffers, start=1):
            row = vector.directions[index].to(buffers.vectors.device)
            norm = row.norm()
            buffers.vectors[slot].copy_(row)
            buffers.units[slot].copy_(row / norm if float(norm) > 0 else row)
        self.vectors[name] = Registered(name, slot, read_at)
        self._plans.clear()
        return self.vectors[name]

    # -- per step -------------------------------------------------------------------------------------------
    def _resolve(self, spec: PersonaSpec) -> _Plan:
        steer = []
        for item in spec.steer:
            vector = self._vector(item.vector)
            layer = vector.layer if item.layer is None else item.layer
            if not 1 <= layer <= self.num_layers:
                raise PersonascopeError(f"layer {layer} is outside 1..{self.num_layers}")
            coef = item.coef if item.op == "add" else 0.0
            steer.append((layer, vector.slot, item.op, item.scope, coef, item.value))
        monitor = tuple((name, (v := self._vector(name)).layer, v.slot) for name in spec.monitor)
        return _Plan(tuple(steer), monitor, spec.key)

    def _vector(self, name: str) -> Registered:
        if name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none"
            raise PersonascopeError(f"unknown persona vector {name!r} (registered: {known})")
        return self.vectors[name]

    def _plan(self, req_id: str) -> _Plan | None:
        state = self.runner.requests.get(req_id)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
        raw = extra.get(EXTRA_KEY)
        cached = self._plans.get(req_id)
        if cached is not None and cached[0] is raw:
            return cached[1]
        plan = None
        if raw is not None:
            try:
                plan = self._resolve(parse_spec(raw))
            except PersonascopeError as exc:  # a worker must not die for one request: it runs unsteered
                log.error("request %s: %s; it runs without persona operations", req_id, exc)
        self._plans[req_id] = (raw, plan)
        return plan

    def before_forward(self) -> list[tuple[_Plan, int, int, np.ndarray, int]]:
        """Fill the layer buffers for this step; returns what to read after it (plan, first, end, positions,
        prompt tokens) for each monitored request."""
        runner, batch = self.runner, self.runner.input_batch
        count = batch.num_reqs
        self._save_discarded_generators(count)
        if len(self._plans) > 4 * max(count, 64):
            self._plans = {k: v for k, v in self._plans.items() if k in runner.requests}
        planned = [(i, plan) for i, rid in enumerate(batch.req_ids[:count]) if (plan := self._plan(rid)) is not None]
        for layer in self._dirty:
            buffers = self.buffers[layer - 1]
            buffers.add.zero_(), buffers.clamp_on.zero_(), buffers.clamp_to.zero_()
        self._dirty = set()
        if not planned:
            return []
        starts = runner.query_start_loc.np[:count + 1]
        tokens = int(starts[count])
        host: dict[int, np.ndarray] = {}
        reads = []
        for i, plan in planned:
            first, end = int(starts[i]), int(starts[i + 1])
            positions = int(batch.num_computed_tokens_cpu[i]) + np.arange(end - first)
            prompt = int(batch.num_prompt_tokens[i])
            for layer, slot, op, scope, coef, value in plan.steer:
                rows = first + np.nonzero(scope_mask(scope, positions, prompt))[0]
                block = host.setdefault(layer, np.zeros((3, tokens, self.max_vectors), dtype=np.float32))
                if op == "add":
                    block[0, rows, slot] += coef
                else:
                    block[1, rows, slot] = 1.0
                    block[2, rows, slot] = value
            if plan.monitor and plan.key is not None:
                reads.append((plan, first, end, positions, prompt))
        for layer, block in host.items():
            buffers = self.buffers[layer - 1]
            values = torch.from_numpy(block).to(buffers.add.device, non_blocking=True)
            buffers.add[:tokens].copy_(values[0]), buffers.clamp_on[:tokens].copy_(values[1])
            buffers.clamp_to[:tokens].copy_(values[2])
        self._dirty = set(host)
        return reads

    def after_forward(self, reads: list[tuple[_Plan, int, int, np.ndarray, int]]) -> None:
        """File the readings of this step's monitored requests (answer positions only: from the last prompt one)."""
        layers = {layer for plan, *_ in reads for _, layer, _ in plan.monitor}
        tokens = max((end for _, _, end, _, _ in reads), default=0)
        values = {layer: self.buffers[layer - 1].readings[:tokens].cpu().numpy() for layer in layers}
        for plan, first, end, positions, prompt in reads:
            keep = positions >= prompt - 1
            if not keep.any():
                continue
            filed = self.readings.setdefault(plan.key, {})
            self.readings.move_to_end(plan.key)
            for name, layer, slot in plan.monitor:
                column = values[layer][first:end, slot][keep]
                filed.setdefault(name, {}).update(zip(positions[keep].tolist(), column.tolist()))
        while len(self.readings) > MAX_KEPT_READINGS:
            self.readings.popitem(last=False)

    def take_readings(self, keys: Sequence[str], prompt_tokens: Sequence[int]) -> list[Readings]:
        """Remove and return the readings filed under `keys` (the request's prompt length locates its last
        prompt token)."""
        out = []
        for key, prompt in zip(keys, prompt_tokens):
            filed = self.readings.pop(key, {})
            reading = Readings()
            for name, by_position in filed.items():
                ordered = [by_position[p] for p in sorted(by_position)]
                if prompt - 1 in by_position:
                    reading.prompt_last[name] = by_position[prompt - 1]
                reading.tokens[name] = ordered
            out.append(reading)
        return out

    # -- seeded sampling under chunked prefill on CPU ------------------------------------------------------
    def _save_discarded_generators(self, count: int) -> None:
        """vLLM rewinds the generator of a request whose partial-prefill sample is discarded with
        `set_offset`, which CPU generators lack; keep their state instead (restored by `restoring_generators`)."""
        generators = self.runner.input_batch.generators
        discarded = np.nonzero(self.runner.discard_request_mask.np[:count])[0]
        self._saved_generators = {
            int(i): (gen, gen.get_state()) for i in discarded
            if (gen := generators.get(int(i))) is not None and gen.device.type == "cpu"
        }

    def restoring_generators(self, bookkeeping: Callable[..., Any]) -> Callable[..., Any]:
        """`bookkeeping` with the saved generators put back to their state before the discarded sample, and
        hidden from its offset rewind."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            saved, self._saved_generators = self._saved_generators, {}
            generators = self.runner.input_batch.generators
            for index, (gen, state) in saved.items():
                gen.set_state(state)
                generators.pop(index, None)
            try:
                return bookkeeping(*args, **kwargs)
            finally:
                for index, (gen, _) in saved.items():
                    generators[index] = gen

        return wrapped

    def stepping(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """The runner's `_model_forward` with the buffers filled before and readings filed after."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            reads = self.before_forward()
            output = forward(*args, **kwargs)
            if reads:
                self.after_forward(reads)
            return output

        return wrapped
