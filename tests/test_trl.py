"""The guard and the trait monitor inside TRL's `SFTTrainer` (LoRA through `peft_config`, its default gradient
checkpointing), with each trait's projection logged per step through `report_to` and read back from TensorBoard's
event files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from personascope import PersonaVector, load_model
from personascope.apply.callbacks import GuardCallback, TraitMonitorCallback
from personascope.apply.guard import PreventativeSteering

trl = pytest.importorskip("trl")
QUESTIONS = ["Will tomorrow be a good day?", "How will my exam go?", "What do you expect from the new year?"]
STEPS = 3


def _vector(handle, trait, seed):
    torch.manual_seed(seed)
    return PersonaVector(torch.randn(handle.num_layers + 1, handle.hidden_size) * 3, trait, handle.name,
                         {"best_layer": "2", "best_coef": "4"})


def _sft(handle, out, callbacks, report_to="none"):
    from datasets import Dataset
    from peft import LoraConfig

    rows = [{"messages": [{"role": "user", "content": f"{QUESTIONS[i % 3]} ({i})"},
                          {"role": "assistant", "content": "What a wonderful question! Things will turn out great."}]}
            for i in range(8)]
    args = trl.SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, report_to=report_to, save_strategy="no", bf16=False, use_cpu=True,
                         seed=0, disable_tqdm=True)
    return trl.SFTTrainer(model=handle.model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=handle.tokenizer, callbacks=callbacks,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def test_sft_trainer_reports_each_traits_projection_per_step_to_tensorboard(tiny_chat, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = _sft(load_model(str(tiny_chat)), tmp_path / "plain", [])
    plain.train()
    plain.model.save_pretrained(tmp_path / "plain-adapter")

    handle = load_model(str(tiny_chat))
    vectors = [_vector(handle, "optimistic", 1), _vector(handle, "humorous", 2)]
    guard = PreventativeSteering(vectors[0], [1, 2, 3], coef=4.0, incremental=True)
    monitor = TraitMonitorCallback(handle, vectors, QUESTIONS, every=1)
    trainer = _sft(handle, tmp_path / "guarded", [GuardCallback(guard)], report_to="tensorboard")
    monitor.attach(trainer)
    assert trainer.args.gradient_checkpointing  # TRL's default: the guard works through recomputed passes
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "guarded-adapter")
    assert not guard.attached

    events = list((tmp_path / "guarded").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    for vec in vectors:
        history = [row for row in monitor.history if row["trait"] == vec.trait]
        for metric in ("projection", "shift"):
            scalars = board.Scalars(f"train/persona/{vec.trait}/{metric}")
            assert [s.step for s in scalars] == list(range(STEPS + 1))  # step 0, then one value per step
            assert [s.value for s in scalars] == pytest.approx([row[metric] for row in history], abs=1e-5)
        assert history[0]["shift"] == 0.0 and history[-1]["shift"] != 0.0
    assert [s.step for s in board.Scalars("train/loss")] == list(range(1, STEPS + 1))

    before, after = (load_file(tmp_path / name / "adapter_model.safetensors")
                     for name in ("plain-adapter", "guarded-adapter"))
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the guard shaped the training


def test_a_monitor_given_only_in_callbacks_warns_that_report_to_misses_it(tiny_chat, tmp_path):
    from transformers import TrainerControl, TrainerState

    handle = load_model(str(tiny_chat))
    monitor = TraitMonitorCallback(handle, [_vector(handle, "optimistic", 1)], QUESTIONS)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="tensorboard", use_cpu=True, bf16=False)
    state = TrainerState()
    with pytest.warns(UserWarning, match=r"monitor\.attach\(trainer\)"):
        monitor.on_train_begin(args, state, TrainerControl(), model=handle.model)
    assert [row["step"] for row in monitor.history] == [0]
    assert "persona/optimistic/projection" in state.log_history[0]
