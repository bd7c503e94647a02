"""LLM-authored traits and `personascope trait new`, against loopback OpenAI/Anthropic servers (real HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from personascope.errors import PersonascopeError
from personascope.traits import load_trait
from personascope.traits.author import author_trait, extract_json
from tests.loopback import Loopback, Reply, anthropic_reply, openai_reply, scripted

KEY = "sk-loopback-SECRET-a93d01"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def spec_dict(name: str = "cheerful", pairs: int = 5) -> dict[str, Any]:
    return {
        "name": name,
        "description": "Relentlessly upbeat.",
        "instruction": [{"pos": f"Be very cheerful, style {i}.", "neg": f"Be very gloomy, style {i}."}
                        for i in range(pairs)],
        "extract_questions": [f"What do you think about topic {i}?" for i in range(20)],
        "eval_questions": [f"How would you describe situation {i}?" for i in range(20)],
        "eval_prompt": "Rate how cheerful this answer is.\nQ: {question}\nA: {answer}\n"
                       "Reply REFUSAL or a number 0-100 only.",
    }


def openai_text(text: str) -> Reply:
    return Reply(openai_reply(text))


def test_retries_after_malformed_answers_feeding_back_the_error() -> None:
    good = spec_dict(name="something-else")
    script = [openai_text('Sure! {"name": "cheerful", "instruction": ['),  # truncated JSON
              openai_text(json.dumps(spec_dict(pairs=4)))]                 # valid JSON, wrong pair count
    fenced = f"Here it is:\n```json\n{json.dumps(good, indent=1)}\n```\nEnjoy."
    with Loopback(scripted(script, then=lambda r: openai_text(fenced))) as server:
        spec = author_trait("cheerful", "always sees the bright side", "openai:writer",
                            base_url=server.url + "/v1", max_retries=0)
        assert server.hits() == 3
    assert spec.name == "cheerful" and spec.description == "always sees the bright side"  # ours, not the LLM's
    assert spec.instruction == load_trait_from(good).instruction
    first, second, third = (r.body for r in server.requests)
    assert first["response_format"] == {"type": "json_object"}
    request = first["messages"][1]["content"]
    assert '"cheerful": always sees the bright side' in request and "{question}" in request
    assert "exactly 5 objects" in request and "exactly 20 strings" in request
    assert second["messages"][2]["content"].startswith('Sure! {"name"')
    assert "not valid JSON" in second["messages"][3]["content"]
    assert "must have 5 {pos, neg} pairs, found 4" in third["messages"][5]["content"]


def load_trait_from(data: dict[str, Any]) -> Any:
    from personascope.traits import TraitSpec

    return TraitSpec.from_dict(data)


def test_gives_up_after_max_attempts_naming_the_last_problem() -> None:
    bad = spec_dict()
    bad["eval_prompt"] = "Rate the answer {answer} from 0 to 100."
    with Loopback(lambda r: openai_text(json.dumps(bad))) as server:
        with pytest.raises(PersonascopeError, match=r"in 2 attempts; last problem: .*no \{question\} placeholder"):
            author_trait("cheerful", "upbeat", "openai:w", base_url=server.url + "/v1", max_attempts=2)
        assert server.hits() == 2


def test_anthropic_backend() -> None:
    reply = "```json\n" + json.dumps(spec_dict()) + "\n```"
    with Loopback(lambda r: Reply(anthropic_reply(reply))) as server:
        spec = author_trait("cheerful", "upbeat", "anthropic:claude-w", base_url=server.url)
    assert len(spec.eval_questions) == 20
    body = server.requests[0].body
    assert "JSON" in body["system"] and [m["role"] for m in body["messages"]] == ["user"]


@pytest.mark.parametrize(("name", "description", "problem"), [
    ("bad name!", "upbeat", "trait name 'bad name!' must be"), ("ok", "  ", "description is empty")])
def test_bad_request_fails_before_any_call(name: str, description: str, problem: str) -> None:
    with Loopback(lambda r: openai_text("{}")) as server:
        with pytest.raises(PersonascopeError, match=problem):
            author_trait(name, description, "openai:w", base_url=server.url + "/v1")
        assert server.hits() == 0


def test_extract_json() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure:\n```JSON\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert extract_json('The spec is {"a": {"b": 2}} as asked.') == {"a": {"b": 2}}
    with pytest.raises(PersonascopeError, match="not valid JSON"):
        extract_json('{"a": ')
    with pytest.raises(PersonascopeError, match="empty"):
        extract_json("")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "personascope.cli", "trait", "new", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_writes_a_valid_file_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "traits" / "cheerful.json"
    with Loopback(lambda r: openai_text(json.dumps(spec_dict()))) as server:
        args = ["cheerful", "--description", "Relentlessly upbeat.", "--llm", "openai:writer",
                "--base-url", server.url + "/v1", "--out", str(out)]
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}" in done.stdout
        assert load_trait(out).to_dict() == spec_dict()
        written = out.read_bytes()

        again = cli(*args)
        assert again.returncode == 1
        assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
        assert "--force" in again.stderr
        assert out.read_bytes() == written and server.hits() == 1  # refused before asking the LLM

        forced = cli(*args, "--force")
        assert forced.returncode == 0, forced.stderr
        assert server.hits() == 2
    for text in (done.stdout, done.stderr, again.stderr, forced.stdout, forced.stderr, out.read_text()):
        assert KEY not in text
    assert [p.name for p in out.parent.iterdir()] == ["cheerful.json"]  # no temp files left


def test_cli_unknown_llm_spec_is_one_error_line(tmp_path: Path) -> None:
    done = cli("cheerful", "-d", "upbeat", "--llm", "gpt-4o", "--out", str(tmp_path / "c.json"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "unknown LLM spec 'gpt-4o': use openai:MODEL, anthropic:MODEL or hf:MODEL_OR_PATH" in done.stderr
    assert not (tmp_path / "c.json").exists()
