"""The engine dispatch without vLLM: `hf` is `generate_responses` itself, unknown engines and a missing vLLM are
one clear error, and a model with hooks installed is refused before vLLM is touched (steering goes to the
engine as `steering=`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.inference.engines import generate_with
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.inference.vllm_engine import generate_vllm
from tests.test_screen import tiny, write_jsonl  # noqa: F401  (tiny is a fixture)

PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Why is the sky blue? Be brief."]


def requests(handle):
    return [(f"q{i}", handle.chat_ids([{"role": "user", "content": p}])) for i, p in enumerate(PROMPTS)]


def test_hf_engine_is_generate_responses(tiny):
    handle, _, _ = tiny
    sampling = SamplingConfig(12, 1.0, seed=5)
    ours = generate_with("hf", handle, requests(handle), sampling, max_batch=2, progress=False)
    theirs = generate_responses(handle, requests(handle), sampling, max_batch=2, progress=False)
    assert [(r.id, r.text, r.token_ids) for r in ours] == [(r.id, r.text, r.token_ids) for r in theirs]


def test_unknown_engine_missing_vllm_and_steering_are_clear_errors(tiny):
    handle, vector, _ = tiny
    with pytest.raises(PersonascopeError, match="unknown engine 'tgi'"):
        generate_with("tgi", handle, requests(handle), SamplingConfig(4), progress=False)
    with ps.steer(handle, vector, 2, 4.0), pytest.raises(PersonascopeError, match="hooks installed.*steering="):
        generate_vllm(handle, requests(handle), SamplingConfig(4), progress=False)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(PersonascopeError, match="make setup-vllm"):
            generate_with("vllm", handle, requests(handle), SamplingConfig(4), progress=False)


def test_monitor_cli_refuses_an_engine_without_generate(tiny, tmp_path):
    _, _, model_dir = tiny
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    vector = str(model_dir.parent / "tiny.safetensors")
    result = subprocess.run([sys.executable, "-m", "personascope.cli", "monitor", str(data), "-v", vector, "--out",
                             str(tmp_path / "o.jsonl"), "--model", str(model_dir), "--engine", "vllm"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: --engine chooses who answers")
