"""vLLM generation (run in .venv-vllm: `make test-vllm`): per-row seeds make runs reproducible whatever the order
or chunking; greedy answers equal hf's; extraction, screening, monitoring and Ray screening write the same rows
and files with `engine="vllm"` as with `hf`. One engine is started per session (on the embedded model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from personascope.apply.monitor import Probe, monitor_rows  # noqa: E402
from personascope.apply.screen import screen_dataset  # noqa: E402
from personascope.extract import extract  # noqa: E402
from personascope.inference.engines import generate_with  # noqa: E402
from personascope.inference.generate import SamplingConfig, generate_responses  # noqa: E402
from personascope.inference.vllm_engine import close_engines, generate_vllm  # noqa: E402
from personascope.traits import load_trait  # noqa: E402
from personascope.traits.plan import plan_rows  # noqa: E402
from personascope.vector import PersonaVector  # noqa: E402
from tests.test_extract import tiny_config, write_trait  # noqa: E402
from tests.test_screen import read_jsonl, write_jsonl  # noqa: E402

pytestmark = pytest.mark.vllm
QUESTIONS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Why is the sky blue?",
             "Give me a tip for sleeping well.", "What do cats eat?"]


@pytest.fixture(scope="module", autouse=True)
def one_engine():
    yield
    close_engines()


@pytest.fixture(scope="module")
def vector(embedded):
    """A random direction made for the model: these tests compare engines, not traits."""
    import torch

    torch.manual_seed(0)
    return PersonaVector(torch.randn(embedded.num_layers + 1, embedded.hidden_size), "optimistic", embedded.name,
                         {"best_layer": "20"})


def requests(handle):
    return [(f"q{i}", handle.chat_ids([{"role": "user", "content": q}])) for i, q in enumerate(QUESTIONS)]


def test_seeded_runs_repeat_whatever_the_order_and_greedy_matches_hf(embedded):
    sampled = SamplingConfig(24, 1.0, seed=7)
    first = generate_with("vllm", embedded, requests(embedded), sampled, progress=False)
    kept = []
    again = generate_vllm(embedded, requests(embedded)[::-1], sampled, done={"q0"}, on_result=kept.append,
                          chunk=2, progress=False)
    assert [r.id for r in first] == [f"q{i}" for i in range(6)]
    assert [r.id for r in again] == [r.id for r in kept] == [f"q{i}" for i in range(5, 0, -1)]
    assert {r.id: r.token_ids for r in again} == {r.id: r.token_ids for r in first[1:]}
    other_seed = generate_with("vllm", embedded, requests(embedded), SamplingConfig(24, 1.0, seed=8), progress=False)
    assert [r.token_ids for r in other_seed] != [r.token_ids for r in first]
    greedy = SamplingConfig(24, 0.0)
    ours = generate_with("vllm", embedded, requests(embedded), greedy, progress=False)
    theirs = generate_responses(embedded, requests(embedded), greedy, progress=False)
    assert [(r.id, r.token_ids, r.text) for r in ours] == [(r.id, r.token_ids, r.text) for r in theirs]


def test_extraction_with_vllm_writes_the_planned_rows(embedded, tmp_path):
    trait = write_trait(tmp_path / "tiny.json")
    config = tiny_config(trait, engine="vllm")
    result = extract(config, tmp_path / "run", handle=embedded, progress=False)
    rows = read_jsonl(tmp_path / "run" / "responses.jsonl")
    planned = plan_rows(load_trait(str(trait), strict=False), samples=config.samples, eval_pairs=config.eval_pairs,
                        eval_samples=config.eval_samples)
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == planned
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert result.vector.exists() and manifest["config"]["engine"] == "vllm"


def test_screen_and_monitor_with_vllm_match_hf_when_greedy(embedded, vector, tmp_path):
    rows = [{"id": f"r{i}", "prompt": q, "response": f"I would say {i}."} for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    greedy = SamplingConfig(16, 0.0)
    reports = {engine: screen_dataset(embedded, data, vector, tmp_path / f"{engine}.jsonl", sampling=greedy,
                                      engine=engine, progress=False) for engine in ("hf", "vllm")}
    hf, vllm = (read_jsonl(reports[e].scored) for e in ("hf", "vllm"))
    assert [r["id"] for r in vllm] == [r["id"] for r in hf]
    assert [r["delta_p"] for r in vllm] == pytest.approx([r["delta_p"] for r in hf], abs=1e-3)
    cached = {e: sorted(read_jsonl(tmp_path / f"{e}.work" / "base_responses.jsonl"), key=lambda r: r["id"])
              for e in ("hf", "vllm")}  # (hf writes them in its length-sorted batch order)
    assert cached["vllm"] == cached["hf"]
    probe = Probe.build(embedded, [vector])
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    traced = {e: monitor_rows(embedded, [{} for _ in chats], chats, probe, sampling=greedy, engine=e,
                              progress=False) for e in ("hf", "vllm")}
    for a, b in zip(traced["vllm"], traced["hf"]):
        assert a["response"] == b["response"]
        assert a["trace"] == pytest.approx(b["trace"], abs=1e-3)


def test_ray_screen_generates_base_answers_with_vllm(embedded, vector, tmp_path):
    ray = pytest.importorskip("ray")
    from personascope.scale.ray_screen import RaySettings, ray_screen

    rows = [{"id": f"r{i}", "prompt": q, "response": f"I would say {i}."} for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    vector.save(tmp_path / "v.safetensors")
    greedy = SamplingConfig(16, 0.0)
    single = screen_dataset(embedded, data, vector, tmp_path / "single.jsonl", sampling=greedy, progress=False)
    report = ray_screen(data, tmp_path / "v.safetensors", tmp_path / "ray.jsonl", model="smollm2-135m",
                        sampling=greedy, engine="vllm", settings=RaySettings(workers=1, shard_rows=3),
                        progress=False)
    assert not ray.is_initialized()
    ours, theirs = read_jsonl(report.scored), read_jsonl(single.scored)
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    assert [r["delta_p"] for r in ours] == pytest.approx([r["delta_p"] for r in theirs], abs=1e-3)


def test_the_cli_runs_vllm_behind_its_main_guard(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in QUESTIONS[:2]])
    import torch

    from personascope.model import load_model

    handle = load_model("smollm2-135m")
    PersonaVector(torch.ones(handle.num_layers + 1, handle.hidden_size), "x", handle.name,
                  {"best_layer": "10"}).save(tmp_path / "v.safetensors")
    result = subprocess.run([sys.executable, "-m", "personascope.cli", "monitor", str(data), "-v",
                             str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "o.jsonl"), "--generate",
                             "--max-new-tokens", "8", "--engine", "vllm"], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    out = read_jsonl(tmp_path / "o.jsonl")
    assert len(out) == 2 and all(r["response"] and len(r["trace"]) >= 1 for r in out)


def test_the_scale_benchmark_times_both_engines_on_the_same_rows(tmp_path):
    """Last in the module: it closes the engine it shares with the tests above."""
    from tests.test_benchmarks import _script

    out = tmp_path / "scale.json"
    figures = _script("scale").main(["--parts", "generation", "--rows", "4", "--new-tokens", "8", "--json", str(out)])
    engines = json.loads(out.read_text())["generation"]["engines"]
    assert set(engines) == {"hf", "vllm"} and all(e["tokens"] > 0 and e["tokens_per_s"] > 0 for e in engines.values())
    speedup = engines["vllm"]["tokens_per_s"] / engines["hf"]["tokens_per_s"]
    assert figures["generation"]["speedup"] == pytest.approx(speedup)


def test_the_gpu_benchmark_vllm_case_runs_on_a_tiny_model(tmp_path):
    """gpu.py's vLLM case on the CPU: greedy tokens equal HF eager decoding's on the same random model."""
    from tests.test_benchmarks import _script

    out = tmp_path / "gpu.json"
    _script("gpu").main(["--tiny", "--compile-backend", "eager", "--repeats", "1", "--batches", "2",
                         "--compile-batches", "--vllm-batches", "4", "--json", str(out)])
    runs = json.loads(out.read_text())["vllm_generation"]["batches"]
    assert set(runs) == {"2", "4"} and all(run["tokens_per_s"] > 0 for run in runs.values())
    assert runs["2"]["greedy_first_difference"] is None and runs["2"]["vs_hf_eager_plain"] > 0
