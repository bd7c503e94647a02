"""No request can harm another: sampling extremes beside ordinary requests, clients that leave, oversize bodies,
a full queue and a stopped worker, against a real `personascope serve` app on 127.0.0.1 (a tiny random model)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from personascope.model import load_model
from personascope.serve import BackgroundServer, Limits, Registry, create_app
from personascope.serve.decode import RowSampling, TextStream, next_tokens
from personascope.serve.jobs import Failed, Finished, GenerationJob
from personascope.vector import PersonaVector

LONG = 400  # tokens a long request asks for: seconds of decoding, so a client can leave in the middle


@pytest.fixture(scope="module")
def handle(tiny_chat):
    handle = load_model(str(tiny_chat))
    handle.name = "tiny"  # the name clients ask for
    return handle


@pytest.fixture(scope="module")
def live(handle, tmp_path_factory):
    torch.manual_seed(1)
    vector = PersonaVector(torch.randn(handle.num_layers + 1, handle.hidden_size), "noise", handle.name,
                           {"best_layer": "2"}).save(tmp_path_factory.mktemp("faults") / "noise.safetensors")
    app = create_app(handle, Registry.load(handle, {"noise": vector}),
                     limits=Limits(max_tokens=LONG, max_body_bytes=20_000), batch_wait=0.02)
    with BackgroundServer(app) as server:
        yield server, app


def _chat(content: str = "Tell me about the sea.", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def _post(url: str, body: dict | str, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=data, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def _metric(url: str, name: str, **labels: str) -> float:
    """A counter's value from /metrics (summed over the label values not given)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _wait_for(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


ORDINARY = _chat("What is the capital of France?", max_tokens=8, temperature=0)

#: (fields, status): each is sent beside an ordinary greedy request, whose answer must not change.
EXTREMES = [
    ({"seed": 2**64}, 400), ({"seed": -(2**63) - 1}, 400), ({"seed": 2**63 - 1, "temperature": 1}, 200),
    ({"seed": -(2**63), "temperature": 1}, 200),
    ({"temperature": 1e-38}, 400), ({"temperature": 0.001}, 400), ({"temperature": "NaN"}, 400),
    ({"temperature": "Infinity"}, 400), ({"temperature": -1}, 400), ({"temperature": 2.5}, 400),
    ({"temperature": 0.01, "seed": 3}, 200), ({"temperature": 2, "seed": 3}, 200),
    ({"top_p": 0}, 400), ({"top_p": 1.5}, 400), ({"top_p": "nan"}, 400), ({"top_p": 1e-300, "temperature": 1}, 200),
    ({"repetition_penalty": 0}, 400), ({"repetition_penalty": 1e-30}, 400), ({"repetition_penalty": 100}, 400),
    ({"repetition_penalty": 0.1, "temperature": 1}, 200), ({"repetition_penalty": 2}, 200),
    ({"frequency_penalty": 3}, 400), ({"presence_penalty": -2.5}, 400),
    ({"frequency_penalty": 2, "presence_penalty": -2, "temperature": 1}, 200),
    ({"frequency_penalty": -2, "presence_penalty": 2}, 200),
    ({"max_tokens": 0}, 400), ({"max_tokens": -5}, 400), ({"max_tokens": 10**12}, 400), ({"max_tokens": 1}, 200),
    ({"max_completion_tokens": "lots"}, 400),
    ({"logprobs": True}, 400), ({"logprobs": "junk"}, 400), ({"top_logprobs": 99}, 400), ({"logprobs": False}, 200),
    ({"n": 3}, 400), ({"stop": [""]}, 400), ({"stop": ["a"] * 10}, 400), ({"stop": ["e", "a", " "]}, 200),
    ({"persona": {"steer": [{"vector": "noise", "coef": "Infinity"}]}}, 400),
    ({"persona": {"steer": [{"vector": "noise", "coef": 1e308}]}}, 400),
    ({"persona": {"steer": [{"vector": "noise", "coef": 1000, "layer": 4, "scope": "all"}]}}, 200),
    ({"persona": {"steer": [{"vector": "noise", "coef": -1000, "layer": 0}], "monitor": True, "trace": True}}, 200),
]


