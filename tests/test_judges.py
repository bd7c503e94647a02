"""Judges against loopback servers (real HTTP), the SQLite cache, and a tiny local hf: judge."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.judge.judges import (
    COHERENCE_RUBRIC,
    RELEVANCE_RUBRIC,
    Judge,
    JudgeResult,
    aggregate_logprobs,
    judge_coherence,
    judge_relevance,
    judge_trait,
    make_judge,
    parse_score_text,
)
from personascope.traits import TraitSpec
from tests.loopback import (
    Loopback,
    Reply,
    Request,
    anthropic_reply,
    logprobs_from_probs,
    openai_reply,
)

KEY = "sk-loopback-SECRET-4f2b9e"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def judge_for(server: Loopback, spec: str = "openai:judge", **kw: object) -> Judge:
    base = server.url + "/v1" if spec.startswith("openai") else server.url
    judge = make_judge(spec, base_url=base, **{"timeout": 2.0, "max_retries": 2, "backoff": 0.01, **kw})
    assert judge is not None
    return judge


def answer(probs: dict[str, float]) -> Reply:
    return Reply(openai_reply(max(probs, key=probs.__getitem__), logprobs_from_probs(probs)))


def test_logprob_aggregation_matches_a_hand_computation() -> None:
    probs = {"80": 0.40, " 90": 0.20, "100": 0.10, "Sure": 0.15, "150": 0.05, "7.5": 0.04, "-3": 0.03}
    # integers 0..100 only: 80 (0.40), " 90" (0.20), 100 (0.10) -> (32 + 18 + 10) / 0.70
    with Loopback(lambda r: answer(probs)) as server:
        (result,) = judge_for(server).score_many(["Rate this."], progress=False)
    assert result == JudgeResult(pytest.approx(60 / 0.70, abs=1e-9))
    body = server.requests[0].body
    assert body["messages"] == [{"role": "user", "content": "Rate this."}]
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)


def test_too_little_numeric_probability_gives_no_score() -> None:
    probs = {"I": 0.6, "REF": 0.16, "40": 0.24}  # numeric mass 0.24 < 0.25, as the reference
    assert aggregate_logprobs(logprobs_from_probs(probs)) is None
    with Loopback(lambda r: answer(probs)) as server:
        assert judge_for(server).score_many(["x"], progress=False) == [JudgeResult(None)]


def test_text_fallback_when_the_server_omits_logprobs() -> None:
    with Loopback(lambda r: Reply(openai_reply("Score: 73/100"))) as server:
        results = judge_for(server).score_many([f"item {i}" for i in range(5)], progress=False, )
        assert [r.score for r in results] == [73.0] * 5
        assert server.hits() == 6  # one logprob request found none; then text replies only
    assert sum(r.body.get("logprobs") is True for r in server.requests) == 1


def test_text_parsing() -> None:
    assert parse_score_text(" 42") == 42.0
    assert parse_score_text("REFUSAL") is None
    assert parse_score_text("refusal, 30") is None
    assert parse_score_text("I'd say 85.5 out of 100") == 85.5
    for bad in ("", "no idea", "150"):
        with pytest.raises(PersonascopeError, match="no score between 0 and 100"):
            parse_score_text(bad)


def test_anthropic_judge_reads_the_text() -> None:
    replies = {"a": "42", "b": "REFUSAL", "c": "I cannot rate that."}
    with Loopback(lambda r: Reply(anthropic_reply(replies[r.prompt]))) as server:
        results = judge_for(server, "anthropic:claude-judge").score_many(list(replies), progress=False)
    assert [r.score for r in results] == [42.0, None, None]
    assert results[0].error is None and results[1].error is None
    assert "no score between 0 and 100" in results[2].error
    assert server.hits() == 3


def flaky(request_counts: dict[str, int]):
    """Items by index modulo 20: 0 always 500, 1 always hangs, 2-3 one 500 then fine, 4 one hang then fine."""

    def handle(request: Request) -> Reply:
        index = int(re.match(r"item (\d+)", request.prompt).group(1))
        attempt = request_counts[request.prompt] = request_counts.get(request.prompt, 0) + 1
        kind = index % 20
        ok = answer({str(index % 101): 0.9, "x": 0.1})
        if kind == 0 or (kind in (2, 3) and attempt == 1):
            return Reply({"error": "internal"}, status=500)
        if kind == 1 or (kind == 4 and attempt == 1):
            return Reply(ok.body, delay=2.0)
        return ok

    return handle


def test_a_run_with_30_percent_failing_calls_completes_with_failures_recorded() -> None:
    counts: dict[str, int] = {}
    prompts = [f"item {i}: rate it" for i in range(40)]
    with Loopback(flaky(counts)) as server:
        results = judge_for(server, timeout=0.5, max_retries=1, concurrency=8).score_many(prompts)
    failed_calls = sum(2 if i % 20 in (0, 1) else 1 for i in range(40) if i % 20 in (0, 1, 2, 3, 4))
    assert failed_calls / server.hits() == pytest.approx(14 / 50)
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        kind = i % 20
        if kind == 0:
            assert result.score is None and "HTTP 500" in result.error, result
        elif kind == 1:
            assert result.score is None and "timed out after 0.5 s" in result.error, result
        else:
            assert result == JudgeResult(pytest.approx(i % 101, abs=1e-9)), result
            assert counts[prompt] == (2 if kind in (2, 3, 4) else 1)  # retried once, recovered


def test_cached_scores_are_not_requested_again(tmp_path: Path) -> None:
    cache = tmp_path / "judge.sqlite"
    fail = {"p3"}
    with Loopback(lambda r: Reply("", status=500) if r.prompt in fail else answer({"60": 1.0})) as server:
        first = judge_for(server, cache_path=cache, max_retries=0).score_many(["p1", "p2", "p3", "p1"],
                                                                               progress=False)
        assert [r.score for r in first] == [60.0, 60.0, None, 60.0] and first[2].error
        assert not any(r.cached for r in first)
        assert server.hits() == 3  # the duplicate p1 was requested once

        fail.clear()
        again = judge_for(server, cache_path=cache).score_many(["p1", "p2", "p3", "p4"], progress=False)
        assert [r.cached for r in again] == [True, True, False, False]  # failures are not cached
        assert [r.score for r in again] == [60.0] * 4
        assert (server.hits("p1"), server.hits("p2"), server.hits("p3"), server.hits("p4")) == (1, 1, 2, 1)

        other = judge_for(server, "openai:another-judge", cache_path=cache).score_many(["p1"], progress=False)
        assert not other[0].cached and server.hits("p1") == 2  # the cache is keyed by judge
    assert KEY.encode() not in cache.read_bytes()


def test_a_damaged_cache_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "cache.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(PersonascopeError, match="not a usable SQLite file"):
        make_judge("openai:j", base_url="http://127.0.0.1:9/v1", cache_path=bad)


@pytest.mark.parametrize("spec", ["gpt-4o", "judge:x", "openai", "hf:", "None"])
def test_unknown_judge_spec(spec: str) -> None:
    with pytest.raises(PersonascopeError, match=r"unknown judge spec .*anthropic:MODEL or hf:MODEL_OR_PATH, or none"):
        make_judge(spec)


def test_none_judge() -> None:
    assert make_judge("none") is None


def test_rejected_credentials_stop_the_run_without_showing_the_key() -> None:
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    with Loopback(lambda r: Reply(body, status=401)) as server:
        with pytest.raises(PersonascopeError, match="check OPENAI_API_KEY") as info:
            judge_for(server, concurrency=2).score_many([f"q{i}" for i in range(50)], progress=False)
        assert server.hits() < 50  # the remaining items were cancelled
    assert KEY not in "".join(traceback.format_exception(info.value))


def test_trait_coherence_and_relevance_rubrics_reach_the_judge() -> None:
    trait = TraitSpec.from_dict({
        "name": "cheerful", "description": "Relentlessly upbeat.",
        "instruction": [{"pos": "Be cheerful.", "neg": "Be gloomy."}],
        "extract_questions": ["How is the weather?"], "eval_questions": ["How was your day?"],
        "eval_prompt": "How cheerful is this? Q: {question} A: {answer} Reply 0-100.",
    }, strict=False)
    pairs = [("How was your day?", "Wonderful {really}!")]
    with Loopback(lambda r: answer({"88": 1.0})) as server:
        judge = judge_for(server)
        assert judge_trait(judge, trait, pairs, progress=False)[0].score == 88.0
        assert judge_coherence(judge, pairs, progress=False)[0].score == 88.0
        assert judge_relevance(judge, pairs, progress=False)[0].score == 88.0
    trait_prompt, coherence_prompt, relevance_prompt = (r.prompt for r in server.requests)
    assert trait_prompt == "How cheerful is this? Q: How was your day? A: Wonderful {really}! Reply 0-100."
    assert coherence_prompt == COHERENCE_RUBRIC.format(question=pairs[0][0], answer=pairs[0][1])
    assert "[ANSWER START]\nWonderful {really}!\n[ANSWER END]" in coherence_prompt
    assert relevance_prompt == RELEVANCE_RUBRIC.format(question=pairs[0][0], answer=pairs[0][1])
    assert "for relevance only" in relevance_prompt and "How was your day?" in relevance_prompt


def test_progress_bar_shows_failures(capsys: pytest.CaptureFixture[str]) -> None:
    with Loopback(lambda r: Reply("", status=500) if r.prompt == "bad" else answer({"5": 1.0})) as server:
        judge_for(server, max_retries=0).score_many(["good", "bad"], progress=True)
    err = capsys.readouterr().err
    assert "judging with openai:judge" in err and "1 failed" in err and "2/2" in err


@pytest.fixture(scope="module")
def tiny_hf_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama with the embedded model's tokenizer, biased to answer with digits."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from personascope.model.loading import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer)))
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    with torch.no_grad():  # favour digit tokens so the numeric mass clears the 0.25 cut-off
        model.lm_head.weight.mul_(0.1)
        model.lm_head.weight[digits] = torch.randn(10, 64) * 2.5
    path = tmp_path_factory.mktemp("hf-judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_judge_scores_from_the_next_token_distribution(tiny_hf_judge: Path) -> None:
    import torch

    from personascope.model import load_model

    judge = make_judge(f"hf:{tiny_hf_judge}")
    prompts = ["How coherent is: 'the cat sat'?", "Rate: 'banana telephone'"]
    results = judge.score_many(prompts, progress=False)
    handle = load_model(str(tiny_hf_judge))
    for prompt, result in zip(prompts, results):
        messages = [{"role": "user", "content": prompt}]
        top = judge.llm.top_logprobs(messages)
        assert len(top) <= 20 and all(v <= 0 for v in top.values())
        with torch.inference_mode():  # the hand computation, from the model's own logits
            logits = handle.model(torch.tensor([handle.chat_ids(messages)])).logits[0, -1]
        probs = torch.softmax(logits.float(), -1)
        values, ids = probs.topk(20)
        numeric = [(int(t), p) for t, p in ((handle.tokenizer.decode([i]).strip(), p)
                                           for i, p in zip(ids.tolist(), values.tolist()))
                   if t.isdigit() and int(t) <= 100]
        mass = sum(p for _, p in numeric)
        assert mass >= 0.25
        assert result.error is None
        assert result.score == pytest.approx(sum(v * p for v, p in numeric) / mass, rel=1e-4)
        assert result.score == aggregate_logprobs(top)  # the API path's aggregation, shared
