"""The extraction pipeline on the embedded model with a tiny trait: outputs, parity, resume, judge filter, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from personascope.evaluate.result import EvalSettings, Evaluation
from personascope.extract import ExtractConfig, extract, select_pairs
from personascope.traits import load_trait
from personascope.traits.plan import plan_rows
from personascope.vector import PersonaVector
from tests.loopback import Loopback, Reply, openai_reply

RUBRIC = "How optimistic is this answer, from 0 to 100?\nQUESTION: {question}\nANSWER: {answer}\nEND OF ANSWER"
CLI = [sys.executable, "-m", "personascope.cli"]
POSITIONS = ("response_avg", "prompt_avg", "prompt_last")
TINY_EVAL = EvalSettings(margin_pairs=3, margin_tokens=16, fractions=(0.5, 1.0), curve_questions=2,
                         curve_max_new_tokens=8, examples=1, bootstrap=100)


def write_trait(path: Path) -> Path:
    """Two pairs, three extraction and three evaluation questions of `optimistic` (needs lenient loading)."""
    spec = load_trait("optimistic").to_dict()
    spec.update(name="tiny_optimistic", instruction=spec["instruction"][:2], eval_prompt=RUBRIC,
                extract_questions=spec["extract_questions"][:3], eval_questions=spec["eval_questions"][:3])
    path.write_text(json.dumps(spec))
    return path


def tiny_config(trait: Path, **changes: object) -> ExtractConfig:
    # token_budget 400 makes batches of four rows, so a killed run leaves some rows written and some not.
    settings = dict(trait=str(trait), max_new_tokens=16, lenient=True, eval_pairs=1, eval_layers=(10,),
                    token_budget=400, evaluation=TINY_EVAL)
    return ExtractConfig(**{**settings, **changes})  # type: ignore[arg-type]


def cli_args(trait: Path, out: Path) -> list[str]:
    return [*CLI, "extract", str(trait), "--out", str(out), "--max-new-tokens", "16", "--lenient",
            "--eval-pairs", "1", "--quiet"]


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file, skipping a line torn by a kill."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trait_file(tmp_path_factory) -> Path:
    return write_trait(tmp_path_factory.mktemp("trait") / "tiny.json")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, trait_file, embedded):
    """One uninterrupted run, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    return out, extract(tiny_config(trait_file), out, handle=embedded, progress=False)


