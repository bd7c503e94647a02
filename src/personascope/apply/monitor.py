"""Monitoring: project a model's activations on persona vectors, before a response and token by token inside one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.hooks import HookManager, TokenContext, on_device
from personascope.inference.activations import encode, iter_activations
from personascope.inference.engines import generate_with
from personascope.inference.generate import (
    SamplingConfig,
    generate_responses,
    stream_chat,
)
from personascope.io.data import BadRow, load_rows, parse_messages, row_id
from personascope.model import ModelHandle
from personascope.vector import PersonaVector

Chat = list[dict[str, str]]
_DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Probe:
    """Persona vectors stacked for reading: unit direction `k` sits at `layers[k]`.

    Attributes:
        names: one unique name per vector: its trait, or `<trait>_L<layer>` when two share a trait.
        layers: the layer each vector is read at (HF `hidden_states` index).
        read_layers: the distinct layers, ascending.
        weight: `[len(read_layers), d, K]` float32; block `i` holds the unit directions of the vectors read at
            `read_layers[i]` in their columns and zeros elsewhere.
    """

    names: tuple[str, ...]
    layers: tuple[int, ...]
    read_layers: tuple[int, ...]
    weight: Tensor

    @classmethod
    def build(
        cls, handle: ModelHandle, vectors: Sequence[PersonaVector], layers: int | Sequence[int | None] | None = None
    ) -> Probe:
        """Stack `vectors` for `handle`'s model.

        Args:
            vectors: one or more persona vectors made for this model.
            layers: one layer for all vectors, one per vector (None = that vector's best layer), or None for
                each vector's best layer.
        """
        if not vectors:
            raise PersonascopeError("monitoring needs at least one persona vector")
        chosen = list(layers) if isinstance(layers, Sequence) else [layers] * len(vectors)
        if len(chosen) != len(vectors):
            raise PersonascopeError(f"got {len(chosen)} layers for {len(vectors)} vectors: give one per vector")
        manager = HookManager.of(handle)
        picked = []
        for vector, layer in zip(vectors, chosen):
            vector.check_model(handle)
            picked.append(manager.check_layer(vector.layer(layer)))
        read = tuple(sorted(set(picked)))
        weight = torch.zeros(len(read), handle.hidden_size, len(vectors))
        for k, (vector, layer) in enumerate(zip(vectors, picked)):
            weight[read.index(layer), :, k] = vector.unit(layer)
        return cls(_unique_names(vectors, picked), tuple(picked), read, weight)

    def project(self, pooled: Tensor) -> Tensor:
        """`[N, len(read_layers), d]` activations at `read_layers` -> `[N, K]` projections (one matmul)."""
        weight = self.weight.to(pooled.device)
        return pooled.float().flatten(1) @ weight.flatten(0, 1)

    def directions(self) -> dict[str, tuple[Tensor, int]]:
        """Each vector's name -> (its `[d]` unit direction, the layer it is read at)."""
        return {name: (self.weight[self.read_layers.index(layer), :, k], layer)
                for k, (name, layer) in enumerate(zip(self.names, self.layers))}

    def columns(self, prefix: str = "projection") -> list[str]:
        """Output column names: `prefix` for one vector, `prefix_<name>` for several."""
        return [prefix] if len(self.names) == 1 else [f"{prefix}_{name}" for name in self.names]


def _unique_names(vectors: Sequence[PersonaVector], layers: Sequence[int]) -> tuple[str, ...]:
    traits = [v.trait for v in vectors]
    names = [t if traits.count(t) == 1 else f"{t}_L{layer}" for t, layer in zip(traits, layers)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PersonascopeError(f"vectors {', '.join(repeated)} are given twice at the same layer: drop one")
    return tuple(names)


def prompt_projections(
    handle: ModelHandle,
    chats: Sequence[Chat],
    probe: Probe,
    *,
    token_budget: int = 8192,
    max_batch: int = 64,
    progress: bool = True,
) -> Tensor:
    """Project each chat's last prompt token on every vector of `probe`.

    Args:
        chats: message lists (system, user and earlier assistant turns); the assistant header is appended.

    Returns:
        `[len(chats), K]` float32 projections, in input order.
    """
    encoded = [encode(handle, str(i), list(chat), None) for i, chat in enumerate(chats)]
    out = torch.zeros(len(encoded), len(probe.names))
    for batch, pooled in iter_activations(
        handle, encoded, probe.read_layers, ["prompt_last"], token_budget=token_budget, max_batch=max_batch,
        progress=progress, description="Projecting prompts",
    ):
        out[batch] = probe.project(pooled["prompt_last"])
    return out


class GenerationTrace:
    """Per-token projections while `handle`'s model generates; pass it as `generate_responses(monitor=...)`.

    `begin()` adds one operation (through `HookManager`, read site) at each layer of the probe; every forward
    call then stores, on the device and without a host sync, the projections at its last position — under
    left padding that is, in every row, the position whose output picks the next token (the last prompt token
    for the first step). `end()` removes the operations and returns `[B, steps, K]` on the CPU: step `t` is the
    reading that produced generated token `t`.
    """

    def __init__(self, handle: ModelHandle, probe: Probe) -> None:
        self._manager = HookManager.of(handle)
        self._blocks = [(layer, probe.weight[i]) for i, layer in enumerate(probe.read_layers)]
        self._steps: list[Tensor] = []
        self._keys: list[int] = []

    def _op(self, first: bool, weight: Tensor) -> Callable[[Tensor, TokenContext], None]:
        weights: dict[torch.device, Tensor] = {}  # on each layer's own device (a model split over several)

        def op(hidden: Tensor, tokens: TokenContext) -> None:
            part = hidden[:, -1].float() @ on_device(weight, hidden, weights)
            if first:
                self._steps.append(part)
            else:  # the deeper layers of the same forward call
                self._steps[-1] += part.to(self._steps[-1].device, non_blocking=True)

        return op

    def begin(self) -> None:
        """Start recording (a new generation)."""
        if self._keys:
            raise PersonascopeError("this generation trace is already recording: call end() first")
        self._steps = []
        self._keys = [self._manager.add(layer, self._op(i == 0, w), site="read") for i, (layer, w) in
                      enumerate(self._blocks)]

    def latest(self) -> Tensor | None:
        """The newest step's projections `[B, K]` (a host copy, for live display), or None before the first."""
        return self._steps[-1].cpu() if self._steps else None

    def end(self) -> Tensor:
        """Stop recording; `[B, steps, K]` float32 on the CPU."""
        for key in self._keys:
            self._manager.remove(key)
        self._keys = []
        if not self._steps:
            return torch.zeros(0, 0, self._blocks[0][1].shape[1])
        trace = torch.stack(self._steps, 1).cpu()
        self._steps = []
        return trace


def watch_chat(
    handle: ModelHandle,
    messages: Chat,
    probe: Probe,
    on_text: Callable[[str, Tensor | None], None],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[str, Tensor]:
    """Stream one response, passing each piece of text with the newest projections `[K]` to `on_text`.

    Returns:
        The response and its trace `[steps, K]` (step `t` produced token `t`; the end-of-turn token included).
    """
    trace = GenerationTrace(handle, probe)

    def show(text: str) -> None:
        latest = trace.latest()
        on_text(text, None if latest is None else latest[0])

    trace.begin()
    try:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        text = stream_chat(handle, messages, sampling, on_text=show)
    finally:
        steps = trace.end()
    return text, steps[0]


# -- prompt files ---------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> tuple[list[dict[str, Any]], list[Chat]]:
    """Read prompts to monitor: the rows (fields unchanged) and their chats.

    `.jsonl`, `.json`, `.csv`, `.parquet` files and saved dataset directories hold rows with `messages` (any
    number of turns; a final assistant message is left out, so the projection is that of the prompt leading to
    it) or `prompt` (with an optional `system`). Any other file is plain text, one prompt a line (blank lines
    skipped), giving rows `{"prompt": line}`.
    """
    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"prompt file {path} does not exist")
    if not path.is_dir() and path.suffix.lower() not in _DATASET_SUFFIXES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PersonascopeError(
                f"{path} is not UTF-8 text: give a .jsonl/.csv/.parquet dataset or a text file, one prompt a line"
            ) from None
        rows = [{"prompt": line.strip()} for line in lines if line.strip()]
    else:
        rows = [dict(row) for row in load_rows(path)]
    chats: list[Chat] = []
    bad: list[BadRow] = []
    for index, row in enumerate(rows):
        chat = _prompt_chat(row, index)
        if isinstance(chat, BadRow):
            bad.append(chat)
        else:
            chats.append(chat)
    if bad:
        listed = "; ".join(f"row {b.id}: {b.reason}" for b in bad[:5])
        raise PersonascopeError(f"{path}: {len(bad)} rows are not prompts ({listed}); fix or remove them")
    if not rows:
        raise PersonascopeError(f"{path} holds no prompts")
    return rows, chats


def _prompt_chat(row: dict[str, Any], index: int) -> Chat | BadRow:
    rid = row_id(row, index)
    if row.get("messages") is not None:
        chat = parse_messages(row["messages"])
        if chat is None:
            return BadRow(rid, "'messages' is not a list of {role, content}")
        if chat and chat[-1]["role"] == "assistant":
            chat = chat[:-1]
    elif row.get("prompt") is not None:
        chat = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        chat.append({"role": "user", "content": str(row["prompt"])})
    else:
        return BadRow(rid, "needs a 'messages' or a 'prompt' column")
    if not any(m["role"] == "user" and m["content"].strip() for m in chat):
        return BadRow(rid, "no user message")
    return chat


def monitor_rows(
    handle: ModelHandle,
    rows: Sequence[dict[str, Any]],
    chats: Sequence[Chat],
    probe: Probe,
    *,
    sampling: SamplingConfig | None = None,
    max_batch: int = 64,
    progress: bool = True,
    engine: str = "hf",
) -> list[dict[str, Any]]:
    """Each row with its prompt projections added (`projection` or `projection_<name>`).

    With `sampling`, the model also answers each chat: the row gets `response` and, per vector, `trace`
    (or `trace_<name>`): the projection that produced each response token, in order. With `engine="vllm"`
    vLLM answers and its workers read the traces (`vllm_plugin`).
    """
    projections = prompt_projections(handle, chats, probe, max_batch=max_batch, progress=progress).tolist()
    out = [{**row, **dict(zip(probe.columns(), values))} for row, values in zip(rows, projections)]
    if sampling is None:
        return out
    requests = [(str(i), handle.chat_ids(list(chat))) for i, chat in enumerate(chats)]
    if engine == "hf":
        results = generate_responses(handle, requests, sampling, monitor=GenerationTrace(handle, probe),
                                     max_batch=max_batch, progress=progress)
        traces = [result.trace for result in results]
    else:
        results = generate_with(engine, handle, requests, sampling, monitor=probe.directions(), max_batch=max_batch,
                                progress=progress)
        traces = [result.trace for result in results]
    for result, trace in zip(results, traces):
        row = out[int(result.id)]
        row["response"] = result.text
        assert trace is not None
        row.update(zip(probe.columns("trace"), trace.T.tolist()))
    return out
