"""LoRA fine-tuning with the transformers `Trainer` and `peft`, optionally guarded and monitored."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personascope.apply.callbacks import TraitMonitorCallback
from personascope.apply.guard import PreventativeSteering
from personascope.errors import InputError, PersonascopeError
from personascope.io.checks import SEED_RANGE, check_count, check_number
from personascope.io.data import BadRow, ChatSample
from personascope.io.files import save_whole, write_json
from personascope.io.rundir import versions
from personascope.model import ModelHandle

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA and optimisation settings; the defaults suit a small model on a CPU.

    Attributes:
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        target_modules: the modules LoRA adapts (`all-linear` or a comma-separated list of names).
        epochs: passes over the data (ignored when `max_steps` > 0).
        lr: peak learning rate (linear decay).
        batch_size: samples per device batch; `grad_accum` batches make one optimiser step.
        max_steps: stop after this many optimiser steps (-1: run `epochs`).
        seed: seed of the LoRA initialisation and of the data order.
        max_length: longest training sequence in tokens; longer responses are cut.
        logging_steps: loss and learning rate are logged every this many steps.
        report_to: Trainer integrations (`none`, `tensorboard`, `wandb`, …).
    """

    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = -1
    seed: int = 0
    max_length: int = 1024
    logging_steps: int = 10
    report_to: str = "none"

    def check(self) -> None:
        """Raise `InputError` for a setting out of its range, naming it."""
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "logging_steps"):
            check_count(name, getattr(self, name))
        check_number("lr", self.lr, 0, open_low=True)
        check_number("epochs", self.epochs, 0)
        check_count("max_steps", self.max_steps, -1)
        check_count("seed", self.seed, *SEED_RANGE)
        if self.max_steps < 1 and not self.epochs > 0:
            raise InputError("give a positive number of epochs or max_steps")
        if check_number("lora_dropout", self.lora_dropout, 0, 1) == 1:
            raise InputError("lora_dropout 1 drops everything: give a value in [0, 1)")


@dataclass(frozen=True)
class TrainExample:
    """One training sequence: token ids and labels (−100 on the prompt)."""

    id: str
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced: the adapter directory, the optimiser steps taken and the Trainer's log."""

    adapter_dir: Path
    steps: int
    log_history: list[dict[str, Any]]


def build_examples(
    handle: ModelHandle, samples: Sequence[ChatSample], max_length: int = 1024
) -> tuple[list[TrainExample], list[BadRow]]:
    """Encode samples for assistant-only loss; rows whose prompt alone fills `max_length` come back as bad."""
    end = handle.tokenizer.eos_token_id
    examples: list[TrainExample] = []
    bad: list[BadRow] = []
    for sample in samples:
        chat = handle.encode_chat(sample.prompt, sample.response)
        ids = chat.ids + ([end] if end is not None else [])
        if chat.prompt_len >= max_length:
            bad.append(BadRow(sample.id, f"prompt of {chat.prompt_len} tokens leaves no room under {max_length}"))
            continue
        ids = ids[:max_length]
        labels = [-100] * chat.prompt_len + ids[chat.prompt_len:]
        examples.append(TrainExample(sample.id, ids, labels))
    return examples, bad


class _Collator:
    """Right-pads a batch; padding gets attention 0 and label −100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[TrainExample]) -> dict[str, Tensor]:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            ids[i, :n] = torch.tensor(row.input_ids)
            labels[i, :n] = torch.tensor(row.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse a directory that already holds an adapter (nothing written is ever overwritten)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PersonascopeError(f"output {out} is a file: give a directory for the adapter")
    for name in ADAPTER_FILES:
        if (out / name).exists():
            raise PersonascopeError(f"{out} already holds an adapter ({name}): choose a new --out directory")
    return out


def lora_model(handle: ModelHandle, config: FinetuneConfig) -> Any:
    """Wrap the handle's model in a fresh LoRA adapter (seeded)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = config.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)
    try:
        with warnings.catch_warnings():  # peft reads a property transformers has deprecated; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(handle.model, lora)
    except ValueError as exc:
        raise PersonascopeError(f"cannot add LoRA to {handle.name}: {str(exc).splitlines()[0]}") from None


def finetune(
    handle: ModelHandle,
    samples: Sequence[ChatSample],
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    guard: PreventativeSteering | None = None,
    monitor: TraitMonitorCallback | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a LoRA adapter on chat samples and save it to `out_dir`.

    `handle.model` is wrapped in place by `peft` (the handle then serves the fine-tuned model). Checks run
    before training: settings, output directory, usable samples, and the guard's vector and layers.

    Args:
        handle: the base model.
        samples: chat samples (`personascope.io.data.load_samples`); the loss covers their responses only.
        out_dir: where the adapter and `finetune.json` go; must not hold an adapter yet.
        config: LoRA and optimisation settings.
        guard: preventative steering, active in training forward passes only.
        monitor: trait monitoring every N steps, logged through the Trainer.
        progress: show the Trainer's progress bar.

    Returns:
        The adapter directory, the steps taken and the Trainer's log history.

    Example:
        >>> samples, _ = load_samples("train.jsonl")
        >>> finetune(load_model("smollm2-135m"), samples, "runs/ft", guard=PreventativeSteering(vec, 20, 4.0))
    """
    from transformers import Trainer, TrainingArguments

    config.check()
    out = check_output_dir(out_dir)
    examples, bad = build_examples(handle, samples, config.max_length)
    if not examples:
        reasons = "; ".join(sorted({b.reason for b in bad})) or "no samples"
        raise PersonascopeError(f"no training sequences to learn from: {reasons}")
    if guard is not None:
        guard.operations(handle)  # vector fit (by name too), layers, values: checked before anything changes
    model = lora_model(handle, config)
    if guard is not None:
        guard.attach(model)
    try:
        on_gpu = handle.device.type == "cuda"
        args = TrainingArguments(
            output_dir=str(out), num_train_epochs=config.epochs, max_steps=config.max_steps,
            learning_rate=config.lr, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum, seed=config.seed, data_seed=config.seed,
            logging_steps=config.logging_steps, logging_first_step=True, save_strategy="no",
            report_to=config.report_to, remove_unused_columns=False, use_cpu=not on_gpu,
            bf16=on_gpu and handle.dtype == torch.bfloat16, disable_tqdm=not progress,
        )
        trainer = Trainer(model=model, args=args, train_dataset=examples,  # type: ignore[arg-type]
                          data_collator=_Collator(handle.tokenizer.pad_token_id))
        if monitor is not None:
            monitor.attach(trainer)
        handle.model = model
        output = trainer.train()
        save_whole(out, lambda tmp: model.save_pretrained(str(tmp)))
    finally:
        if guard is not None:
            guard.detach()
    model.eval()
    write_json(out / "finetune.json", {
        "model": handle.name, "samples": len(examples), "left_out": [asdict(b) for b in bad],
        "config": asdict(config), "guard": guard.describe() if guard is not None else None,
        "monitor": [v.trait for v in monitor.vectors] if monitor is not None else [],
        "steps": output.global_step, "train_loss": output.training_loss,
        "log_history": trainer.state.log_history, "versions": versions(),
    })
    return FinetuneResult(out, output.global_step, trainer.state.log_history)
