"""Coherence of steered text: the repetition measures, the default decoding, and the demo's question answered at
the chosen coefficient on the embedded model (pirate, no loop)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from personascope.evaluate.coherence import LOOP_REPEATS, distinct_n, longest_loop, repetition, words
from personascope.evaluate.result import EvalSettings
from personascope.evaluate.search import evaluate_run
from personascope.hooks import steer
from personascope.inference.generate import DEFAULT_REPETITION_PENALTY, default_decoding, stream_chat
from personascope.model import ModelHandle
from personascope.vector import PersonaVector
from tests.test_evaluate import build_run, tiny_handle

LOOPING = ("A Sunday mornin''s a day o' makin' sailin' the yer old ship, matey! Ye can't just sailin' the yer old "
           "yer old yer old yer old")
PLAIN = "The best way to spend a Sunday morning is to relax, read a book and take a walk in the park."
PIRATE_WORDS = {"arr", "matey", "ye", "ahoy", "ship", "sea", "treasure", "captain", "aye", "yer", "me", "hearty",
                "be", "o'", "sail", "pirate", "plunder", "grog", "deck", "scallywag", "landlubber", "yo", "ho"}
DEMO = "What is the best way to spend a Sunday morning?"


def test_the_issue_answer_loops_and_a_plain_one_does_not() -> None:
    assert longest_loop(words(LOOPING)) == 4 >= LOOP_REPEATS
    assert longest_loop(words(PLAIN)) == 1
    assert longest_loop(["no", "no", "no"]) == 1 and longest_loop(["no"] * 6) == 6 and longest_loop([]) == 0
    assert longest_loop(words("Aye-aye! Aye-a-day. The lighthouses of the world")) == 1  # the trait's idiom
    assert distinct_n(words(PLAIN), 2) == 1.0 and distinct_n(words(LOOPING), 2) < 0.7
    measured = repetition([LOOPING, PLAIN])
    assert (measured.loop_answers, measured.longest_loop) == (1, 4)


def test_default_decoding(embedded: ModelHandle) -> None:
    plain = default_decoding(embedded, max_new_tokens=7)
    assert (plain.temperature, plain.repetition_penalty, plain.max_new_tokens) == (0.0, DEFAULT_REPETITION_PENALTY, 7)
    kwargs = plain.generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["repetition_penalty"] == DEFAULT_REPETITION_PENALTY
    assert replace(plain, repetition_penalty=1.0).generate_kwargs()["repetition_penalty"] == 1.0  # pure greedy
    tiny = tiny_handle(embedded, layers=2)
    tiny.model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.05)
    sampled = default_decoding(tiny)
    assert (sampled.temperature, sampled.top_p, sampled.repetition_penalty) == (0.6, 0.9, 1.05)


def pirate_share(text: str) -> float:
    tokens = words(text)
    return sum(t in PIRATE_WORDS for t in tokens) / max(1, len(tokens))


def test_demo_answer_at_the_chosen_coefficient_is_pirate_and_does_not_loop(
    embedded: ModelHandle, tmp_path: Path
) -> None:
    """The hand-written pirate vector of test_evaluate, evaluated with the default curve at layer 12: the demo's
    question answered as `personascope generate` does (default decoding, 60 tokens) at the chosen coefficient."""
    run = build_run(tmp_path, embedded)
    result = evaluate_run(run, embedded, layers=[12], progress=False,
                          settings=EvalSettings(curve_questions=3, curve_max_new_tokens=40, bootstrap=100))
    chosen = next(p for p in result.curve if p.fraction == result.best_fraction)
    assert chosen.fraction > 0 and chosen.kept and chosen.quality.trait.value > 0, result.curve
    vector = PersonaVector.load(run / "vectors" / "response_avg.safetensors", embedded)
    messages = [{"role": "user", "content": DEMO}]
    sampling = default_decoding(embedded, max_new_tokens=60)
    plain = stream_chat(embedded, messages, sampling, on_text=lambda _: None)
    with steer(embedded, vector, result.best_layer, result.best_coef):
        steered = stream_chat(embedded, messages, sampling, on_text=lambda _: None)
    assert longest_loop(words(steered)) < LOOP_REPEATS, steered
    # measured: 6.1% pirate words steered vs 2.1% plain (this small hand-written vector at a coherent strength)
    assert pirate_share(steered) > 2 * pirate_share(plain), (plain, steered)
