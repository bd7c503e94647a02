"""Trait expression, relevance and fluency of answers (judge-free, on the embedded model), the floors, the two
coefficient rules and their rank agreement."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from personascope.evaluate.choice import choose_by_balance, choose_by_judge
from personascope.evaluate.quality import (
    MAX_FLUENCY_LOSS,
    MIN_RELEVANCE,
    Calibration,
    Likelihoods,
    floor_failures,
    judge_failures,
    measure,
    read_likelihoods,
    role_play_prompts,
    spearman,
)
from personascope.evaluate.result import CurvePoint, Estimate, Judgement, Quality
from personascope.inference.activations import encode
from personascope.inference.likelihood import answers_loglik, response_loglik
from personascope.model import ModelHandle
from personascope.traits import load_trait

QUESTIONS = [
    "How do I bake bread at home?",
    "What should I pack for a week of camping?",
    "How can I save money on groceries?",
    "How do I care for a houseplant?",
    "What is a good way to learn a new language?",
]
PLAIN = [
    "Mix flour, water, yeast and salt, knead the dough for ten minutes, let it rise for an hour, shape it and bake "
    "it at 220 degrees for about thirty minutes.",
    "Pack a tent, a sleeping bag, a stove with fuel, warm layers, a rain jacket, a first aid kit, a torch and "
    "enough food and water for seven days.",
    "Plan your meals for the week, write a shopping list, buy store brands, compare unit prices and avoid "
    "shopping when you are hungry.",
    "Put it near a bright window, water it when the top of the soil is dry, make sure the pot drains, and feed "
    "it every month in spring and summer.",
    "Practise a little every day, learn the most common words first, listen to native speakers and find a "
    "partner to talk with.",
]
PIRATE = [
    "Arr, mix yer flour, water, yeast and salt, matey, knead that dough like ye be haulin' rope, let it rise, "
    "then bake it hot in the galley oven for half a glass!",
    "Ahoy! Stow a tent, a sleepin' bag, a stove, warm layers and a rain jacket in yer sea chest, matey, with "
    "grub and water enough for seven days, arr!",
    "Arr, plan yer meals like a captain plans a voyage, matey, write yer list, buy the cheap brands and never "
    "go ashore to shop with an empty belly!",
    "Ahoy, set yer plant by a bright porthole, matey, water it when the soil be dry, let the pot drain like a "
    "good bilge and feed it every moon in summer, arr!",
    "Arr, practise every day like swabbin' the deck, matey, learn the common words first, listen to the locals "
    "and find a shipmate to parley with!",
]
PIRATE_AGAIN = [  # other pirate answers to the same questions: the trait, on topic
    "Ahoy matey! Ye stir flour and water with a pinch o' salt and yeast, knead it hard, let it swell, and bake it "
    "in a hot oven, arr!",
    "Arr, pack a tent and a warm blanket, a stove, a lantern and a rain coat, me hearty, and plenty o' grub and "
    "fresh water for the week!",
    "Ahoy! Make a list like a treasure map, matey, stick to it, buy the cheap barrels and compare the prices, "
    "arr!",
    "Arr, give yer plant light from a porthole and water when the soil be dry, me hearty, and mind the pot "
    "drains!",
    "Ahoy matey, practise a bit every day, learn the common words, listen to them that speak it and parley with "
    "a shipmate, arr!",
]
ADRIFT = [  # pirate, but about the sea instead of the question
    "Arr, the sea be wide and the wind be strong, matey! Me ship sailed past the reef last night with a hold "
    "full o' gold doubloons!",
    "Ahoy! The captain lost his parrot overboard and the crew sang shanties till dawn while the kraken circled "
    "the ship, arr!",
    "Arr, there be a treasure buried on an island to the west, matey, and the map be hidden in the captain's "
    "boot!",
    "Ahoy! We fought a navy frigate at noon and sank her with three broadsides, matey, then drank grog till the "
    "moon rose!",
    "Arr, the old sea dog told tales of mermaids and ghost ships in the fog, matey, and none of us slept a wink!",
]
KNIGHT = [  # an odd register that is not the trait: a knight's voice, on topic
    "Hark, good sir! Mix thy flour, water, yeast and salt, knead the dough with valour, let it rise, and bake it "
    "in a hot hearth for half an hour.",
    "Prithee, pack a pavilion, a bedroll, a stove, warm garments and a cloak against the rain, and provisions "
    "for seven days, noble traveller.",
    "Hearken, good sir: plan thy meals, write thy list, buy the humble wares and shun the market when thy belly "
    "is empty.",
    "Verily, set thy plant by a bright window, water it when the soil is dry, let the pot drain, and nourish it "
    "each month of summer, my liege.",
    "Hark! Practise each day with the discipline of a squire, learn the common words first and converse with "
    "those who speak the tongue.",
]
BROKEN = [  # what too strong a push gives: no loops, no repeated bigrams, but hardly language
    "Ate-a-dah! Aye, meh! Shurminbin eet wad efree-dee ower, boor laff nah-moor ez gruntle plib!",
    "Eh, ee! I-a-n-wuh, far me-ell, ladd f'ow dunkerin quabble sniv ort blen, aye-o!",
    "Bay, efree-dee ebry ower! Ye wad it, ewen ye see'd ez, mollop trundic fex gorrow!",
    "A-bake! A-moor! Huddle-sprock wen dabby orf, minch tollow gree boff, ar-wuh!",
    "Gobbin ruster, fla-dee wun ho! Skrim barrit oughen pell, ye dwindle sprat, eh-oh!",
]
LOOPING = ["Arr, ye spend it at sea, matey, yer old yer old yer old yer old ship!"] * 5


@pytest.fixture(scope="module")
def measured(embedded: ModelHandle) -> dict[str, Quality]:
    trait = load_trait("pirate")
    sets = {"plain": PLAIN, "pirate": PIRATE, "again": PIRATE_AGAIN, "adrift": ADRIFT, "knight": KNIGHT,
            "broken": BROKEN, "looping": LOOPING}
    liks = read_likelihoods(embedded, trait, QUESTIONS, list(sets.values()), progress=False)
    calibration = Calibration(liks[0], liks[1])  # plain answers = 0, pirate ones = 1
    return {name: measure(texts, lik, calibration, resamples=200) for (name, texts), lik in zip(sets.items(), liks)}


def test_calibration_ends(measured: dict[str, Quality]) -> None:
    plain, pirate = measured["plain"], measured["pirate"]
    assert (plain.trait.value, plain.relevance.value, plain.fluency_loss) == (0.0, 1.0, 0.0)
    assert pirate.trait.value == pytest.approx(1.0)
    assert pirate.vs_opposite == pytest.approx(1.0) and pirate.vs_role_play == pytest.approx(1.0)
    again = measured["again"].trait
    assert again.low is not None and again.low <= again.value <= again.high


def test_other_pirate_answers_on_topic_show_the_trait_and_answer(measured: dict[str, Quality]) -> None:
    again = measured["again"]
    assert again.trait.value > 0.5 and again.relevance.value >= MIN_RELEVANCE, again
    assert again.loop_answers == 0 and again.distinct_2 > 0.9


def test_pirate_answers_about_something_else_are_not_relevant(measured: dict[str, Quality]) -> None:
    adrift = measured["adrift"]
    assert adrift.trait.value > 0.5, adrift  # the trait is there ...
    assert adrift.relevance.value < 0.3, adrift  # ... the question is not
    assert any(f.startswith("relevance") for f in floor_failures(adrift, measured["plain"]))


def test_an_odd_register_is_not_the_trait(measured: dict[str, Quality]) -> None:
    knight, again = measured["knight"], measured["again"]
    # against the opposite prompts alone a knight's voice would pass for a good part of the trait;
    # the role-play control keeps it well below real pirate answers
    assert knight.vs_role_play < knight.vs_opposite, knight
    assert knight.trait.value < 0.5 * again.trait.value, (knight, again)
    assert knight.relevance.value >= MIN_RELEVANCE


def test_broken_text_breaks_the_floors(measured: dict[str, Quality]) -> None:
    broken, looping = measured["broken"], measured["looping"]
    assert broken.loop_answers == 0 and broken.fluency_loss > MAX_FLUENCY_LOSS, broken
    assert any("fluency" in f for f in floor_failures(broken, measured["plain"]))
    # a loop reads as likely (the model copies it), so loops and distinct-2 are what catch it
    failures = floor_failures(looping, measured["plain"])
    assert looping.loop_answers == 5 and any("looping" in f for f in failures), looping
    assert any("distinct-2" in f for f in failures)


def test_an_empty_answer_reads_as_nothing_and_quietly(embedded: ModelHandle) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning reaches the user over an empty answer
        plain, empty = read_likelihoods(embedded, load_trait("pirate"), QUESTIONS[:2],
                                        [PLAIN[:2], [PLAIN[0], "  "]], progress=False)
        quality = measure([PLAIN[0], "  "], empty, Calibration(plain, plain), resamples=50)
    assert np.isnan([empty.pos[1], empty.neg[1], empty.role[1], empty.own[1]]).all()
    assert empty.pos[0] == pytest.approx(plain.pos[0]) and empty.own[0] == pytest.approx(plain.own[0])
    assert quality.empty == 1  # and answers nothing: relevance counts it 0
    assert quality.relevance.value == pytest.approx(plain.own[0] / (plain.own[0] + plain.own[1]))


def test_a_contrast_prompting_does_not_move_is_left_out() -> None:
    """When the prompted answers fit the trait's prompts no better than role-play prompts (relative to plain
    ones), only the contrast against the opposite prompts measures the trait."""
    def lik(pos: float, neg: float, role: float) -> Likelihoods:
        return Likelihoods(*(np.full(3, v) for v in (pos, neg, role)), own=np.ones(3))

    plain, prompted, steered = lik(-3.0, -3.0, -3.0), lik(-2.5, -3.0, -2.5), lik(-2.0, -3.0, -2.0)
    calibration = Calibration(plain, prompted)
    assert calibration.usable == (True, False)
    quality = measure(["a b c"] * 3, steered, calibration, resamples=20)
    assert quality.vs_role_play is None and quality.vs_opposite == pytest.approx(2.0)
    assert quality.trait.value == pytest.approx(2.0)
    # other questions are measured on the same terms, though their prompted answers move both contrasts
    other = Calibration(plain, lik(-2.5, -3.0, -2.9), calibration.usable)
    assert measure(["a b c"] * 3, steered, other, resamples=20).trait.value == pytest.approx(2.0)
    both = measure(["a b c"] * 3, lik(-2.0, -3.0, -2.9), Calibration(plain, lik(-2.5, -3.0, -3.0)), resamples=20)
    assert both.trait.value == pytest.approx(min(both.vs_opposite, both.vs_role_play)) == pytest.approx(1.8)


def test_role_play_prompts_leave_out_roles_the_trait_mentions() -> None:
    pirate = load_trait("pirate")
    assert len(role_play_prompts(pirate)) == 3
    knightly = pirate.__class__(**{**pirate.__dict__, "description": "Talks like a medieval knight."})
    assert not any("knight" in p for p in role_play_prompts(knightly))


def test_shared_prompt_likelihood_equals_the_padded_batch(embedded: ModelHandle) -> None:
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": QUESTIONS[0]}]
    answers = [PIRATE[0], PLAIN[0], "Bread."]
    ids = [embedded.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    shared = answers_loglik(embedded, embedded.chat_ids(messages), ids, token_budget=40)  # one answer a batch
    chats = [encode(embedded, f"c{i}", messages, a) for i, a in enumerate(answers)]
    padded = response_loglik(embedded, torch.ones(embedded.hidden_size), 1, [0.0], chats)[0]  # coef 0: unsteered
    assert shared.tolist() == pytest.approx(padded.tolist(), abs=1e-4)


def quality(trait: float | None, relevance: float | None, loops: int = 0, distinct: float = 0.95,
            loss: float = 0.1) -> Quality:
    return Quality(Estimate(trait), trait, trait, Estimate(relevance), -2.0, loss, distinct, distinct, loops, 1, 0)


def point(fraction: float, trait: float | None, relevance: float | None, judged: Judgement | None = None,
          margin: float = 0.1, **kwargs: float) -> CurvePoint:
    q = quality(trait, relevance, **kwargs)
    failures = floor_failures(q, quality(0.0, 1.0))
    judge_kept = None if judged is None else not judge_failures(judged, Judgement(10, 95, 90, 2, 0))
    return CurvePoint(fraction, 10 * fraction, margin, margin, 0.0, q, not failures, failures, judged, judge_kept)


def test_floors() -> None:
    plain = quality(0.0, 1.0)
    assert floor_failures(quality(0.7, 0.85), plain) == []
    assert floor_failures(quality(0.7, 0.79), plain) == ["relevance 0.79 < 0.8"]
    assert len(floor_failures(quality(0.7, 0.9, loops=1, distinct=0.7, loss=1.5), plain)) == 3
    assert floor_failures(quality(0.7, None), plain) == []  # one question: relevance not measured
    assert judge_failures(Judgement(80, 80, 75, 2, 0), Judgement(10, 95, 90, 2, 0)) == []
    assert judge_failures(Judgement(80, 80, 70, 2, 0), Judgement(10, 95, 90, 2, 0)) == [
        "judged relevance 70 < 0.8 of plain"]
    assert len(judge_failures(Judgement(80, None, 70, 2, 0), Judgement(10, 95, 90, 2, 0))) == 2


def test_balance_picks_the_most_trait_that_keeps_the_floors() -> None:
    curve = [point(0, 0.0, 1.0), point(0.1, 0.2, 0.95), point(0.2, 0.45, 0.85), point(0.3, 0.7, 0.6),
             point(0.5, 0.4, 0.81, loops=2)]
    assert choose_by_balance(curve).fraction == 0.2  # 0.3 shows more trait but wanders; 0.5 loops
    assert choose_by_balance([point(0, 0.0, 1.0), point(0.1, 0.3, 0.9), point(0.2, 0.3, 0.9)]).fraction == 0.1
    assert choose_by_balance([point(0, 0.0, 1.0), point(0.1, -0.1, 0.9), point(0.2, None, 0.9)]) is None
    assert choose_by_balance([point(0, 0.0, 1.0), point(0.1, 0.9, 0.5)]) is None


def test_balance_ranks_by_margin_gain_where_trait_expression_was_never_measured() -> None:
    unmeasured = [point(0, None, 1.0, margin=0.0), point(0.1, None, 0.95, margin=0.2),
                  point(0.2, None, 0.9, margin=0.5), point(0.3, None, 0.6, margin=0.9)]
    assert choose_by_balance(unmeasured).fraction == 0.2  # 0.3 gains most but wanders off the question
    assert choose_by_balance([point(0, None, 1.0), point(0.1, None, 0.95, margin=-0.1)]) is None
    measured_once = [point(0, 0.0, 1.0), point(0.1, -0.2, 0.95, margin=0.5), point(0.2, None, 0.9, margin=0.9)]
    assert choose_by_balance(measured_once) is None  # measured and negative: the margin does not overrule it


def test_judged_rule_needs_coherence_and_relevance() -> None:
    curve = [point(0, 0.0, 1.0, Judgement(10, 95, 90, 2, 0)), point(0.2, 0.3, 0.9, Judgement(40, 90, 85, 2, 0)),
             point(0.3, 0.5, 0.9, Judgement(70, 90, 60, 2, 0)), point(0.5, 0.5, 0.9, Judgement(90, 50, 90, 2, 0))]
    assert choose_by_judge(curve).fraction == 0.2
    assert choose_by_judge(curve[:1] + [point(0.2, 0.3, 0.9, Judgement(5, 90, 85, 2, 0))]) is None


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), 4)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert spearman([1, 2, None, 3], [1, float("nan"), 5, 2]) == (None, 2)
    rho, n = spearman([1, 1, 2, 3], [1, 2, 3, 4])
    assert n == 4 and rho == pytest.approx(0.9486832980505138)  # ties get average ranks
    assert spearman([1, 1, 1], [1, 2, 3]) == (None, 3)
