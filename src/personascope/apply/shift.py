"""Fine-tuning shift: how far fine-tuning moved a model along a persona vector, before it answers anything."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personascope.errors import PersonascopeError
from personascope.inference.activations import encode, iter_activations
from personascope.model import ModelHandle
from personascope.vector import PersonaVector

Chat = list[dict[str, str]]


def as_chat(question: str | Sequence[dict[str, str]]) -> Chat:
    """A question string as a one-turn user chat; a message list as it is."""
    return [{"role": "user", "content": question}] if isinstance(question, str) else list(question)


@dataclass(frozen=True)
class LayerShift:
    """The shift at one layer: fine-tuned minus base projection, also relative to the vector's norm there."""

    layer: int
    shift: float
    relative_shift: float
    base_projection: float
    finetuned_projection: float


@dataclass(frozen=True)
class ShiftReport:
    """How far a fine-tune moved a model along a vector; `shift` is at the vector's best layer (None when the
    vector records none or that layer is not reported)."""

    trait: str
    base_model: str
    finetuned_model: str
    n_questions: int
    best_layer: int | None
    shift: float | None
    relative_shift: float | None
    layers: list[LayerShift]


def mean_prompt_last(
    handle: ModelHandle,
    chats: Sequence[str | Sequence[dict[str, str]]],
    layers: Sequence[int] | None = None,
    *,
    max_batch: int = 64,
    progress: bool = True,
) -> Tensor:
    """Mean last-prompt-token activation over `chats` at each layer.

    Args:
        chats: questions (one user turn each) or message lists; the assistant header is appended.
        layers: HF `hidden_states` indices; all of `0..L` by default.

    Returns:
        `[len(layers), d]` float32 (summed in float64 batch by batch, so memory stays flat).
    """
    if not chats:
        raise PersonascopeError("mean_prompt_last needs at least one question")
    layer_list = list(range(handle.num_layers + 1)) if layers is None else list(layers)
    encoded = [encode(handle, str(i), as_chat(chat), None) for i, chat in enumerate(chats)]
    total = torch.zeros(len(layer_list), handle.hidden_size, dtype=torch.float64)
    for _, pooled in iter_activations(handle, encoded, layer_list, ["prompt_last"], max_batch=max_batch,
                                      progress=progress, description=f"Reading {handle.name}"):
        total += pooled["prompt_last"].double().sum(0)
    return (total / len(encoded)).float()


def projection_shift(
    base_handle: ModelHandle | None,
    finetuned_handle: ModelHandle,
    vector: PersonaVector,
    questions: Sequence[str | Sequence[dict[str, str]]],
    layers: Sequence[int] | None = None,
    *,
    max_batch: int = 64,
    progress: bool = True,
) -> ShiftReport:
    """Projection shift of `finetuned_handle` relative to `base_handle` along `vector`.

    Args:
        base_handle: the base model; None when `finetuned_handle` is a PEFT adapter on it, whose base is then
            read with the adapter disabled (one copy of the weights in memory, not two).
        vector: a persona vector made for the base model (the fine-tuned one must have the same shape).
        questions: evaluation questions or chats, asked to both models.
        layers: layers to report; by default every layer where the vector is non-zero.

    Returns:
        The shift per layer and at the vector's best layer; `relative_shift` divides by the vector's norm at the
        layer (the pos−neg mean gap it was made from).
    """
    if base_handle is None and not hasattr(finetuned_handle.model, "disable_adapter"):
        raise PersonascopeError("without a base model the fine-tuned model must be a PEFT adapter on its base")
    vector.check_model(base_handle or finetuned_handle)
    vector.check_model(finetuned_handle.model)
    norms = vector.directions.norm(dim=-1)
    layer_list = [l for l in range(vector.num_layers + 1) if norms[l] > 0] if layers is None else list(layers)
    if not layer_list:
        raise PersonascopeError(f"vector for {vector.trait!r} is zero at every layer")
    units = torch.stack([vector.unit(l) for l in layer_list])
    if base_handle is None:
        with finetuned_handle.model.disable_adapter():
            base = mean_prompt_last(finetuned_handle, questions, layer_list, max_batch=max_batch, progress=progress)
    else:
        base = mean_prompt_last(base_handle, questions, layer_list, max_batch=max_batch, progress=progress)
    tuned = mean_prompt_last(finetuned_handle, questions, layer_list, max_batch=max_batch, progress=progress)
    base_p, tuned_p = (base * units).sum(-1), (tuned * units).sum(-1)
    shift = ((tuned.double() - base.double()) * units.double()).sum(-1)
    rows = [
        LayerShift(layer, float(shift[i]), float(shift[i] / norms[layer]), float(base_p[i]), float(tuned_p[i]))
        for i, layer in enumerate(layer_list)
    ]
    best = vector.best_layer
    at_best = next((row for row in rows if row.layer == best), None)
    return ShiftReport(
        trait=vector.trait,
        base_model=(base_handle.source or base_handle.name) if base_handle else finetuned_handle.name,
        finetuned_model=finetuned_handle.source or finetuned_handle.name,
        n_questions=len(questions),
        best_layer=best,
        shift=None if at_best is None else at_best.shift,
        relative_shift=None if at_best is None else at_best.relative_shift,
        layers=rows,
    )
