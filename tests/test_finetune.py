"""LoRA fine-tuning: assistant-only labels, guarded adapters without a trace, the trait monitor, CLI checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from personascope import PersonaVector, load_model
from personascope.apply.callbacks import TraitMonitorCallback
from personascope.apply.finetune import FinetuneConfig, build_examples, finetune
from personascope.apply.guard import GUARD_FRACTION, PreventativeSteering
from personascope.io.data import ChatSample, load_samples

QUESTIONS = ["Will tomorrow be a good day?", "How will my exam go?", "What do you expect from the new year?"]


def _samples(n=8):
    answer = "What a wonderful question! Things will turn out great, I am sure of it."
    return [ChatSample(str(i), [{"role": "user", "content": QUESTIONS[i % 3] + f" ({i})"}], answer, {})
            for i in range(n)]


def _vector(handle, seed=1):
    torch.manual_seed(seed)
    directions = torch.randn(handle.num_layers + 1, handle.hidden_size) * 3
    return PersonaVector(directions, "optimistic", handle.name, {"best_layer": "2", "best_coef": "4"})


def test_labels_cover_the_response_and_end_of_turn_only(tiny_chat):
    handle = load_model(str(tiny_chat))
    sample = _samples(1)[0]
    (example,), bad = build_examples(handle, [sample])
    chat = handle.encode_chat(sample.prompt, sample.response)
    assert not bad
    assert example.input_ids == chat.ids + [handle.tokenizer.eos_token_id]
    assert example.labels[:chat.prompt_len] == [-100] * chat.prompt_len
    assert example.labels[chat.prompt_len:] == example.input_ids[chat.prompt_len:]
    (cut,), _ = build_examples(handle, [sample], max_length=chat.prompt_len + 2)
    assert len(cut.input_ids) == chat.prompt_len + 2
    kept, bad = build_examples(handle, [sample], max_length=chat.prompt_len)
    assert not kept and bad[0].id == sample.id


def test_guarded_adapter_has_no_trace_and_loads_with_plain_peft(tiny_chat, tmp_path):
    config = FinetuneConfig(lora_r=4, lora_alpha=8, lora_dropout=0.1, batch_size=4, max_steps=2, logging_steps=1)
    plain_handle = load_model(str(tiny_chat))
    finetune(plain_handle, _samples(), tmp_path / "plain", config, progress=False)

    handle = load_model(str(tiny_chat))
    vec = _vector(handle)
    guard = PreventativeSteering(vec, [1, 2, 3], coef=4.0, incremental=True)
    monitor = TraitMonitorCallback(handle, [vec], QUESTIONS, every=1, log_path=tmp_path / "monitor.jsonl")
    result = finetune(handle, _samples(), tmp_path / "guarded", config, guard=guard, monitor=monitor, progress=False)

    plain, guarded = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "guarded"))
    assert plain.keys() == guarded.keys() and plain
    assert any(not torch.equal(plain[k], guarded[k]) for k in plain)  # the guard shaped training
    assert not guard.attached
    assert json.loads((tmp_path / "guarded" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "adapter_config.json").read_text())

    # The monitor: step 0 is measured (eval mode, no dropout, guard off), so its shift is exactly 0.
    steps = [row["step"] for row in monitor.history]
    assert steps == [0, 1, 2] and monitor.history[0]["shift"] == 0.0
    assert monitor.history[-1]["shift"] != 0.0
    logged = [row for row in result.log_history if "persona/optimistic/shift" in row]
    assert [row["step"] for row in logged] == steps
    assert len((tmp_path / "monitor.jsonl").read_text().splitlines()) == 3

    # Plain peft, with personascope made unimportable, loads the adapter onto the base model.
    script = (
        "import sys; sys.modules['personascope'] = None\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'guarded')!r})\n"
        "print(sum('lora_' in k for k in m.state_dict()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == len(guarded)


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "personascope.cli", "finetune", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def test_cli_checks_everything_before_training(tiny_chat, tmp_path):
    handle = load_model(str(tiny_chat))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": s.prompt[0]["content"], "response": s.response}) + "\n"
                            for s in _samples()))
    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                  for q in QUESTIONS))
    good = _vector(handle).save(tmp_path / "good.safetensors")
    nan = tmp_path / "nan.safetensors"
    directions = torch.randn(handle.num_layers + 1, handle.hidden_size)
    directions[2, 5] = float("nan")
    save_file({"directions": directions}, str(nan),
              metadata={"format": "personascope.vector/1", "trait": "optimistic", "model": handle.name})
    other = PersonaVector(torch.randn(31, 576), "optimistic", "smollm2-135m").save(tmp_path / "other.safetensors")
    common = ["--model", tiny_chat, "--max-steps", "2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8"]
    failing = {
        "nan": (_cli(data, "--out", tmp_path / "o1", "--guard", nan, *common), "NaN", 1),
        "other model": (_cli(data, "--out", tmp_path / "o2", "--guard", other, *common), "does not fit", 1),
        "layer": (_cli(data, "--out", tmp_path / "o3", "--guard", good, "--guard-layers", "9", *common),
                  "out of range", 2),  # a bad value given: exit 2
        "no answers": (_cli(no_answers, "--out", tmp_path / "o4", "--guard", good, *common), "no assistant message",
                       1),
    }
    ok = _cli(data, "--out", tmp_path / "ok", "--guard", good, "--guard-layers", "all", "--monitor", good,
              "--monitor-every", "1", *common)
    for name, (proc, message, code) in failing.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == code, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, stderr)
        assert not any(tmp_path.glob("o[0-9]/*")), name  # refused before anything was written
    stdout, stderr = ok.communicate(timeout=600)
    assert ok.returncode == 0, stderr
    record = json.loads((tmp_path / "ok" / "finetune.json").read_text())
    assert record["steps"] == 2 and record["guard"]["incremental"] is True and record["guard"]["layers"] == [1, 2, 3]
    assert record["guard"]["coef"] == pytest.approx(GUARD_FRACTION * 4)  # default: a quarter of the best coef
    assert len((tmp_path / "ok" / "monitor.jsonl").read_text().splitlines()) == 3
    samples, _ = load_samples(data)
    assert record["samples"] == len(samples)
