"""Fine-tuning guard: preventative steering during training, and trait monitoring while training runs.

`PreventativeSteering` adds operations through the one `HookManager` that act only in *training* forward
passes (the model in `train()` mode with gradients on): while fine-tuning on data that would push a model
toward a trait, it steers toward the trait (or ablates the direction), so the optimiser has no reason to move
the weights that way. Evaluation, `generate()` (no gradients), monitoring passes (eval mode under
`inference_mode`) and saving see the plain model; the hooks hold no parameters, so a saved adapter has exactly
the keys of an unguarded run.

Token scope: all real tokens of each training sequence (prompt and response; padding excluded). A training
sequence is teacher-forced with no generation step, and the trait shows in how the whole conversation is
represented, so the steering covers every position, as in the reference implementation.

`TraitMonitorCallback` is a `transformers.TrainerCallback` that, every N steps, measures the projection shift of
the last-prompt-token activation on held-out prompts versus the model at step 0, per trait, and logs it through
the Trainer's own `log` (so `report_to` TensorBoard / W&B receive it, and `state.log_history` keeps it) and to a
JSONL file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from personascope.errors import PersonascopeError
from personascope.hooks import HookManager, Operation, TokenContext, _direction, ablate_op, add_op
from personascope.layers import parse_layers
from personascope.models import ModelHandle, as_module
from personascope.rundir import JsonlLog
from personascope.shift import mean_prompt_last
from personascope.vector import PersonaVector

GuardMode = Literal["steer", "ablate"]
GUARD_MODES: tuple[str, ...] = ("steer", "ablate")
GUARD_FRACTION = 0.25
"""Default guard strength, as a fraction of the vector's best (inference-time) steering coefficient.

Measured with `experiments/preventative_steering.py` on the embedded model (optimistic, layer 17): the trait data
shifted the projection by +3.28; guarding at 0.1, 0.25, 0.5 and 1 times the best coefficient left +1.82, -0.08,
-2.72 and -4.05. The full coefficient, tuned to change generated text, over-corrects (the model moves away from
the trait and loses likelihood on trait-positive text); a quarter cancelled the shift."""


def default_guard_coef(vector: PersonaVector) -> float:
    """`GUARD_FRACTION` times the vector's best coefficient; an error when the vector records none."""
    if vector.best_coef is None:
        raise PersonascopeError(f"the {vector.trait} vector records no best coefficient: "
                                "give a guard coefficient (--guard-coef)")
    return GUARD_FRACTION * vector.best_coef


def _training_only(op: Operation, module: nn.Module) -> Operation:
    """`op` in training forward passes (train mode with gradients on); a no-op in every other pass."""

    def gated(hidden: Tensor, tokens: TokenContext) -> Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        return op(hidden, tokens)

    return gated


class PreventativeSteering(TrainerCallback):
    """Steer toward a trait (or ablate it) in training forward passes only.

    Attach it to a model with `attach` (a context manager too), or pass it to a `Trainer` in `callbacks`,
    which attaches it at the start of training and detaches it at the end.

    Args:
        vector: the trait's persona vector (`PersonaVector`, or an `[L+1, d]` tensor).
        layers: layer index or indices (HF `hidden_states` convention), or `"all"` (1..L-1).
        coef: multiplier of the vector in `steer` mode (the same units as `personascope.steer`).
        mode: `steer` adds `coef·v_l` at each layer; `ablate` projects the direction out at each layer.
        incremental: in `steer` mode over several layers, add `coef·(v_l − v_prev)` at each steered layer
            after the first (`prev` = the steered layer before it; the first gets `coef·v_l`). The residual
            stream carries what earlier layers added, so the total added by the time layer `l` is written is
            `coef·v_l`: the paper's all-layer variant, where plain addition would pile the vector up L times.

    Example:
        >>> guard = PreventativeSteering(vec, layers=20, coef=5.0)
        >>> with guard.attach(peft_model):
        ...     trainer.train()
    """

    def __init__(
        self,
        vector: PersonaVector | Tensor,
        layers: int | Sequence[int] | str,
        coef: float = 1.0,
        mode: GuardMode = "steer",
        incremental: bool = False,
    ) -> None:
        if mode not in GUARD_MODES:
            raise PersonascopeError(f"unknown guard mode {mode!r}: use steer or ablate")
        if incremental and mode != "steer":
            raise PersonascopeError("incremental applies to mode='steer' only: ablation removes each layer's own direction")
        if not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise PersonascopeError(f"guard coefficient must be a finite number, got {coef!r}")
        self.vector = vector
        self.layers = layers
        self.coef = float(coef)
        self.mode = mode
        self.incremental = incremental
        self._manager: HookManager | None = None
        self._keys: list[int] = []
        self._attached_by_trainer = False

    @property
    def attached(self) -> bool:
        return self._manager is not None

    def operations(self, model: ModelHandle | nn.Module) -> list[tuple[int, Operation]]:
        """The checked `(layer, operation)` pairs for `model`; raises before anything is added."""
        manager = HookManager.of(model)
        module = as_module(model)
        if isinstance(self.vector, PersonaVector):
            self.vector.check_model(model)
        layers = parse_layers(self.layers, manager.num_layers, option="guard layers")
        for layer in layers:
            manager.check_layer(layer)
        rows = {layer: _direction(self.vector, layer, manager) for layer in layers}
        ops: list[tuple[int, Operation]] = []
        previous: int | None = None
        for layer in layers:
            if self.mode == "ablate":
                op = ablate_op(rows[layer], "all")
            else:
                row = rows[layer] - rows[previous] if self.incremental and previous is not None else rows[layer]
                op = add_op(row, self.coef, "all")
            ops.append((layer, _training_only(op, module)))
            previous = layer
        return ops

    def attach(self, model: ModelHandle | nn.Module) -> PreventativeSteering:
        """Add the guard's operations to `model` (checked first: vector fit, layers, finite values)."""
        if self.attached:
            raise PersonascopeError("this guard is already attached to a model: detach() it first")
        ops = self.operations(model)
        manager = HookManager.of(model)
        self._keys = [manager.add(layer, op) for layer, op in ops]
        self._manager = manager
        return self

    def detach(self) -> None:
        """Remove the guard's operations (a no-op when not attached)."""
        if self._manager is not None:
            for key in self._keys:
                self._manager.remove(key)
        self._manager, self._keys, self._attached_by_trainer = None, [], False

    def __enter__(self) -> PreventativeSteering:
        if not self.attached:
            raise PersonascopeError("attach the guard to a model first: `with guard.attach(model):`")
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def describe(self) -> dict[str, Any]:
        """The guard's settings, for manifests and logs."""
        trait = self.vector.trait if isinstance(self.vector, PersonaVector) else None
        return {"trait": trait, "layers": self.layers, "coef": self.coef, "mode": self.mode,
                "incremental": self.incremental}

    # -- TrainerCallback --------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if not self.attached and model is not None:
            self.attach(model)
            self._attached_by_trainer = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._attached_by_trainer:
            self.detach()


