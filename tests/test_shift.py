"""Fine-tuning shift on the embedded model: zero against itself, and the planted amount and sign for a real PEFT
adapter whose only change adds ε·v̂ to one decoder layer's output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from personascope.apply.shift import mean_prompt_last, projection_shift
from personascope.model import load_model
from personascope.traits import load_trait
from personascope.vector import PersonaVector

PLANTED_LAYER = 12
EPSILON = 2.0


@pytest.fixture(scope="module")
def optimism(embedded) -> PersonaVector:
    """A prompt-last mean-difference vector from two of the optimistic trait's pairs."""
    spec = load_trait("optimistic")
    chats = {pol: [[{"role": "system", "content": getattr(pair, pol)}, {"role": "user", "content": q}]
                   for pair in spec.instruction[:2] for q in spec.extract_questions[:4]] for pol in ("pos", "neg")}
    pos, neg = (mean_prompt_last(embedded, chats[pol], progress=False) for pol in ("pos", "neg"))
    return PersonaVector(pos - neg, "optimistic", embedded.name, {"best_layer": str(PLANTED_LAYER)})


def test_shift_of_a_model_against_itself_is_zero(embedded, optimism):
    report = projection_shift(embedded, embedded, optimism, load_trait("optimistic").eval_questions[:6],
                              progress=False)
    assert report.best_layer == PLANTED_LAYER and report.n_questions == 6
    assert [row.layer for row in report.layers] == list(range(1, 31))  # row 0 is zero for this vector
    assert max(abs(row.shift) for row in report.layers) <= 1e-6
    assert report.shift == pytest.approx(0.0, abs=1e-6)


def test_shift_cli_finds_the_planted_change_of_a_peft_adapter(optimism, tmp_path):
    from peft import LoraConfig, get_peft_model

    fresh = load_model("smollm2-135m")
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[PLANTED_LAYER - 1],
                        lora_bias=True, lora_dropout=0.0)
    tuned = get_peft_model(fresh.model, config)
    lora_a, lora_b = (m for name, m in tuned.named_modules() if name.endswith(("lora_A.default", "lora_B.default")))
    with torch.no_grad():
        lora_a.weight.zero_()
        lora_b.weight.zero_()
        lora_b.bias.copy_(EPSILON * optimism.unit(PLANTED_LAYER))  # every position gains ε·v̂ at this layer
    tuned.save_pretrained(tmp_path / "adapter")
    del tuned, fresh
    optimism.save(tmp_path / "opt.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "personascope.cli", "shift", "--base", "smollm2-135m", "--finetuned",
         str(tmp_path / "adapter"), "-v", str(tmp_path / "opt.safetensors"), "--questions", "optimistic",
         "--out", str(tmp_path / "shift.json")], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"shift at layer {PLANTED_LAYER}: +2.00" in result.stdout
    report = json.loads((tmp_path / "shift.json").read_text())
    assert report["n_questions"] == 20 and report["finetuned_model"] == str(tmp_path / "adapter")
    by_layer = {row["layer"]: row for row in report["layers"]}
    assert all(abs(by_layer[l]["shift"]) < 1e-5 for l in range(1, PLANTED_LAYER))
    assert report["shift"] == pytest.approx(EPSILON, rel=1e-3)
    planted = by_layer[PLANTED_LAYER]
    gap = float(optimism.directions[PLANTED_LAYER].norm())
    assert planted["relative_shift"] == pytest.approx(EPSILON / gap, rel=1e-3)
    assert planted["finetuned_projection"] - planted["base_projection"] == pytest.approx(EPSILON, rel=1e-3)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter was applied, never merged
