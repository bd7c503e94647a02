"""Coherence of steered text: the repetition measures, the strength rule, the default decoding, and the demo's
question answered at the chosen coefficient on the embedded model (pirate, no loop)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from personascope.evaluate.choice import choose_strength
from personascope.evaluate.coherence import LOOP_REPEATS, coherent, distinct_n, longest_loop, repetition, words
from personascope.evaluate.result import CurvePoint, EvalSettings
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
    assert longest_loop(["no", "no", "no"]) == 3 and longest_loop([]) == 0
    assert distinct_n(words(PLAIN), 2) == 1.0 and distinct_n(words(LOOPING), 2) < 0.7
    measured = repetition([LOOPING, PLAIN])
    assert (measured.loop_answers, measured.longest_loop) == (1, 4)


def test_coherence_criterion() -> None:
    plain = repetition([PLAIN, PLAIN])
    assert coherent(repetition([PLAIN, "Arr, ye spend it at sea, matey, huntin' treasure!"]), 1.0, plain)
    assert not coherent(repetition([PLAIN, LOOPING]), 0.5, plain)  # loops more than unsteered
    assert not coherent(plain, 3.0, plain)  # the unsteered model finds the text far less likely


def point(fraction: float, gain: float, ok: bool, trait: float | None = None) -> CurvePoint:
    return CurvePoint(fraction, 10 * fraction, gain, gain, 0.0, 1.0, 1.0, 0, 1, -1.0, 0.0, ok, trait)


def test_the_strongest_coherent_strength_with_a_gain_is_chosen() -> None:
    curve = [point(0, 0, True), point(0.25, 0.1, True), point(0.5, 0.3, True), point(1.0, 0.5, False),
             point(1.5, 0.6, True)]
    assert choose_strength(curve, judged=False).fraction == 0.5  # 1.5 passes but 1.0 before it broke
    assert choose_strength([point(0, 0, True), point(0.5, -0.1, True)], judged=False) is None
    judged = [point(0, 0, True, 10), point(0.5, 0.3, True, 60), point(1.0, 0.5, True, 60), point(1.5, 1, False, 90)]
    assert choose_strength(judged, judged=True).fraction == 0.5  # ties go to the weaker
    assert choose_strength([point(0, 0, True, 50), point(0.5, 0.3, True, 40)], judged=True) is None


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
    assert chosen.fraction > 0 and chosen.coherent and chosen.margin_gain > 0, result.curve
    vector = PersonaVector.load(run / "vectors" / "response_avg.safetensors", embedded)
    messages = [{"role": "user", "content": DEMO}]
    sampling = default_decoding(embedded, max_new_tokens=60)
    plain = stream_chat(embedded, messages, sampling, on_text=lambda _: None)
    with steer(embedded, vector, result.best_layer, result.best_coef):
        steered = stream_chat(embedded, messages, sampling, on_text=lambda _: None)
    assert longest_loop(words(steered)) < LOOP_REPEATS, steered
    # measured: 6.1% pirate words steered vs 2.1% plain (this small hand-written vector at a coherent strength)
    assert pirate_share(steered) > 2 * pirate_share(plain), (plain, steered)
