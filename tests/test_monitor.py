"""Monitoring on the embedded model: prompt projections track graded system prompts, the generation trace equals
teacher-forced readings, and the CLI writes one column per vector without touching its input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from scipy.stats import spearmanr

from personascope.apply.monitor import GenerationTrace, Probe, prompt_projections
from personascope.apply.shift import mean_prompt_last
from personascope.hooks import HookManager
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.traits import load_trait
from personascope.vector import PersonaVector

LAYER = 24
# From trait-eliciting to trait-suppressing, in one sentence pattern so that only the grade changes.
STEPS = [
    "You are an extremely optimistic assistant. Always expect the best outcome.",
    "You are a somewhat optimistic assistant. Usually expect a good outcome.",
    "You are a neutral assistant. Expect neither good nor bad outcomes.",
    "You are a somewhat pessimistic assistant. Usually expect a bad outcome.",
    "You are an extremely pessimistic assistant. Always expect the worst outcome.",
]


@pytest.fixture(scope="module")
def optimism(embedded) -> PersonaVector:
    """A prompt-last mean-difference vector from the optimistic trait's pairs 1-4 on six extraction questions."""
    spec = load_trait("optimistic")
    questions = spec.extract_questions[:6]
    chats = {pol: [[{"role": "system", "content": getattr(pair, pol)}, {"role": "user", "content": q}]
                   for pair in spec.instruction[1:] for q in questions] for pol in ("pos", "neg")}
    pos, neg = (mean_prompt_last(embedded, chats[pol], progress=False) for pol in ("pos", "neg"))
    return PersonaVector(pos - neg, "optimistic", embedded.name, {"best_layer": str(LAYER), "position": "prompt_last"})


def test_prompt_projection_falls_as_system_prompts_turn_against_the_trait(embedded, optimism):
    questions = load_trait("optimistic").eval_questions[:10]
    chats = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s in STEPS for q in questions]
    probe = Probe.build(embedded, [optimism])
    values = prompt_projections(embedded, chats, probe, progress=False)[:, 0].view(len(STEPS), len(questions))
    steps = list(range(len(STEPS)))
    pooled = spearmanr([i for i in steps for _ in questions], values.flatten().numpy()).statistic
    within = sum(spearmanr(steps, values[:, j].numpy()).statistic for j in range(len(questions))) / len(questions)
    means = values.mean(1)
    print(f"Spearman rho: pooled {pooled:.3f}, mean within a question {within:.3f}; "
          f"mean projection per step {[round(float(m), 2) for m in means]}")
    assert within < -0.6 and pooled < -0.4
    assert means[0] > means[-1]


def test_trace_equals_teacher_forced_readings_under_left_padding(embedded, optimism):
    pessimism = PersonaVector(-optimism.directions, "pessimistic", embedded.name, {"best_layer": "30"})
    probe = Probe.build(embedded, [optimism, pessimism])
    assert probe.read_layers == (LAYER, 30) and probe.names == ("optimistic", "pessimistic")
    chats = [[{"role": "user", "content": "Will tomorrow be a good day?"}],
             [{"role": "system", "content": "You are a gloomy pessimist."},
              {"role": "user", "content": "My exam is next week and I have not studied much. How will it go?"}]]

    requests = [(str(i), embedded.chat_ids(c)) for i, c in enumerate(chats)]
    results = generate_responses(embedded, requests, SamplingConfig(6, 0.0), progress=False,
                                 monitor=GenerationTrace(embedded, probe))
    assert not HookManager.of(embedded)._ops  # the trace's operations are gone
    before = prompt_projections(embedded, chats, probe, progress=False)
    for (_, prompt), result in zip(requests, results):
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            states = embedded.model(ids, output_hidden_states=True).hidden_states
        start = len(prompt) - 1
        expected = torch.stack([optimism.project(states[LAYER][0], LAYER), pessimism.project(states[30][0], 30)], -1)
        assert result.trace is not None and result.trace.shape == (len(result.token_ids), 2)
        torch.testing.assert_close(result.trace, expected[start: start + len(result.token_ids)], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(result.trace[0], before[int(result.id)], atol=2e-3, rtol=1e-3)


def test_monitor_cli_writes_one_column_per_vector_and_keeps_fields(embedded, optimism, tmp_path):
    optimism.save(tmp_path / "opt.safetensors")
    PersonaVector(-optimism.directions, "pessimistic", embedded.name, {"best_layer": "20"}).save(
        tmp_path / "pes.safetensors")
    rows = [{"id": "a", "topic": "exams", "messages": [{"role": "system", "content": "You are a joyful optimist."},
                                                       {"role": "user", "content": "How will my exam go?"}]},
            {"id": "b", "topic": "weather", "messages": [{"role": "user", "content": "Will it rain?"},
                                                         {"role": "assistant", "content": "Probably."}]}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    original = data.read_bytes()
    run = [sys.executable, "-m", "personascope.cli", "monitor", str(data), "-v", str(tmp_path / "opt.safetensors"),
           "-v", str(tmp_path / "pes.safetensors")]
    refused = subprocess.run([*run, "--out", str(data)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "over the input" in refused.stderr and data.read_bytes() == original
    done = subprocess.run([*run, "--out", str(tmp_path / "scores.jsonl"), "--generate", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "optimistic" in done.stdout and "pessimistic" in done.stdout and "wrote 2 rows" in done.stdout
    out = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", "b"] and [r["topic"] for r in out] == ["exams", "weather"]
    assert out[1]["messages"] == rows[1]["messages"]
    chats = [rows[0]["messages"], rows[1]["messages"][:1]]  # a final assistant turn is not part of the prompt
    at_best = prompt_projections(embedded, chats, Probe.build(embedded, [optimism]), progress=False)[:, 0]
    at_20 = prompt_projections(embedded, chats, Probe.build(embedded, [optimism], 20), progress=False)[:, 0]
    for i, row in enumerate(out):
        assert set(row) >= {"projection_optimistic", "projection_pessimistic", "response", "trace_optimistic"}
        assert row["projection_optimistic"] == pytest.approx(float(at_best[i]), abs=2e-3)
        assert row["projection_pessimistic"] == pytest.approx(-float(at_20[i]), abs=2e-3)
        assert len(row["trace_optimistic"]) == len(row["trace_pessimistic"]) >= 1
        assert row["trace_optimistic"][0] == pytest.approx(row["projection_optimistic"], abs=2e-3)
