"""Dataset screening: ΔP ranks the embedded model's optimistic answers above its ordinary ones; malformed rows are
reported by id; outputs never replace inputs (killed runs: tests/test_faults.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from sklearn.metrics import roc_auc_score

from personascope.apply.screen import screen_dataset
from personascope.apply.shift import mean_prompt_last
from personascope.errors import PersonascopeError
from personascope.inference.activations import encode, read_activations
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.model import load_model
from personascope.traits import load_trait
from personascope.vector import PersonaVector

LAYER = 24


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def optimistic_data(embedded, tmp_path_factory):
    """The model's own answers under the optimistic trait's pos and neg system prompts (greedy, 24 tokens):
    ten extraction questions build a response_avg vector; ten held-out questions, stored without any system
    prompt, make the dataset (label True for the pos answers)."""
    spec = load_trait("optimistic")
    pair = spec.instruction[0]
    splits = (("v", spec.extract_questions[:10]), ("d", spec.eval_questions[:10]))
    plan = [(split, pol, i, q) for split, questions in splits for pol in ("pos", "neg") for i, q in enumerate(questions)]
    chats = {f"{s}/{p}/{i}": [{"role": "system", "content": getattr(pair, p)}, {"role": "user", "content": q}]
             for s, p, i, q in plan}
    results = generate_responses(embedded, [(rid, embedded.chat_ids(c)) for rid, c in chats.items()],
                                 SamplingConfig(24, 0.0), progress=False)
    texts = {r.id: r.text for r in results}
    train = [encode(embedded, rid, chat, texts[rid]) for rid, chat in chats.items() if rid.startswith("v/")]
    acts = read_activations(embedded, train, list(range(31)), ["response_avg"], progress=False)["response_avg"]
    pos = torch.tensor(["/pos/" in c.id for c in train])
    vector = PersonaVector(acts[pos].mean(0) - acts[~pos].mean(0), "optimistic", embedded.name,
                           {"best_layer": str(LAYER), "position": "response_avg"})
    rows = [{"id": f"q{i}-{p}", "label": p == "pos",
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": texts[f"d/{p}/{i}"]}]}
            for s, p, i, q in plan if s == "d"]
    return vector, write_jsonl(tmp_path_factory.mktemp("screen") / "train.jsonl", rows)


def test_delta_p_ranks_trait_answers_above_ordinary_ones(embedded, optimistic_data, tmp_path):
    vector, data = optimistic_data
    original = data.read_bytes()
    report = screen_dataset(embedded, data, vector, tmp_path / "scored.jsonl", base="generate",
                            sampling=SamplingConfig(24, 0.0), top_percent=25, filtered_out=tmp_path / "kept.jsonl",
                            progress=False)
    rows = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in original.decode().splitlines()]
    assert all(r["delta_p"] == pytest.approx(r["projection"] - r["base_projection"]) for r in rows)
    auroc = roc_auc_score([r["label"] for r in rows], [r["delta_p"] for r in rows])
    approx = screen_dataset(embedded, data, vector, tmp_path / "approx.parquet", base="prompt-last", progress=False)
    import pyarrow.parquet as pq

    cheap = pq.read_table(tmp_path / "approx.parquet").to_pylist()
    approx_auroc = roc_auc_score([r["label"] for r in cheap], [r["delta_p"] for r in cheap])
    print(f"AUROC of ΔP (trait vs ordinary answers, layer {LAYER}): generated base {auroc:.3f}, "
          f"prompt-last approximation {approx_auroc:.3f}")
    assert auroc >= 0.75 and approx_auroc >= 0.75
    assert data.read_bytes() == original
    # every input field kept; the base answers are cached for a rerun
    assert set(rows[0]) == {"id", "label", "messages", "projection", "base_projection", "delta_p"}
    assert len(read_jsonl(tmp_path / "scored.work" / "base_responses.jsonl")) == len(rows)
    summary = json.loads((tmp_path / "scored.summary.json").read_text())
    assert summary == dataclasses.asdict(report.summary) and summary["n_scored"] == 20 and summary["n_skipped"] == 0
    assert summary["delta_p"]["mean"] == pytest.approx(sum(r["delta_p"] for r in rows) / 20)
    top5 = sorted(rows, key=lambda r: -r["delta_p"])[:5]
    assert [t["id"] for t in summary["top"][:5]] == [r["id"] for r in top5]
    kept = read_jsonl(tmp_path / "kept.jsonl")
    assert summary["filter"]["n_removed"] == 5 and len(kept) == 15
    assert {r["id"] for r in kept} == {r["id"] for r in rows} - {r["id"] for r in top5}
    assert set(kept[0]) == {"id", "label", "messages"}
    assert (tmp_path / "scored.hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert approx.summary.base == "prompt-last" and not (tmp_path / "approx.work").exists()


# -- mechanics on a tiny random-weight model saved as a real model directory --------------------------------


@pytest.fixture(scope="module")
def tiny(embedded, tmp_path_factory):
    """A 2-layer Llama with the embedded tokenizer (context 128), and a prompt-last vector read from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(embedded.tokenizer), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    handle = load_model(str(path))
    pos = mean_prompt_last(handle, ["Tell me something wonderful!", "What a great day!"], progress=False)
    neg = mean_prompt_last(handle, ["Tell me something awful.", "What a terrible day."], progress=False)
    vector = PersonaVector(pos - neg, "optimistic", handle.name, {"best_layer": "2"})
    vector.save(path.parent / "tiny.safetensors")
    return handle, vector, path


