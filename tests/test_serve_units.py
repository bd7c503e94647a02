"""The server's parts without a live server: text streaming with stops, sampling, alert thresholds, the CLI."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.extract.pipeline import alert_metadata
from personascope.model.loading import ModelHandle
from personascope.serve.decode import RowSampling, TextStream, next_tokens
from personascope.serve.registry import Registry, alert_threshold
from personascope.vector import PersonaVector


class CharTokenizer:
    """One token per character (ids are code points)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _push_all(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ord(c)) for c in text]


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    stream = TextStream(CharTokenizer(), ("END",))
    deltas = _push_all(stream, "abcENxyEND tail")
    assert "".join(deltas) == "abcENxy" and stream.stopped
    assert deltas[3:5] == ["", ""]  # "E", "EN" might start "END": held back until "x" rules it out
    assert stream.flush() == ""


def test_text_stream_flushes_a_held_tail_at_the_end() -> None:
    stream = TextStream(CharTokenizer(), ("END",))
    assert "".join(_push_all(stream, "abEN")) == "ab"
    assert stream.flush() == "EN" and not stream.stopped


def test_next_tokens_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9], [0.0, 0.0, 5.0]])
    greedy, warm, narrow = RowSampling(temperature=0), RowSampling(temperature=1.5, seed=7), \
        RowSampling(temperature=1.0, top_p=0.01, seed=1)
    first = next_tokens(logits, [greedy, warm, narrow], [None, warm.generator(), narrow.generator()], [[1], [], []])
    again = next_tokens(logits, [greedy, warm, narrow], [None, warm.generator(), narrow.generator()], [[1], [], []])
    assert first == again and first[0] == 1 and first[2] == 2  # top_p this small keeps only the most likely
    draws = {next_tokens(logits[1:2], [RowSampling(seed=s)], [RowSampling(seed=s).generator()], [[]])[0]
             for s in range(40)}
    assert draws == {0, 1, 2}


def test_repetition_penalty_steers_greedy_away_from_seen_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0], [-1.0, -3.0, -1.5]])
    plain, penalised = RowSampling(temperature=0), RowSampling(temperature=0, repetition_penalty=2.0)
    assert next_tokens(logits, [plain, plain], [None, None], [[1], [0]]) == [1, 0]  # no penalty: seen or not
    # 3.0 / 2 < 2.0 and -1.0 * 2 < -1.5: each row's seen token loses to the next best one
    assert next_tokens(logits, [penalised, penalised], [None, None], [[1], [0]]) == [2, 2]
    assert next_tokens(logits, [penalised], [None], [[0, 2]])[0] == 1


def _vector(meta: dict[str, str], means: bool = False) -> PersonaVector:
    torch.manual_seed(0)
    directions = torch.zeros(5, 64)
    directions[:, 0] = 2.0
    pos = torch.zeros(5, 64)
    pos[:, 0] = 7.0
    neg = torch.zeros(5, 64)
    neg[:, 0] = 3.0
    return PersonaVector(directions, "pirate", "tiny", {"best_layer": "2", **meta},
                         pos if means else None, neg if means else None)


def test_alert_threshold_rules() -> None:
    assert alert_threshold(_vector({"alert_threshold": "1.25"}, means=True), 2) == (1.25, "metadata")
    assert alert_threshold(_vector({}, means=True), 2) == (5.0, "class_means")  # midpoint of 7 and 3 on e0
    assert alert_threshold(_vector({}), 2) == (None, "none")
    with pytest.raises(PersonascopeError, match="non-numeric"):
        alert_threshold(_vector({"alert_threshold": "high"}), 2)


def test_extraction_writes_the_held_out_midpoint() -> None:
    from personascope.evaluate.result import (
        Baseline,
        Choice,
        Comparison,
        Estimate,
        EvalSettings,
        Evaluation,
        LayerEval,
        Projections,
        Quality,
        Validation,
    )

    def layer(index: int, auroc: float) -> LayerEval:
        return LayerEval(index, auroc, None, 0.1, 0.5, 1.0, 10.0, 2.0, True)

    validation = Validation("question", 0, ["q1"], ["q2"], 4, 4, None, None, None, 0)
    quality = Quality(Estimate(None), None, None, Estimate(None), None, None, 1.0, 1.0, 0, 1, 0)
    evaluation = Evaluation(
        trait="t", model="m", judge="none", best_layer=3, best_coef=1.0, best_fraction=0.5, coef_source="margin",
        rule="", notes=[], validation=validation, baseline=Baseline(0.0, 0.0, 0.0), layers=[layer(2, 0.7), layer(3, 0.95)],
        curve=[], prompted=quality, choice=Choice(None), comparison=Comparison([], quality, quality, quality),
        projections=Projections(3, [4.0, 6.0], [0.0, 2.0]), examples=[], counts={}, settings=EvalSettings(),
        timings={})
    assert alert_metadata(evaluation) == {"alert_threshold": "3", "auroc": "0.9500"}
    reported = dataclasses.replace(evaluation, validation=dataclasses.replace(validation, auroc=0.8))
    assert alert_metadata(reported)["auroc"] == "0.8000"  # the rows that did not choose the layer, when split
    elsewhere = dataclasses.replace(evaluation, projections=Projections(2, [4.0], [0.0]))
    assert "alert_threshold" not in alert_metadata(elsewhere)


def test_registry_overrides_and_refusals(tiny_llama, tmp_path) -> None:
    handle = ModelHandle(tiny_llama, None, "tiny")
    good = _vector({}, means=True).save(tmp_path / "good.safetensors")
    registry = Registry.load(handle, {"pirate": good, "pirate2": good}, {"pirate2": -1.0})
    assert registry.get("pirate").threshold == 5.0 and registry.get("pirate2").threshold == -1.0
    assert registry.probe.names == ("pirate", "pirate2")
    assert [e["threshold_source"] for e in registry.describe()] == ["class_means", "override"]
    with pytest.raises(PersonascopeError, match="unknown vectors: nope"):
        Registry.load(handle, {"pirate": good}, {"nope": 1.0})
    with pytest.raises(PersonascopeError, match="vector name"):
        Registry.load(handle, {"../x": good})
    bare = PersonaVector(torch.ones(5, 64), "x", "tiny").save(tmp_path / "bare.safetensors")
    with pytest.raises(PersonascopeError, match="no best_layer"):
        Registry.load(handle, {"x": bare})
    with pytest.raises(KeyError, match="registered vectors are pirate"):
        registry.get("evil")


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "personascope.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("args, needle, code", [
    (["--vector", "pirate.safetensors"], "NAME=FILE", 1),
    (["--threshold", "pirate=high"], "must be a number", 2),
    (["--vector", "a=x.safetensors", "--vector", "a=y.safetensors"], "given twice", 1),
])
def test_cli_refuses_bad_options_with_one_line(args, needle, code) -> None:
    proc = _cli(*args)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


@pytest.mark.slow
def test_cli_serves_with_the_key_from_the_environment(embedded) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PERSONASCOPE_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    proc = _cli("--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key"}).json()
        assert models["data"][0]["id"] == "smollm2-135m"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
