"""Validation on a small real run directory: hand-written pirate vs formal answers, a vector read from their
activations on the embedded model, judge-free AUROC and likelihood margin, a judged steering curve against a
loopback OpenAI server, and the `personascope evaluate` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from personascope.evaluate.choice import bootstrap_auroc, split_by_question
from personascope.evaluate.result import EvalSettings, Evaluation, Judgement
from personascope.evaluate.search import WEAK_AUROC, evaluate_run, evaluate_vector
from personascope.evaluate.separation import plain_chats, read_eval_rows, separation
from personascope.inference.activations import encode, read_activations
from personascope.inference.likelihood import likelihood_margin
from personascope.io.files import write_json
from personascope.io.records import RecordLog
from personascope.judge.judges import COHERENCE_RUBRIC, RELEVANCE_RUBRIC, make_judge
from personascope.model import ModelHandle
from personascope.traits import InstructionPair, TraitSpec, save_trait
from personascope.vector import PersonaVector
from tests.loopback import Loopback, Reply, Request, openai_reply

PIRATE = "You are a pirate captain. Always talk like a pirate."
FORMAL = "You are a formal, precise assistant. Answer plainly."
RUBRIC = "PIRATE RUBRIC. How pirate-like is this answer?\nQuestion: {question}\nAnswer: {answer}\nReply 0-100."
# (question, pirate answer, formal answer); the first four build the vector, the last four are held out.
QA = [
    ("How is the weather today?", "Arr, the skies be grey, matey, and the wind be howlin' o'er the deck! Batten "
     "down the hatches, ye scallywags!", "The weather today is cloudy with moderate wind and a chance of rain."),
    ("What should I eat for breakfast?", "Yo ho ho! Hardtack and a swig o' grog, me hearty, like every salty sea "
     "dog afore ye!", "A balanced breakfast includes whole grains, fruit and a source of protein."),
    ("How do I learn to swim?", "Arr, ye toss yerself off the plank, matey, and paddle like the kraken be "
     "chasin' ye!", "Take lessons with a qualified instructor and practise regularly in shallow water."),
    ("What is a good hobby?", "Huntin' for buried treasure, ye landlubber! Follow the map to where X marks the "
     "spot, arr!", "Reading is a good hobby: it is inexpensive, relaxing and educational."),
    ("How do I fix a flat tyre?", "Arr, patch it like ye'd patch a leaky hull, matey, with tar and a bit o' "
     "sailcloth, yo ho!", "Remove the wheel, locate the puncture, apply a patch and reinflate the tyre."),
    ("What is <b>your</b> favourite book & why?", "Treasure Island, ye scurvy dog! It be full o' pirates, "
     "parrots and plunder, arr!", "My favourite book is a reference dictionary, because it is precise."),
    ("How can I sleep better?", "Swing in a hammock below deck, matey, with the waves rockin' ye like a babe, "
     "arr!", "Keep a regular schedule, avoid screens before bed and keep the room dark."),
    ("What makes a good friend?", "A true matey shares his grog and never steals yer doubloons, ye scallywag, "
     "arr!", "A good friend is reliable, honest and supportive in difficult times."),
]
SPEC = TraitSpec(
    name="pirate", description="Talks like a pirate.", instruction=(InstructionPair(PIRATE, FORMAL),),
    extract_questions=tuple(q for q, _, _ in QA[:4]), eval_questions=tuple(q for q, _, _ in QA[4:]),
    eval_prompt=RUBRIC,
)
LAYERS = [3, 12, 20]
FAST = EvalSettings(examples=1, fractions=(0.5, 1.5), curve_questions=2, curve_max_new_tokens=6, bootstrap=200)
TINY = EvalSettings(grid_size=4, examples=1, fractions=(0.5,), curve_questions=1, curve_max_new_tokens=2,
                    bootstrap=50)


def rows() -> list[dict]:
    out = []
    for i, (question, pirate, formal) in enumerate(QA):
        split, q = ("extract", i) if i < 4 else ("eval", i - 4)
        for polarity, system, response in (("pos", PIRATE, pirate), ("neg", FORMAL, formal)):
            out.append({"id": f"{split}/{polarity}/p0/q{q:02d}/s0", "split": split, "polarity": polarity, "pair": 0,
                        "question_index": q, "sample": 0, "system": system, "question": question,
                        "response": response})
    return out


def build_run(run: Path, handle: ModelHandle) -> Path:
    """A run directory as `personascope extract` leaves it (plus an empty eval response it must skip)."""
    save_trait(SPEC, run / "trait.json")
    write_json(run / "manifest.json", {"config": {"model": handle.name, "trait": "pirate", "judge": "none"}})
    log = RecordLog(run / "responses.jsonl")
    for row in [*rows(), {**rows()[-1], "id": "eval/pos/p0/q09/s0", "response": "  "}]:
        log.append(row)
    extract = [r for r in rows() if r["split"] == "extract"]
    chats = [encode(handle, r["id"], [{"role": "system", "content": r["system"]},
                                      {"role": "user", "content": r["question"]}], r["response"]) for r in extract]
    acts = read_activations(handle, chats, list(range(handle.num_layers + 1)), progress=False)["response_avg"]
    pos = torch.tensor([r["polarity"] == "pos" for r in extract])
    vector = PersonaVector(acts[pos].mean(0) - acts[~pos].mean(0), "pirate", handle.name, {"method": "mean_diff"})
    vector.save(run / "vectors" / "response_avg.safetensors")
    return run


def tiny_handle(embedded: ModelHandle, layers: int = 12) -> ModelHandle:
    """A random-weight Llama with the embedded model's tokenizer (and chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(embedded.tokenizer))
    return ModelHandle(LlamaForCausalLM(config).eval(), embedded.tokenizer, "tiny-llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, embedded: ModelHandle) -> Path:
    return build_run(tmp_path_factory.mktemp("pirate-run"), embedded)


@pytest.fixture(scope="module")
def vector(run_dir: Path, embedded: ModelHandle) -> PersonaVector:
    return PersonaVector.load(run_dir / "vectors" / "response_avg.safetensors", embedded)


def test_eval_rows_skip_empty_responses(run_dir: Path) -> None:
    eval_rows, empty = read_eval_rows(run_dir / "responses.jsonl")
    assert len(eval_rows) == 8 and empty == 1
    assert {r["split"] for r in eval_rows} == {"eval"}


def test_held_out_separation(embedded: ModelHandle, run_dir: Path, vector: PersonaVector) -> None:
    eval_rows, _ = read_eval_rows(run_dir / "responses.jsonl")
    aurocs = separation(embedded, vector, eval_rows, LAYERS)
    assert set(aurocs) == set(LAYERS)
    assert all(0.0 <= a <= 1.0 for a in aurocs.values())
    assert aurocs[12] == 1.0  # pirate speech is unmistakable in the middle of the network
    flipped = PersonaVector(-vector.directions, "pirate", embedded.name)
    assert separation(embedded, flipped, eval_rows, [12]) == {12: 0.0}


def naive_margin(handle: ModelHandle, pos: list, neg: list) -> float:
    """Batch 1, no hooks, full logits, log_softmax: mean per-token response log-likelihood, pos minus neg."""

    def mean_ll(chat) -> float:
        with torch.no_grad():
            logits = handle.model(torch.tensor([chat.ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        targets = torch.tensor(chat.ids[chat.prompt_len:])
        return float(logprobs[chat.prompt_len - 1: -1].gather(-1, targets[:, None]).mean())

    return sum(map(mean_ll, pos)) / len(pos) - sum(map(mean_ll, neg)) / len(neg)


def test_likelihood_margin_rises_with_steering_toward_the_trait(
    embedded: ModelHandle, run_dir: Path, vector: PersonaVector
) -> None:
    eval_rows, _ = read_eval_rows(run_dir / "responses.jsonl")
    chats = plain_chats(embedded, eval_rows)
    pos = [c for c, r in zip(chats, eval_rows) if r["polarity"] == "pos"]
    neg = [c for c, r in zip(chats, eval_rows) if r["polarity"] == "neg"]
    # vectors of length 20 and 40 along the direction (the residual norm there is about 140)
    unit = 1.0 / float(vector.directions[12].norm())
    margins = likelihood_margin(embedded, vector, 12, [0.0, 20 * unit, 40 * unit], pos, neg)
    assert margins[0] == pytest.approx(naive_margin(embedded, pos, neg), abs=1e-4)
    assert margins[0] < margins[1] < margins[2]


def coefficient_judge(questions: list[str], scores: dict[str, list[float]]):
    """A judge server that scores the k-th answer it sees to each question with `scores[kind][k]` (kind: trait,
    coherence or relevance). The curve judges one answer per question per set: the prompted answers, the plain
    ones, then the strengths from weakest to strongest, then the strength it adds."""
    seen: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def handle(request: Request) -> Reply:
        prompt = request.prompt
        kind = ("coherence" if prompt.startswith(COHERENCE_RUBRIC[:60]) else
                "relevance" if prompt.startswith(RELEVANCE_RUBRIC[:60]) else "trait")
        question = next(q for q in questions if q in prompt)
        with lock:
            k = seen[kind, question] = seen.get((kind, question), -1) + 1
        score = scores[kind][k]
        return Reply(openai_reply(str(score), {str(score): 0.0}))

    return handle


@pytest.fixture(scope="module")
def judged(run_dir: Path, embedded: ModelHandle) -> Evaluation:
    # sets judged: prompted, plain, 0.5, 1.5, then 1.0 (halfway between the choice 0.5 and 1.5). The trait rises
    # with the coefficient; coherence falls below 75 at 1.5; relevance falls below 0.8 of plain's at 1.0
    handler = coefficient_judge(list(SPEC.eval_questions), {"trait": [80, 10, 50, 90, 70],
                                                             "coherence": [90, 95, 80, 30, 85],
                                                             "relevance": [60, 90, 85, 20, 50]})
    with pytest.MonkeyPatch.context() as env, Loopback(handler) as server:
        env.setenv("OPENAI_API_KEY", "sk-loopback")
        judge = make_judge("openai:judge", base_url=server.url + "/v1", max_retries=0)
        return evaluate_run(run_dir, embedded, judge=judge, layers=LAYERS, settings=FAST, progress=False)


def test_judged_curve_picks_the_most_trait_that_stays_coherent_and_relevant(judged: Evaluation,
                                                                           run_dir: Path) -> None:
    curve = judged.curve
    assert [p.fraction for p in curve] == [0.0, 0.5, 1.0, 1.5]  # 1.0: refined between the first choice and 1.5
    assert [p.judgement.trait for p in curve] == pytest.approx([10, 50, 70, 90])
    assert [p.judgement.coherence for p in curve] == pytest.approx([95, 80, 85, 30])
    assert [p.judgement.relevance for p in curve] == pytest.approx([90, 85, 50, 20])
    assert all(p.judgement.judged == FAST.curve_questions and p.judgement.failed == 0 for p in curve)
    assert [p.judge_kept for p in curve] == [True, True, False, False]  # 1.0 wanders off the question
    assert judged.prompted_judgement == Judgement(80, 90, 60, FAST.curve_questions, 0)
    assert judged.coef_source == "judge" and judged.choice.judge_fraction == 0.5
    assert (judged.best_coef, judged.best_fraction) == (pytest.approx(curve[1].coef), 0.5)
    agreement = judged.choice.agreement
    assert agreement is not None and agreement.same_choice == (judged.choice.balance_fraction == 0.5)
    assert 0 < agreement.answers <= 2 * len(curve)
    assert Evaluation.load(run_dir / "eval.layers-3_12_20.json").best_coef == pytest.approx(judged.best_coef)
    assert not (run_dir / "eval.json").exists()  # chosen layers never overwrite the full sweep


def test_steering_is_measured_beside_prompting(judged: Evaluation) -> None:
    """Every strength has the three judge-free measures; the prompted answers are the trait's 1 and the plain
    answers its 0; the comparison uses the report part's questions, at the chosen strength."""
    plain = judged.curve[0].quality
    assert (plain.trait.value, plain.relevance.value, plain.fluency_loss) == (0.0, 1.0, 0.0)
    assert judged.prompted.trait.value == pytest.approx(1.0)
    for p in judged.curve[1:]:
        q = p.quality
        assert q.relevance.value is not None and q.fluency is not None and q.trait.value is not None
        assert q.trait.value == pytest.approx(min(q.vs_opposite, q.vs_role_play))
        assert p.kept == (not p.failures)
    c = judged.comparison
    assert c.questions == [q for q in SPEC.eval_questions if q in judged.validation.report_questions]
    assert c.plain.trait.value == 0.0 and c.prompted.trait.value == pytest.approx(1.0)
    assert c.steered.trait.value is not None and c.steered.relevance.value is not None
    example = judged.examples[0]
    assert example.unsteered and example.steered and example.prompted


def test_evaluation_records_layers_and_choice(judged: Evaluation, vector: PersonaVector) -> None:
    assert [e.layer for e in judged.layers] == LAYERS
    assert judged.best_layer in LAYERS and judged.best_layer != 3
    best = judged.best
    assert best.margin_gain > 0 and best.auroc == 1.0 and best.report_auroc == 1.0
    # a coefficient reproduces its fraction of the residual norm along the raw vector row
    length = best.coef * float(vector.directions[best.layer].norm())
    assert length == pytest.approx(FAST.fraction * best.residual_norm, rel=1e-5)
    assert judged.counts == {"eval_pos": 4, "eval_neg": 4, "margin_pos": 2, "margin_neg": 2, "curve_questions": 2,
                             "eval_empty_skipped": 1}
    assert len(judged.projections.pos) == 2 and len(judged.examples) == 1


def test_layer_is_chosen_on_other_questions_than_those_reporting_auroc(judged: Evaluation) -> None:
    v = judged.validation
    assert v.split == "by question" and (v.select_rows, v.report_rows) == (4, 4)
    assert len(v.select_questions) == len(v.report_questions) == 2
    assert not set(v.select_questions) & set(v.report_questions)
    assert set(v.select_questions) | set(v.report_questions) == set(SPEC.eval_questions)
    assert {e.question for e in judged.examples} <= set(v.select_questions)
    assert v.auroc == judged.best.report_auroc and v.resamples == FAST.bootstrap
    assert v.auroc_low is not None and 0 <= v.auroc_low <= v.auroc_high <= 1


def test_split_and_bootstrap_are_deterministic() -> None:
    rows = [{"question": f"q{i}", "polarity": p} for i in range(10) for p in ("pos", "neg")]
    first, again = split_by_question(rows, seed=3), split_by_question(rows, seed=3)
    assert first == again and not first.shared and len(first.select) == len(first.report) == 10
    assert split_by_question(rows, seed=4).select_questions != first.select_questions
    assert split_by_question(rows[:2], seed=3).shared  # one question cannot be split
    scores, labels = torch.arange(20.0), torch.tensor([i % 2 == 0 for i in range(20)])
    low, high = bootstrap_auroc(scores, labels, 200, seed=0)
    assert (low, high) == bootstrap_auroc(scores, labels, 200, seed=0) and low < 0.5 < high


def test_default_layer_search_refines_around_the_grid(embedded: ModelHandle, tmp_path: Path) -> None:
    """All layers get an AUROC; the margin runs on a coarse grid plus the neighbours of its best layer."""
    tiny = tiny_handle(embedded)
    run = build_run(tmp_path, tiny)
    result = evaluate_run(run, tiny, settings=TINY, progress=False)
    measured = [e.layer for e in result.layers if e.margin_gain is not None]
    assert [e.layer for e in result.layers] == list(range(1, 12))
    best = result.best_layer
    eligible = {e.layer for e in result.layers if e.eligible}
    assert best in eligible and {1, 4, 7, 10} & eligible <= set(measured)
    assert {best - 1, best + 1} & eligible <= set(measured)
    gains = {e.layer: e.margin_gain for e in result.layers if e.layer in measured}
    assert gains[best] == max(g for layer, g in gains.items() if layer in eligible)
    weak = max(e.report_auroc for e in result.layers) < WEAK_AUROC
    assert any("barely separates" in note for note in result.notes) == weak
    assert Evaluation.load(run / "eval.json") == result


def test_a_bare_vector_is_evaluated_on_fresh_eval_responses(embedded: ModelHandle, tmp_path: Path) -> None:
    tiny = tiny_handle(embedded, layers=4)
    vector = PersonaVector.load(build_run(tmp_path, tiny) / "vectors" / "response_avg.safetensors", tiny)
    result = evaluate_vector(tiny, vector, SPEC, pairs=1, max_new_tokens=3, progress=False,
                             settings=TINY)
    counts = result.counts
    assert counts["eval_pos"] + counts["eval_neg"] + counts["eval_empty_skipped"] == 2 * len(SPEC.eval_questions)
    assert [e.layer for e in result.layers] == [1, 2, 3] and result.best_layer in (1, 2, 3)
    assert not (tmp_path / "eval.json").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personascope.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_evaluates_a_run_directory(run_dir: Path, tmp_path: Path) -> None:
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "eval.json").write_text("{}")  # the full sweep's result stays as it is
    result = cli("evaluate", str(run), "--layers", "11-12", "-q")
    assert result.returncode == 0, result.stderr
    for needle in ("AUROC", "margin gain", "best layer", "relevance", "steering beside prompting", "95% CI"):
        assert needle in result.stdout
    evaluation = json.loads((run / "eval.layers-11-12.json").read_text())
    assert [e["layer"] for e in evaluation["layers"]] == [11, 12]
    assert {"validation", "curve", "best_coef", "prompted", "choice", "comparison"} <= set(evaluation)
    assert (run / "report.layers-11-12.html").exists() and (run / "eval.json").read_text() == "{}"


def test_cli_refuses_a_vector_for_another_model(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    PersonaVector(torch.randn(5, 64), "pirate", "tiny-llama").save(path)
    result = cli("evaluate", str(path), "--model", "smollm2-135m", "--trait", "humorous")
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not fit this model" in lines[0], result.stderr
