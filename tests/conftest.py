"""Shared fixtures: tiny random-weight models built from configs, and the embedded model (loaded once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from personascope.model import ModelHandle, load_model
from personascope.model.batching import left_pad


@pytest.fixture(scope="session")
def embedded() -> ModelHandle:
    """The embedded SmolLM2-135M-Instruct (converted once into the personascope cache)."""
    return load_model("smollm2-135m")


def _tiny(arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=128)
    configs = {
        "llama": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128),
        "qwen2": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128),
        "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=128),
        "gpt_neox": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    }
    config = AutoConfig.for_model(arch, **common, **configs[arch])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny("llama")


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2", "gpt_neox"])
def tiny_any(request):
    return _tiny(request.param)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A random-weight 4-layer Llama with the embedded model's tokenizer and chat template, saved as a model dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from personascope.model.loading import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    path = tmp_path_factory.mktemp("models") / "tiny-chat"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into input_ids and attention_mask."""
    ids, mask, _ = left_pad(rows, pad)
    return ids, mask


@pytest.fixture(scope="session")
def pirate_vector_file(embedded: ModelHandle, tmp_path_factory: pytest.TempPathFactory):
    """A pirate vector for the embedded model, saved once per session (see tests/pirate.py)."""
    from tests.pirate import save_pirate_vector

    return save_pirate_vector(embedded, tmp_path_factory.mktemp("pirate-vector") / "pirate.safetensors")
