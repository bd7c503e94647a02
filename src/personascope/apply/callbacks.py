"""Trainer callbacks: the fine-tuning guard attached for training, and trait monitoring every N steps."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from personascope.apply.guard import PreventativeSteering
from personascope.apply.shift import mean_prompt_last
from personascope.errors import PersonascopeError
from personascope.io.records import RecordLog
from personascope.model import ModelHandle
from personascope.vector import PersonaVector


class GuardCallback(TrainerCallback):
    """Attach a `PreventativeSteering` guard to the Trainer's model at the start of training, detach it at the end.

    Example:
        >>> Trainer(model=model, args=args, train_dataset=rows, callbacks=[GuardCallback(guard)]).train()
    """

    def __init__(self, guard: PreventativeSteering) -> None:
        self.guard = guard
        self._attached_here = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if not self.guard.attached and model is not None:
            self.guard.attach(model)
            self._attached_here = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._attached_here:
            self._attached_here = False
            self.guard.detach()




class TraitMonitorCallback(TrainerCallback):
    """Log each trait's projection shift every `every` steps while a `Trainer` runs.

    The measure is the mean projection of the last-prompt-token activation of `questions` (held-out prompts,
    no system prompt) on the trait's unit vector at the vector's best layer, minus the same measure of the model
    at step 0. Passes run in eval mode under `inference_mode` (no dropout, no training-only guard hooks), and
    the model goes back to train mode afterwards. Rows go to `trainer.log` as `persona/<trait>/shift` and
    `persona/<trait>/projection` (so every `report_to` integration gets them: TensorBoard shows
    `train/persona/<trait>/projection`), and to `log_path` (JSONL) when given. Any `transformers.Trainer` works,
    TRL's `SFTTrainer` included; `attach` it (a callback given in `callbacks=[...]` cannot reach `trainer.log`,
    and its rows only go to `state.log_history` and `log_path`).

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
        self.log = RecordLog(log_path) if log_path is not None else None
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

    def _record(self, state: TrainerState, control: TrainerControl, model: nn.Module) -> None:
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
            should_log = control.should_log  # trainer.log resets it: keep the step's own log (loss) due
            self._trainer.log(metrics)
            control.should_log = should_log
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    # -- TrainerCallback --------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise PersonascopeError("the trait monitor got no model from the Trainer")
        if self._trainer is None and [r for r in args.report_to or [] if r != "none"]:
            warnings.warn("the trait monitor was not attached with monitor.attach(trainer): its projections go to "
                          f"state.log_history only, not to report_to ({', '.join(args.report_to)})", stacklevel=2)
        self._baseline = self.measure(model)
        self._record(state, control, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self._record(state, control, model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.global_step != self._last_step:
            self._record(state, control, model)
