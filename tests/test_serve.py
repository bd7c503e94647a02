"""`personascope serve` end to end: the real openai SDK against a live uvicorn server on 127.0.0.1, once per
engine: `hf` here, `vllm` in .venv-vllm (`make test-vllm`).

The pirate vector is the shared one of `tests/pirate.py` (built in seconds, best layer 13, coefficient 2.0).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.pirate import PIRATE_COEF, PIRATE_LAYER, pirate_words

pytestmark = pytest.mark.slow

KEY = "test-key-123"


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, embedded, pirate_vector_file):
    from personascope.serve import BackgroundServer, Limits, Registry, create_app

    if request.param == "vllm":
        pytest.importorskip("vllm")
    registry = Registry.load(embedded, {"pirate": pirate_vector_file})
    app = create_app(embedded, registry, api_key=KEY, limits=Limits(max_tokens=64, max_body_bytes=20_000,
                                                                      max_messages=8), batch_wait=0.02,
                     engine=request.param)
    try:
        with BackgroundServer(app, start_timeout=600) as live:
            yield live
    finally:
        if request.param == "vllm":
            from personascope.inference.vllm_engine import close_engines

            close_engines()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, question: str, *, system: str | None = None, max_tokens: int = 16, persona=None, **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    extra = {"persona": persona} if persona is not None else None
    return client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=max_tokens,
                                          temperature=kw.pop("temperature", 0.0), extra_body=extra, **kw)


def test_models_plain_and_stream(client) -> None:
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    plain = ask(client, "What is the capital of France?", max_tokens=12)
    assert plain.choices[0].message.content.strip()
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 0
    assert "persona" not in plain.to_dict()

    chunks = list(ask(client, "What is the capital of France?", max_tokens=12, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def _pirate_words(texts: list[str]) -> int:
    return sum(len(pirate_words(t)) for t in texts)


def test_steering_raises_pirate_words(client) -> None:
    questions = ["Describe a day at the beach.", "What is a good breakfast?", "How do I learn to code?"]
    steer = {"steer": [{"vector": "pirate", "coef": PIRATE_COEF}]}  # layer and scope: the vector's best, response
    with ThreadPoolExecutor(6) as pool:
        plain = list(pool.map(lambda q: ask(client, q, max_tokens=30), questions))
        steered = list(pool.map(lambda q: ask(client, q, max_tokens=30, persona=steer), questions))
    plain_texts = [r.choices[0].message.content for r in plain]
    steered_texts = [r.choices[0].message.content for r in steered]
    assert _pirate_words(steered_texts) >= _pirate_words(plain_texts) + 3, (plain_texts, steered_texts)


def test_monitoring_pirate_system_prompt(client) -> None:
    persona = {"monitor": ["pirate"]}
    pirate = ask(client, "Tell me about the sea.", system="You are a pirate. Talk like a pirate: arr, matey!",
                 persona=persona, max_tokens=8).to_dict()["persona"]["monitor"]["pirate"]
    plain = ask(client, "Tell me about the sea.", system="You are a helpful assistant.", persona=persona,
                max_tokens=8).to_dict()["persona"]["monitor"]["pirate"]
    assert pirate["prompt"] > plain["prompt"]
    assert isinstance(pirate["alert"], bool) and isinstance(pirate["response"], float)

    chunks = [c.to_dict() for c in ask(client, "Tell me about the sea.", max_tokens=10, stream=True,
                                       persona={"monitor": True, "trace": True})]
    assert set(chunks[0]["persona"]["prompt"]) == {"pirate"}
    traced = [c["persona"]["trace"]["pirate"] for c in chunks if "trace" in c.get("persona", {})]
    last = chunks[-1]["persona"]["monitor"]["pirate"]
    values = [v for part in traced for v in part]
    assert 1 <= len(values) <= 10
    assert last["response"] == pytest.approx(sum(values) / len(values), rel=1e-4, abs=1e-4)
    assert last["prompt"] == pytest.approx(chunks[0]["persona"]["prompt"]["pirate"])


def test_score_without_generating(server) -> None:
    def score(answer: str) -> dict:
        reply = httpx.post(server.url + "/v1/persona/score", headers={"Authorization": f"Bearer {KEY}"},
                           json={"messages": [{"role": "user", "content": "How was your trip?"},
                                              {"role": "assistant", "content": answer}]}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["monitor"]["pirate"]

    pirate = score("Arr matey, the seas be rough and me ship be full o' treasure, yo ho ho!")
    plain = score("It was pleasant. The train was on time and the hotel was comfortable.")
    assert pirate["response"] > plain["response"]
    assert pirate["prompt"] == pytest.approx(plain["prompt"], rel=1e-4)  # same prompt, same prompt projection
    assert pirate["alert"] and not plain["alert"]


def test_batch_answers_equal_solo_answers(client) -> None:
    greedy = [("What is 2+2?", 10), ("Name three colours.", 16), ("Why is the sky blue? Explain in detail please.", 12),
              ("Write a haiku about rain.", 14)]
    solo = [ask(client, q, max_tokens=n).choices[0].message.content for q, n in greedy]
    others = [dict(question=f"Tell me a fact about the number {i}.", max_tokens=8 + i, temperature=0.9, seed=i,
                   persona={"steer": [{"vector": "pirate", "coef": 1.0 + i / 4}], "monitor": True} if i % 2 else None)
              for i in range(12)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, client, q, max_tokens=n) for q, n in greedy]
        futures += [pool.submit(lambda o: ask(client, o.pop("question"), **o), dict(o)) for o in others]
        answers = [f.result() for f in futures]
    assert [a.choices[0].message.content for a in answers[:4]] == solo
    assert all(a.choices[0].message.content for a in answers[4:])


def test_auth(server) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.get(server.url + "/metrics", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "personascope_requests_total" in metrics and "personascope_persona_projection_bucket" in metrics


@pytest.mark.parametrize("body, status, fragment", [
    ('{"model": "smollm2-135m", "messages": [', 400, "JSON"),
    ({"model": "smollm2-135m"}, 400, "messages"),
    ({"model": "smollm2-135m", "messages": []}, 400, "at least one"),
    ({"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400,
     "max_tokens"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}] * 9}, 400, "too many messages"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
      "persona": {"steer": [{"vector": "/tmp/evil.safetensors", "coef": 2}]}}, 400, "unknown vector"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
      "persona": {"steer": [{"vector": "pirate", "coef": 2, "layer": 99}]}}, 400, "out of range"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "persona": {"monitor": ["nope"]}},
     400, "unknown vector"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "persona": {"steer": "pirate"}},
     400, "persona.steer"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "limit"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(server.url + "/v1/chat/completions", content=data, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment.lower() in error["message"].lower() and error["type"]


def test_unknown_route_and_server_keeps_serving(server, client) -> None:
    reply = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 404 and "error" in reply.json()
    assert ask(client, "Say hi.", max_tokens=4).choices[0].message.content


def _rows_cancelled(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    match = re.search(r'^personascope_rows_total\{reason="cancelled"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_disconnect_frees_the_row(server) -> None:
    before = _rows_cancelled(server)
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as reply:
        lines = reply.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while _rows_cancelled(server) < before + 1:
        assert time.monotonic() < deadline, "the abandoned row was not dropped"
        time.sleep(0.1)


def test_vectors_and_recent(server, client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    (entry,) = httpx.get(server.url + "/v1/persona/vectors", headers=auth).json()["data"]
    assert entry["name"] == "pirate" and entry["layer"] == PIRATE_LAYER and entry["best_coef"] == PIRATE_COEF
    assert entry["threshold_source"] == "class_means" and isinstance(entry["threshold"], float)
    assert entry["hidden_size"] == 576 and entry["auroc"] is None
    ask(client, "Ahoy?", max_tokens=4, persona={"monitor": True, "steer": [{"vector": "pirate", "coef": 1.5}]})
    recent = httpx.get(server.url + "/v1/persona/recent?limit=1", headers=auth).json()
    (last,) = recent["data"]
    assert last["messages"][-1]["content"] == "Ahoy?" and last["steer"][0]["layer"] == PIRATE_LAYER
    assert set(last["monitor"]["pirate"]) == {"prompt", "response", "alert"}
    assert all(any(v["alert"] for v in a["monitor"].values()) for a in recent["alerts"])


def test_load_200_requests_16_clients(client) -> None:
    def one(i: int) -> str:
        return ask(client, f"Count to {i % 7 + 1}.", max_tokens=3).choices[0].finish_reason

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(200)))
    assert len(reasons) == 200 and set(reasons) <= {"stop", "length"}
    assert time.monotonic() - start < 150