def test_a_run_writes_every_output_and_a_rerun_does_nothing(finished, trait_file, embedded):
    out, result = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["trait"] == "tiny_optimistic" and manifest["config"]["max_new_tokens"] == 16
    assert {"torch", "transformers", "personascope"} <= set(manifest["versions"])
    assert manifest["summary"] == {"responses": 18, "pairs": 6, "empty_pairs": 0, "rejected_pairs": 0,
                                   "kept_pairs": 6, "judge_failures": 0}
    assert json.loads((out / "trait.json").read_text()) == load_trait(trait_file, strict=False).to_dict()

    rows = read_rows(out / "responses.jsonl")
    config = tiny_config(trait_file)
    planned = plan_rows(load_trait(trait_file, strict=False), samples=config.samples, eval_pairs=config.eval_pairs,
                        eval_samples=config.eval_samples)
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in planned)
    assert {"extract/pos/p1/q02/s0", "eval/neg/p0/q00/s0"} <= {r["id"] for r in rows}
    for row in rows:
        assert set(row) == {"id", "split", "polarity", "pair", "question_index", "sample", "system", "question",
                            "response"}
        assert row["response"].strip()
    assert not (out / "scores.jsonl").exists()

    for position in POSITIONS:
        with safe_open(str(out / "vectors" / f"{position}.safetensors"), "pt") as handle:
            meta, keys = handle.metadata(), set(handle.keys())
        assert keys == {"directions", "pos_mean", "neg_mean"}
        assert {k: meta[k] for k in ("trait", "model", "method", "position", "n_pos", "n_neg", "judge", "filtered",
                                     "threshold", "hidden_size", "num_layers")} == {
            "trait": "tiny_optimistic", "model": "smollm2-135m", "method": "mean_diff", "position": position,
            "n_pos": "6", "n_neg": "6", "judge": "none", "filtered": "false", "threshold": "50",
            "hidden_size": "576", "num_layers": "30"}
        assert {"format", "model_revision", "created", "personascope_version"} <= set(meta)

    evaluation = Evaluation.load(out / "eval.json")
    assert evaluation == result.evaluation and evaluation.best_layer == 10
    assert not (out / "eval.layers-10.json").exists()  # the run's evaluation is eval.json, whatever its layers
    assert [e.layer for e in evaluation.layers] == [10]
    assert 0 <= result.best_layer_stats().auroc <= 1 and result.best_layer_stats().margin_gain is not None
    assert evaluation.validation.select_rows + evaluation.validation.report_rows == 6
    recommended = PersonaVector.load(out / "vector.safetensors", embedded)
    assert recommended.best_layer == 10 and recommended.best_coef == pytest.approx(evaluation.best_coef, rel=1e-4)
    assert recommended.metadata["position"] == "response_avg"
    assert torch.equal(recommended.directions, PersonaVector.load(out / "vectors/response_avg.safetensors").directions)
    assert (out / "report.html").read_text().lstrip().startswith("<!DOCTYPE html>")

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = extract(tiny_config(trait_file), out, handle=embedded, progress=False)
    assert again.summary["generated"] == 0 and again.evaluation == result.evaluation
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_response_avg_vector_matches_a_naive_per_sample_computation(finished, embedded):
    out, _ = finished
    rows = read_rows(out / "responses.jsonl")
    means: dict[str, list[torch.Tensor]] = {"pos": [], "neg": []}
    for row in (r for r in rows if r["split"] == "extract"):
        messages = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]
        prompt = embedded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        answer = embedded.tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = embedded.model(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
        means[row["polarity"]].append(torch.stack([s[0, len(prompt):].mean(0) for s in states]))
    naive = torch.stack(means["pos"]).mean(0) - torch.stack(means["neg"]).mean(0)
    vector = PersonaVector.load(out / "vectors" / "response_avg.safetensors")
    cosine = torch.nn.functional.cosine_similarity(vector.directions, naive, dim=-1)
    assert len(means["pos"]) == len(means["neg"]) == 6
    assert (cosine >= 0.999).all(), cosine


def judge_handler(run: Path):
    """Score pos responses 90 and neg 10 for the trait, 80 for coherence; except two planted failures."""
    low_trait, incoherent = "extract/pos/p0/q00/s0", "extract/neg/p1/q01/s0"

    def handle(request):
        prompt = request.prompt
        rows = {r["response"]: r["id"] for r in read_rows(run / "responses.jsonl")}
        if prompt.startswith("How optimistic"):
            row = rows.get(prompt.split("\nANSWER: ", 1)[1].rsplit("\nEND OF ANSWER", 1)[0])
            score = 50 if row is None else 20 if row == low_trait else 90 if "/pos/" in row else 10
        else:
            row = rows.get(prompt.split("[ANSWER START]\n", 1)[1].split("\n[ANSWER END]", 1)[0])
            score = 30 if row == incoherent else 80
        return Reply(body=openai_reply(str(score), top_logprobs={str(score): math.log(1.0)}))

    return handle


def test_judged_extraction_filters_pairs(trait_file, embedded, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "judged"
    with Loopback(judge_handler(out)) as server:
        config = tiny_config(trait_file, judge="openai:loopback", judge_base_url=server.url + "/v1")
        result = extract(config, out, handle=embedded, progress=False)
        scores = {s["id"]: s for s in read_rows(out / "scores.jsonl")}
        assert len(scores) == 18 and all(s["error"] is None for s in scores.values())
        assert scores["extract/pos/p0/q00/s0"]["trait"] == pytest.approx(20)
        assert scores["extract/neg/p1/q01/s0"]["coherence"] == pytest.approx(30)
        assert scores["extract/pos/p1/q02/s0"]["trait"] == pytest.approx(90)
        assert result.summary["kept_pairs"] == 4 and result.summary["rejected_pairs"] == 2
        meta = PersonaVector.load(out / "vectors" / "response_avg.safetensors").metadata
        assert (meta["n_pos"], meta["n_neg"], meta["judge"], meta["filtered"]) == ("4", "4", "openai:loopback", "true")
        assert result.evaluation.judge == "openai:loopback" and result.evaluation.curve[0].judgement.judged == 2
        assert (out / "judge_cache.sqlite").exists()

        hits = server.hits()
        again = extract(config, out, handle=embedded, progress=False)
        assert server.hits() == hits and again.summary["generated"] == 0


def test_select_pairs_drops_empty_and_unpaired_rows():
    def row(polarity: str, question: int, response: str, split: str = "extract") -> dict:
        return {"id": f"{split}/{polarity}/p0/q{question:02d}/s0", "split": split, "polarity": polarity, "pair": 0,
                "question_index": question, "sample": 0, "response": response}

    rows = [row("pos", 0, "yes"), row("neg", 0, "no"), row("pos", 1, " "), row("neg", 1, "no"),
            row("pos", 2, "yes"), row("pos", 0, "x", split="eval"), row("neg", 0, "y", split="eval")]
    selection = select_pairs(rows, None)
    assert [(p["id"], n["id"]) for p, n in selection.kept] == [("extract/pos/p0/q00/s0", "extract/neg/p0/q00/s0")]
    assert (selection.total, selection.empty, selection.rejected) == (2, 1, 0)
    failed = {"extract/pos/p0/q00/s0": {"trait": 80, "coherence": None}, "extract/neg/p0/q00/s0": {"trait": 0,
                                                                                                 "coherence": 90}}
    assert select_pairs(rows, failed).rejected == 1


def test_bad_trait_or_judge_is_one_error_line_and_loses_nothing(finished, tmp_path):
    out, _ = finished
    before = snapshot(out)
    broken = json.loads((out / "trait.json").read_text())
    del broken["eval_prompt"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    one_error_line(subprocess.run(cli_args(tmp_path / "broken.json", out), capture_output=True, text=True,
                                  timeout=300), "missing key 'eval_prompt'", "broken.json")
    one_error_line(subprocess.run([*cli_args(out / "trait.json", out), "--judge", "gpt4"], capture_output=True,
                                  text=True, timeout=300), "unknown judge spec 'gpt4'", "openai:MODEL")
    assert snapshot(out) == before


@pytest.fixture
def silent_model(tmp_path, embedded) -> Path:
    """A tiny random-weight model whose every token ends its turn: all its responses are empty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(embedded.tokenizer)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=vocab))
    model.generation_config.eos_token_id = list(range(vocab))
    path = tmp_path / "silent"
    model.save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path


def test_empty_responses_are_one_error_line_and_kept(silent_model, trait_file, tmp_path):
    out = tmp_path / "empty"
    args = [*cli_args(trait_file, out), "--model", str(silent_model)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    one_error_line(first, "only 0 of 6 extraction pairs are usable", "6 had an empty response", "--max-new-tokens")
    rows = (out / "responses.jsonl").read_text()
    assert len(rows.splitlines()) == 18 and json.loads(rows.splitlines()[0])["response"] == ""
    assert json.loads((out / "manifest.json").read_text())["summary"]["empty_pairs"] == 6
    one_error_line(subprocess.run(args, capture_output=True, text=True, timeout=300), "only 0 of 6")
    assert (out / "responses.jsonl").read_text() == rows


def test_a_rerun_with_smaller_batches_resumes(finished, trait_file, embedded):
    """Batch size and token budget are not part of a run's identity: after running out of memory, lower them."""
    out, _ = finished
    before = snapshot(out)
    result = extract(tiny_config(trait_file, token_budget=200, max_batch=2), out, handle=embedded, progress=False)
    assert result.summary["generated"] == 0
    assert snapshot(out) == before
