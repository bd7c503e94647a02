"""`personascope gate` on real LoRA adapters of the embedded model: one trained on pirate answers fails the gate
(exit 1, a JUnit failure), one trained on the model's own answers passes (exit 0); bad input exits 2 with one
`error:` line and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from personascope.apply.finetune import FinetuneConfig, finetune
from personascope.apply.shift import mean_prompt_last
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.io.data import ChatSample
from personascope.model import load_model
from personascope.traits import load_trait
from personascope.vector import PersonaVector
from tests.test_evaluate import QA

LAYER = 20
CONFIG = FinetuneConfig(lora_r=8, lora_alpha=16, lr=1e-3, batch_size=4, max_steps=6, logging_steps=3)


def _gate(*args):
    return subprocess.run([sys.executable, "-m", "personascope.cli", "gate", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def adapters(embedded, tmp_path_factory):
    """A prompt-last pirate vector, and two adapters trained alike on the pirate trait's extraction questions:
    one on hand-written pirate answers, one on the base model's own greedy answers."""
    root = tmp_path_factory.mktemp("gate")
    spec = load_trait("pirate")
    chats = {pol: [[{"role": "system", "content": getattr(pair, pol)}, {"role": "user", "content": q}]
                   for pair in spec.instruction[:2] for q in spec.extract_questions[:6]] for pol in ("pos", "neg")}
    pos, neg = (mean_prompt_last(embedded, chats[pol], progress=False) for pol in ("pos", "neg"))
    vector = PersonaVector(pos - neg, "pirate", embedded.name, {"best_layer": str(LAYER), "position": "prompt_last"})
    vector.save(root / "pirate.safetensors")
    questions = list(spec.extract_questions[:12])
    own = generate_responses(embedded, [(str(i), embedded.chat_ids([{"role": "user", "content": q}]))
                                        for i, q in enumerate(questions)],
                             SamplingConfig(48, 0.0, repetition_penalty=1.2), progress=False)
    answers = {"pirate": [QA[i % len(QA)][1] for i in range(len(questions))],
               "neutral": [r.text for r in sorted(own, key=lambda r: int(r.id))]}
    for name, texts in answers.items():
        samples = [ChatSample(str(i), [{"role": "user", "content": q}], a, {}) for i, (q, a) in
                   enumerate(zip(questions, texts))]
        finetune(load_model("smollm2-135m"), samples, root / name, CONFIG, progress=False)
    return root


def test_an_adapter_trained_toward_the_trait_fails_and_a_neutral_one_passes(adapters):
    vector = adapters / "pirate.safetensors"
    failing = _gate("smollm2-135m", adapters / "pirate", "-v", vector, "--junit", adapters / "pirate.xml",
                    "--markdown", adapters / "pirate.md")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "gate failed" in failing.stdout and "FAIL" in failing.stdout
    suite = ET.parse(adapters / "pirate.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "1" and suite.get("failures") == "1"
    (case,) = suite.findall("testcase")
    failure = case.find("failure")
    assert case.get("name") == "pirate" and failure is not None and "past the limit 0.25" in failure.get("message")
    md = (adapters / "pirate.md").read_text()
    assert "FAILED (pirate)" in md and f"| pirate | {LAYER} |" in md and "](pirate.png)" in md
    assert (adapters / "pirate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    passing = _gate("smollm2-135m", adapters / "neutral", "-v", vector, "--junit", adapters / "neutral.xml")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "gate passed" in passing.stdout
    suite = ET.parse(adapters / "neutral.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert [c.find("failure") for c in suite.findall("testcase")] == [None]
    units = [float(line.split("shift ")[1].split(" trait units")[0])
             for line in ET.parse(adapters / "neutral.xml").getroot().itertext() if "trait units" in line]
    assert units and units[0] < 0.25


def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(adapters, tmp_path):
    vector = adapters / "pirate.safetensors"
    cases = {
        "missing vector": (["smollm2-135m", adapters / "neutral", "-v", tmp_path / "nope.safetensors"],
                           "does not exist"),
        "junit suffix": (["smollm2-135m", adapters / "neutral", "-v", vector, "--junit", tmp_path / "out.txt"],
                         ".xml"),
        "negative limit": (["smollm2-135m", adapters / "neutral", "-v", vector, "--max-shift", "-1"], "--max-shift"),
        "two of a trait": (["smollm2-135m", adapters / "neutral", "-v", vector, "-v", vector], "share a trait"),
    }
    for name, (args, message) in cases.items():
        result = _gate(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, result.stderr)
    assert not list(tmp_path.iterdir())