class TraitMonitorCallback(TrainerCallback):
    """Log each trait's projection shift every `every` steps while a `Trainer` runs.

    The measure is the mean projection of the last-prompt-token activation of `questions` (held-out prompts,
    no system prompt) on the trait's unit vector at the vector's best layer, minus the same measure of the model
    at step 0. Passes run in eval mode under `inference_mode` (no dropout, no training-only guard hooks), and
    the model goes back to train mode afterwards. Rows go to `trainer.log` as `persona/<trait>/shift` and
    `persona/<trait>/projection`, and to `log_path` (JSONL) when given.

    Args:
        handle: the model being trained (its tokenizer and name are used; the module comes from the Trainer).
        vectors: one persona vector per trait, each with a `best_layer` (or give `layers`).
        questions: held-out prompts, shared by all traits or per trait name.
        every: measure every this many optimiser steps (and at step 0 and the last step).
        log_path: a JSONL file to append the rows to.
        layers: a layer per trait name, overriding the vectors' best layers.

    Example:
        >>> monitor = TraitMonitorCallback(handle, [vec], spec.eval_questions, every=10)
        >>> monitor.attach(trainer)
        >>> trainer.train()
    """

    def __init__(
        self,
        handle: ModelHandle,
        vectors: Sequence[PersonaVector],
        questions: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        every: int = 10,
        log_path: str | Path | None = None,
        layers: Mapping[str, int] | None = None,
    ) -> None:
        if every < 1:
            raise PersonascopeError(f"monitor interval must be at least 1 step, got {every}")
        if not vectors:
            raise PersonascopeError("the trait monitor needs at least one persona vector")
        names = [v.trait for v in vectors]
        if len(set(names)) != len(names):
            raise PersonascopeError(f"two monitor vectors share a trait name ({', '.join(names)}): give one per trait")
        self.tokenizer = handle.tokenizer
        self.name = handle.name
        self.vectors = list(vectors)
        self.every = every
        self.log = JsonlLog(log_path) if log_path is not None else None
        self.layers: dict[str, int] = {}
        self.questions: dict[str, list[str]] = {}
        for vec in self.vectors:
            vec.check_model(handle)
            self.layers[vec.trait] = vec.layer((layers or {}).get(vec.trait))
            asked = questions.get(vec.trait, ()) if isinstance(questions, Mapping) else questions
            if not asked:
                raise PersonascopeError(f"no held-out prompts to monitor trait {vec.trait!r}: give questions for it")
            self.questions[vec.trait] = [str(q) for q in asked]
        self.history: list[dict[str, Any]] = []
        self._baseline: dict[str, float] = {}
        self._trainer: Any = None
        self._last_step = -1

    def attach(self, trainer: Any) -> TraitMonitorCallback:
        """Add this callback to `trainer` and log through its `log` method."""
        trainer.add_callback(self)
        self._trainer = trainer
        return self

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Mean projection per trait for `model` as it is now (eval mode, inference_mode, train mode restored)."""
        was_training = model.training
        model.eval()
        try:
            handle = ModelHandle(model=model, tokenizer=self.tokenizer, name=self.name)
            out = {}
            for vec in self.vectors:
                layer = self.layers[vec.trait]
                mean = mean_prompt_last(handle, self.questions[vec.trait], [layer], progress=False)
                out[vec.trait] = float(vec.project(mean[0], layer))
            return out
        finally:
            if was_training:
                model.train()

    def _record(self, state: TrainerState, model: nn.Module) -> None:
        projections = self.measure(model)
        metrics: dict[str, float] = {}
        for trait, value in projections.items():
            shift = value - self._baseline[trait]
            row = {"id": f"{trait}/step-{state.global_step}", "trait": trait, "layer": self.layers[trait],
                   "step": state.global_step, "epoch": state.epoch, "projection": value, "shift": shift}
            self.history.append(row)
            if self.log is not None:
                self.log.append(row)
            metrics[f"persona/{trait}/shift"] = shift
            metrics[f"persona/{trait}/projection"] = value
        self._last_step = state.global_step
        if self._trainer is not None:
            self._trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    # -- TrainerCallback --------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise PersonascopeError("the trait monitor got no model from the Trainer")
        self._baseline = self.measure(model)
        self._record(state, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self._record(state, model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.global_step != self._last_step:
            self._record(state, model)