def test_sampling_extremes_never_harm_an_ordinary_request(live) -> None:
    server, _ = live
    solo = _post(server.url, ORDINARY).json()["choices"][0]["message"]["content"]
    assert solo

    def pair(case):
        with ThreadPoolExecutor(2) as pool:
            odd = pool.submit(_post, server.url, _chat(**{"max_tokens": 6, **case[0]}))
            ordinary = pool.submit(_post, server.url, ORDINARY)
            return odd.result(), ordinary.result()

    with ThreadPoolExecutor(8) as pool:  # eight pairs at a time: extremes share batches with ordinary requests
        replies = list(pool.map(pair, EXTREMES))
    for case, (odd, ordinary) in zip(EXTREMES, replies):
        assert odd.status_code == case[1], (case, odd.text)
        if odd.status_code == 400:
            error = odd.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], (case, error)
        else:
            assert odd.json()["choices"][0]["finish_reason"] in ("stop", "length"), case
        assert ordinary.status_code == 200 and ordinary.json()["choices"][0]["message"]["content"] == solo, case
    health = httpx.get(server.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _post(server.url, ORDINARY).json()["choices"][0]["message"]["content"] == solo


def test_a_job_that_cannot_run_fails_alone_and_the_worker_goes_on(live) -> None:
    """Past the schema (a Python caller of the scheduler): a seed torch refuses fails that job only."""
    server, app = live
    handle = app.state.registry.handle
    events, done = [], threading.Event()

    def sink(event) -> None:
        events.append(event)
        if isinstance(event, Failed | Finished):
            done.set()

    bad = GenerationJob(handle.chat_ids([{"role": "user", "content": "hi"}]),
                        RowSampling(max_tokens=8, temperature=1.0, seed=2**64), sink)
    with ThreadPoolExecutor(1) as pool:
        ordinary = pool.submit(_post, server.url, ORDINARY)
        app.state.scheduler.submit(bad)
        assert ordinary.result().status_code == 200
    assert done.wait(20) and isinstance(events[-1], Failed) and "could not be run" in events[-1].message
    assert _post(server.url, ORDINARY).status_code == 200


def test_a_row_with_a_broken_distribution_fails_alone() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 1.0, 0.0], [float("inf"), 0.0, 0.0], [1.0, 2.0, 0.5]])
    greedy, warm = RowSampling(temperature=0), RowSampling(temperature=0.7, seed=1)
    settings = [warm, warm, greedy, greedy]
    chosen = next_tokens(logits, settings, [s.generator() for s in settings], [[], [], [], []])
    assert chosen[1] is None and chosen[2] is None and chosen[0] in (0, 1, 2) and chosen[3] == 1
    hot = RowSampling(temperature=1e-45, seed=1)  # what the schema now refuses: inf/inf → NaN probabilities
    assert next_tokens(logits[:1], [hot], [hot.generator()], [[]]) == [None]


def test_frequency_and_presence_penalties_push_seen_tokens_down() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5]])
    assert next_tokens(logits, [RowSampling(temperature=0)], [None], [[]], [[1]]) == [1]
    for config in (RowSampling(temperature=0, frequency_penalty=1.0), RowSampling(temperature=0, presence_penalty=1)):
        assert next_tokens(logits, [config], [None], [[]], [[1]]) == [2]
    assert next_tokens(logits, [RowSampling(temperature=0, frequency_penalty=0.3)], [None], [[]], [[1, 1]]) == [2]


class _Chars:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_the_earliest_stop_in_the_text_wins_whatever_the_list_order() -> None:
    stream = TextStream(_Chars(), ("world", "lo"))
    sent = "".join(stream.push(ord(c)) for c in "hello world")
    assert stream.stopped and sent == "hel"


def _tokens(url: str, reason: str) -> float:
    return _metric(url, "personascope_row_tokens_total", reason=reason)


def _rows(url: str, reason: str | None = None) -> float:
    return _metric(url, "personascope_rows_total", **({"reason": reason} if reason else {}))


