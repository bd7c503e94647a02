"""The big-model paths on a CPU: loading straight to a device map, the CLI following the vector's model, one
error line on running out of memory, shift on an adapter, repeng GGUF without the last layers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import personascope as ps
from personascope.apply.shift import projection_shift
from personascope.errors import PersonascopeError
from personascope.inference.activations import encode, read_activations
from personascope.model import load_model
from personascope.vector import PersonaVector

from .test_extract import one_error_line

CLI = [sys.executable, "-m", "personascope.cli"]


def test_load_model_loads_straight_to_the_device_or_device_map(tiny_chat, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    plain = load_model(str(tiny_chat), device="cpu")
    layers = {f"model.layers.{i}": "cpu" for i in range(4)}
    split = load_model(str(tiny_chat), device_map={"model.embed_tokens": "cpu", **layers, "model.norm": "cpu",
                                                   "model.rotary_emb": "cpu", "lm_head": "cpu"})
    assert seen == [{"": "cpu"}, {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu",
                                  "model.rotary_emb": "cpu", "lm_head": "cpu"}]
    assert split.devices == [torch.device("cpu")] and split.device == torch.device("cpu")
    chats = [encode(plain, "a", [{"role": "user", "content": "Hello there"}], "Hi, how are you?")]
    vec = torch.randn(5, 64)
    readings = []
    for handle in (plain, split):
        with ps.steer(handle, vec, 2, coef=2.0):
            readings.append(read_activations(handle, chats, [1, 3], progress=False)["response_avg"])
    torch.testing.assert_close(readings[0], readings[1])
    with pytest.raises(PersonascopeError, match="unknown device map 'everywhere'"):
        load_model(str(tiny_chat), device_map="everywhere")


def test_running_out_of_memory_is_one_error_naming_the_knob(tiny_chat):
    handle = load_model(str(tiny_chat))
    chats = [encode(handle, str(i), [{"role": "user", "content": "Hello"}], "Hi there") for i in range(3)]

    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = handle.layers[0].register_forward_pre_hook(explode)
    try:
        with pytest.raises(PersonascopeError, match="out of memory on a batch of 3 rows .*lower --batch-size"):
            read_activations(handle, chats, [2], progress=False)
    finally:
        hook.remove()


def test_commands_default_to_the_vectors_model(tiny_chat, tmp_path):
    handle = load_model(str(tiny_chat))
    path = PersonaVector(torch.randn(5, 64), "tiny", handle.name, {"best_layer": "2", "best_coef": "1"}).save(
        tmp_path / "v.safetensors")
    command = [*CLI, "generate", "Hello", "--vector", str(path), "--max-new-tokens", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tiny_chat.parent)
    assert result.returncode == 0, result.stderr  # the embedded default would not fit this vector
    assert "steering with tiny at layer 2" in result.stdout
    one_error_line(subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path),
                   "local model 'tiny-chat'", "--model")


def test_shift_on_an_adapter_reads_the_base_with_the_adapter_disabled(tiny_chat, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from personascope.cli import _register_commands, app

    base = load_model(str(tiny_chat))
    tuned = get_peft_model(load_model(str(tiny_chat)).model, LoraConfig(r=2, target_modules=["down_proj"],
                                                                        init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    vec = PersonaVector(torch.randn(5, 64), "optimistic", base.name, {"best_layer": "3"})
    vec.save(tmp_path / "v.safetensors")
    adapter = load_model(str(tmp_path / "adapter"))
    questions = ["How will tomorrow be?", "Is the glass half full?"]
    once = projection_shift(None, adapter, vec, questions, progress=False)
    twice = projection_shift(base, adapter, vec, questions, progress=False)
    assert once.shift == pytest.approx(twice.shift, abs=1e-5) and abs(once.shift) > 1e-4
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    _register_commands()
    result = CliRunner().invoke(app, ["shift", "--finetuned", str(tmp_path / "adapter"), "-v",
                                      str(tmp_path / "v.safetensors"), "--questions", "optimistic",
                                      "--batch-size", "3", "--out", str(tmp_path / "shift.json")])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1, "the base model was loaded twice"
    assert json.loads((tmp_path / "shift.json").read_text())["n_questions"] == 20


def test_repeng_gguf_without_the_last_layers_pads_with_zeros(tmp_path):
    import gguf

    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    rows = {block: torch.randn(64) for block in (1, 2)}  # blocks 1-2 of a 4-layer model: no block 3
    for block, row in rows.items():
        writer.add_tensor(f"direction.{block}", row.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = PersonaVector.import_gguf(path, num_layers=4)
    assert vec.directions.shape == (5, 64)
    for block, row in rows.items():
        assert torch.equal(vec.directions[block + 1], row)  # their block i is our layer i+1
    assert not vec.directions[[0, 1]].any() and not vec.directions[4].any()
    with pytest.raises(PersonascopeError, match="direction.2 .*2 layers"):
        PersonaVector.import_gguf(path, num_layers=2)
