"""Chat clients against loopback servers speaking the OpenAI and Anthropic wire protocols (real HTTP)."""

from __future__ import annotations

import math
import socket
import time
import traceback

import pytest

from personascope.errors import PersonascopeError
from personascope.llm.clients import LLMRequestError, make_llm, merge_logprobs
from tests.loopback import Loopback, Reply, anthropic_reply, openai_reply, scripted

KEY = "sk-loopback-SECRET-7c1e0d9a5b"
USER = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def fast(server: Loopback, spec: str = "openai:m", **kw: float) -> object:
    base = server.url + "/v1" if spec.startswith("openai") else server.url
    return make_llm(spec, base_url=base, **{"timeout": 2.0, "max_retries": 3, "backoff": 0.01, **kw})


def assert_no_key(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert KEY not in text


def test_openai_complete_sends_the_wire_format() -> None:
    with Loopback(lambda r: Reply(openai_reply("hello"))) as server:
        llm = fast(server, "openai:my-model")
        assert server.hits() == 0  # nothing is contacted before the first request
        assert llm.complete(USER, max_tokens=7, temperature=0.3) == "hello"
        llm.complete(USER, max_tokens=7, json_mode=True)
    plain, json_mode = server.requests
    assert plain.path == "/v1/chat/completions"
    assert plain.headers["authorization"] == f"Bearer {KEY}"
    assert plain.body == {"model": "my-model", "messages": USER, "max_tokens": 7, "temperature": 0.3}
    assert json_mode.body["response_format"] == {"type": "json_object"}


def test_openai_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with Loopback(lambda r: Reply(openai_reply("env"))) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1/")
        monkeypatch.delenv("OPENAI_API_KEY")  # local servers need no key
        assert make_llm("openai:m", timeout=2).complete(USER, max_tokens=3) == "env"
    assert "authorization" not in server.requests[0].headers


def test_openai_top_logprobs() -> None:
    top = {"7": math.log(0.6), " 7": math.log(0.1), "8": math.log(0.2)}
    with Loopback(lambda r: Reply(openai_reply("7", top))) as server:
        assert fast(server).top_logprobs(USER) == pytest.approx(top)
    body = server.requests[0].body
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"], body["temperature"]) == (True, 20, 1, 0.0)


def test_openai_without_logprobs_gives_none() -> None:
    with Loopback(lambda r: Reply(openai_reply("7"))) as server:
        assert fast(server).top_logprobs(USER) is None


def test_merge_logprobs_adds_probabilities_of_repeated_tokens() -> None:
    merged = merge_logprobs([("5", math.log(0.2)), ("6", math.log(0.1)), ("5", math.log(0.3))])
    assert merged == pytest.approx({"5": math.log(0.5), "6": math.log(0.1)})


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_anthropic_messages(suffix: str) -> None:
    with Loopback(lambda r: Reply(anthropic_reply("bonjour"))) as server:
        llm = make_llm("anthropic:claude-x", base_url=server.url + suffix, timeout=2)
        messages = [{"role": "system", "content": "Be French."}, *USER]
        assert llm.complete(messages, max_tokens=5) == "bonjour"
        assert llm.top_logprobs(messages) is None
    (request,) = server.requests  # top_logprobs made no request
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"] == "2023-06-01"
    assert request.body == {"model": "claude-x", "max_tokens": 5, "temperature": 0.0, "messages": USER,
                            "system": "Be French."}


def test_retries_recover_from_500_429_and_malformed_json() -> None:
    script = [Reply("oops", status=500), Reply({"error": "slow down"}, status=429), Reply("{not json")]
    with Loopback(scripted(script, then=lambda r: Reply(openai_reply("finally")))) as server:
        assert fast(server).complete(USER, max_tokens=3) == "finally"
        assert server.hits() == 4


def test_retry_after_is_honoured() -> None:
    script = [Reply({"error": "rate"}, status=429, headers={"retry-after": "0.4"})]
    with Loopback(scripted(script, then=lambda r: Reply(openai_reply("ok")))) as server:
        start = time.monotonic()
        fast(server).complete(USER, max_tokens=3)
        assert time.monotonic() - start >= 0.4


def test_timeouts_are_retried_then_reported() -> None:
    with Loopback(lambda r: Reply(openai_reply("late"), delay=1.5)) as server:
        start = time.monotonic()
        with pytest.raises(LLMRequestError, match=r"failed after 2 attempts; last: timed out after 0.2 s"):
            fast(server, timeout=0.2, max_retries=1).complete(USER, max_tokens=3)
        assert time.monotonic() - start < 1.2
        assert server.hits() == 2


def test_connection_refused_is_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = make_llm("openai:m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff=0.01)
    with pytest.raises(LLMRequestError, match="connection failed"):
        llm.complete(USER, max_tokens=1)


def test_client_errors_are_not_retried_and_never_show_the_key() -> None:
    echo = {"error": {"message": f"context too long for key {KEY}"}}
    with Loopback(lambda r: Reply(echo, status=400)) as server:
        with pytest.raises(LLMRequestError, match="HTTP 400") as info:
            fast(server).complete(USER, max_tokens=3)
        assert server.hits() == 1
    assert "***" in str(info.value)
    assert_no_key(info.value)


@pytest.mark.parametrize("spec", ["openai:m", "anthropic:m"])
def test_rejected_credentials_name_the_variable_not_the_key(spec: str) -> None:
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    with Loopback(lambda r: Reply(body, status=401)) as server:
        with pytest.raises(PersonascopeError) as info:
            fast(server, spec).complete(USER, max_tokens=3)
        assert server.hits() == 1
    assert not isinstance(info.value, LLMRequestError)  # fatal, not a per-item failure
    assert ("OPENAI_API_KEY" if spec.startswith("openai") else "ANTHROPIC_API_KEY") in str(info.value)
    assert_no_key(info.value)
    assert KEY not in repr(fast(server, spec))


@pytest.mark.parametrize("spec", ["openai:gpt-4.1", "anthropic:claude-sonnet-4-5"])
def test_missing_key_for_the_public_api(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    env = "OPENAI_API_KEY" if spec.startswith("openai") else "ANTHROPIC_API_KEY"
    monkeypatch.delenv(env)
    with pytest.raises(PersonascopeError, match=f"{env} is not set"):
        make_llm(spec)


@pytest.mark.parametrize("spec", ["gpt-4", "foo:bar", "openai:", "openai:  ", ":m", "none"])
def test_unknown_spec_lists_the_valid_forms(spec: str) -> None:
    with pytest.raises(PersonascopeError, match="use openai:MODEL, anthropic:MODEL or hf:MODEL_OR_PATH"):
        make_llm(spec)


def test_model_names_may_contain_colons() -> None:
    with Loopback(lambda r: Reply(openai_reply("ok"))) as server:
        fast(server, "openai:llama3:8b").complete(USER, max_tokens=1)
    assert server.requests[0].body["model"] == "llama3:8b"


def test_hf_spec_rejects_a_base_url() -> None:
    with pytest.raises(PersonascopeError, match="--base-url applies to openai:/anthropic:"):
        make_llm("hf:some/model", base_url="http://127.0.0.1:1")