def test_malformed_rows_are_reported_by_id_and_inputs_never_overwritten(tiny, tmp_path):
    handle, vector, _ = tiny
    rows = [
        {"id": "good", "prompt": "Hello?", "response": "Hi there."},
        {"id": "no-answer", "messages": [{"role": "user", "content": "Anyone?"}]},
        {"id": "empty", "prompt": "Say something.", "response": "  "},
        {"id": "long", "prompt": "Talk.", "response": "word " * 300},
        {"id": "fine", "messages": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]},
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    original = data.read_bytes()
    skipped = screen_dataset(handle, data, vector, tmp_path / "skip.jsonl", base="prompt-last", progress=False)
    assert [r["id"] for r in read_jsonl(skipped.scored)] == ["good", "fine"]
    listed = {r["id"]: r for r in read_jsonl(skipped.skipped)}
    assert set(listed) == {"no-answer", "empty", "long"} and skipped.summary.n_skipped == 3
    assert "no assistant message" in listed["no-answer"]["reason"] and "empty" in listed["empty"]["reason"]
    assert "context length 128" in listed["long"]["reason"]
    cut = screen_dataset(handle, data, vector, tmp_path / "cut.jsonl", base="prompt-last", on_long="truncate",
                         progress=False)
    assert [r["id"] for r in read_jsonl(cut.scored)] == ["good", "long", "fine"]
    assert {r["id"]: r["action"] for r in read_jsonl(cut.skipped)} == {
        "no-answer": "skipped", "empty": "skipped", "long": "truncated"}
    with pytest.raises(PersonascopeError, match="row long has .* tokens"):
        screen_dataset(handle, data, vector, tmp_path / "strict.jsonl", base="prompt-last", on_long="error",
                       progress=False)
    with pytest.raises(PersonascopeError, match="over the input"):
        screen_dataset(handle, data, vector, data, base="prompt-last", progress=False)
    with pytest.raises(PersonascopeError, match="over the input"):
        screen_dataset(handle, data, vector, tmp_path / "x.jsonl", base="prompt-last", top_percent=10,
                       filtered_out=data, progress=False)
    assert data.read_bytes() == original


def test_screening_in_chunks_writes_the_same_rows_and_summary(tiny, tmp_path, monkeypatch):
    """The input is read, scored and written CHUNK_ROWS rows at a time; the outputs do not depend on the chunks."""
    import personascope.apply.screen as screen

    handle, vector, _ = tiny
    rows = [{"id": f"r{i:02d}", "prompt": f"Question {i}: " + "why? " * (i % 4), "response": f"Answer {i}.",
             "extra": "x" * (100 + i)} for i in range(11)] + [{"id": "bad", "prompt": "No answer"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    whole = screen_dataset(handle, data, vector, tmp_path / "whole.jsonl", base="prompt-last", top_percent=20,
                           filtered_out=tmp_path / "whole.kept.jsonl", progress=False)
    sizes = []
    real = screen.score_samples
    monkeypatch.setattr(screen, "score_samples", lambda h, samples, *a, **k: sizes.append(len(samples)) or
                        real(h, samples, *a, **k))
    monkeypatch.setattr(screen, "CHUNK_ROWS", 4)
    chunked = screen_dataset(handle, data, vector, tmp_path / "chunked.jsonl", base="prompt-last", top_percent=20,
                             filtered_out=tmp_path / "chunked.kept.jsonl", progress=False)
    assert sizes == [4, 4, 3]  # the last chunk's bad row is left out before scoring
    mine, theirs = read_jsonl(chunked.scored), read_jsonl(whole.scored)
    assert [r["id"] for r in mine] == [r["id"] for r in theirs] == [f"r{i:02d}" for i in range(11)]
    assert [r["extra"] for r in mine] == [r["extra"] for r in theirs]
    assert [r["delta_p"] for r in mine] == pytest.approx([r["delta_p"] for r in theirs], abs=1e-5)
    assert read_jsonl(tmp_path / "chunked.kept.jsonl") == read_jsonl(tmp_path / "whole.kept.jsonl")
    assert [t.id for t in chunked.summary.top] == [t.id for t in whole.summary.top]
    assert chunked.summary.n_rows == 12 and chunked.summary.n_skipped == 1
    assert chunked.summary.delta_p.percentiles == pytest.approx(whole.summary.delta_p.percentiles, abs=1e-5)