def test_a_non_streamed_client_that_leaves_stops_costing_tokens(live) -> None:
    server, _ = live
    rows, spent = _rows(server.url, "cancelled"), _tokens(server.url, "cancelled")
    with pytest.raises(httpx.ReadTimeout):
        _post(server.url, _chat("Write a long story.", max_tokens=LONG, temperature=0), timeout=0.6)
    _wait_for(lambda: _rows(server.url, "cancelled") == rows + 1)
    wasted = _tokens(server.url, "cancelled") - spent
    # Ended after the hang-up, before its LONG tokens (0 if still queued); how soon depends on the machine's load.
    assert wasted < LONG, wasted
    all_tokens = _metric(server.url, "personascope_row_tokens_total")
    time.sleep(0.5)
    assert _metric(server.url, "personascope_row_tokens_total") == all_tokens  # nothing runs on


def test_a_streamed_client_that_leaves_stops_costing_tokens(live) -> None:
    server, _ = live
    rows, spent = _rows(server.url, "cancelled"), _tokens(server.url, "cancelled")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json=_chat("Write a long story.", max_tokens=LONG, temperature=0, stream=True)) as reply:
        lines = reply.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few chunks, then hang up
    _wait_for(lambda: _rows(server.url, "cancelled") == rows + 1)
    assert 0 < _tokens(server.url, "cancelled") - spent < LONG / 2


def test_an_oversize_chunked_body_is_refused_before_scheduling(live) -> None:
    server, _ = live
    rows, batches = _rows(server.url), _metric(server.url, "personascope_batch_size_count")
    body = json.dumps(_chat("hi", max_tokens=8)).encode() + b" " * 30_000  # valid JSON within the first bytes

    def chunks():
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    reply = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
    time.sleep(0.5)
    assert _rows(server.url) == rows and _metric(server.url, "personascope_batch_size_count") == batches
    small = httpx.post(server.url + "/v1/chat/completions", content=iter([json.dumps(ORDINARY).encode()]),
                       timeout=60, headers={"Content-Type": "application/json"})
    assert small.status_code == 200  # a chunked body within the limit is served


def test_a_full_queue_answers_503_and_a_dead_worker_is_restarted(handle, tmp_path) -> None:
    app = create_app(handle, Registry.load(handle, {}), limits=Limits(max_tokens=LONG, max_queue=1), max_batch=1)
    long = _chat("Write a long story.", max_tokens=LONG, temperature=0, stream=True)
    with BackgroundServer(app) as server, httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", server.url + "/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(lines).startswith("data: ")  # the first row runs
            with b.stream("POST", server.url + "/v1/chat/completions", json=long) as queued:
                assert queued.status_code == 200  # the second waits: the queue holds one
                refused = _post(server.url, ORDINARY)
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
                assert refused.json()["error"]["code"] == "server_busy"
        _wait_for(lambda: app.state.scheduler.waiting == 0)
        assert _post(server.url, ORDINARY).status_code == 200

        scheduler = app.state.scheduler
        held: list = []
        orphan = GenerationJob([1], RowSampling(max_tokens=1), held.append)
        scheduler._held = [orphan]  # as if the thread died in the middle of a batch holding this job
        scheduler._queue.put(None)  # the worker thread ends without stop(), as a crash would end it
        _wait_for(lambda: _metric(server.url, "personascope_worker_restarts_total") == 1)  # a new one started
        assert len(held) == 1 and isinstance(held[0], Failed)  # the job it held hears why, never hangs
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert _post(server.url, ORDINARY).status_code == 200

        scheduler.stop()  # stopped on purpose: unhealthy, not started again, and requests fail at once
        health = httpx.get(server.url + "/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        start = time.monotonic()
        assert _post(server.url, ORDINARY, timeout=10).status_code == 503 and time.monotonic() - start < 5
        time.sleep(1.5)  # past the watchdog's period: a stopped worker stays stopped
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 503
        scheduler.start()
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert _post(server.url, ORDINARY).status_code == 200


def test_an_idle_pooled_connection_outlives_the_clients_expiry(live) -> None:
    """httpx and the openai SDK reuse a pooled connection for up to 5 s idle: the server must not close it first,
    or a client reusing it at that moment reads "connection reset"."""
    server, _ = live
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    try:
        for wait in (0, 6):  # then longer than the client's keep-alive expiry
            time.sleep(wait)
            conn.request("GET", "/healthz")
            reply = conn.getresponse()  # RemoteDisconnected had the server closed the connection
            assert reply.status == 200 and json.loads(reply.read())["status"] == "ok"
            assert not reply.will_close
        assert conn.sock is not None  # the same connection served both
    finally:
        conn.close()
