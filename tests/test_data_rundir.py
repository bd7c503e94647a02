"""Dataset reading (JSONL/CSV/Parquet/saved datasets), bad rows by id, and run-directory logs."""

from __future__ import annotations

import json

import pytest

from personascope.errors import PersonascopeError
from personascope.io.data import load_samples, write_rows
from personascope.io.rundir import open_run

ROWS = [
    {"id": "a", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}], "tag": 1},
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "tag": 2},
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "tag": 3},
    {"id": "d", "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], "tag": 4},
]


def test_jsonl_messages_and_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    samples, bad = load_samples(path)
    assert [s.id for s in samples] == ["a", "d"]
    assert samples[1].prompt[-1] == {"role": "user", "content": "Q2"} and samples[1].response == "A2"
    assert len(samples[1].prompt) == 3 and samples[0].fields["tag"] == 1
    assert {(b.id, b.reason) for b in bad} == {("b", "no assistant message"), ("c", "empty response")}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", "dir"])
def test_prompt_response_columns_in_other_formats(tmp_path, suffix):
    import datasets

    rows = [{"prompt": "What is 2+2?", "response": "4", "system": ""}, {"prompt": "Hi", "response": "Hey", "system": "Be terse."}]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / ("data" if suffix == "dir" else f"data{suffix}")
    {"dir": lambda: ds.save_to_disk(str(path)), ".csv": lambda: ds.to_csv(str(path)),
     ".parquet": lambda: ds.to_parquet(str(path))}[suffix]()
    samples, bad = load_samples(path)
    assert not bad and [s.id for s in samples] == ["0", "1"]
    assert samples[1].prompt == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


def test_unusable_datasets_raise(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "no chat"}) + "\n")
    with pytest.raises(PersonascopeError, match="no usable rows.*'messages'"):
        load_samples(path)
    with pytest.raises(PersonascopeError, match="does not exist"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(PersonascopeError, match="unknown file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_samples(tmp_path / "x.txt")


def test_write_rows_never_overwrites_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(PersonascopeError, match="refusing to write over the input"):
        write_rows([{"id": "x"}], path, inputs=[path])
    assert json.loads(path.read_text())["id"] == "a"
    out = write_rows([{"id": "x", "v": 1.5}], tmp_path / "o.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(out).to_pylist() == [{"id": "x", "v": 1.5}]


def test_manifest_guards_resume(tmp_path):
    open_run(tmp_path, {"model": "m", "samples": 1})
    open_run(tmp_path, {"model": "m", "samples": 1})
    with pytest.raises(PersonascopeError, match="samples: 1 -> 2"):
        open_run(tmp_path, {"model": "m", "samples": 2})


def test_ignored_settings_do_not_block_resuming(tmp_path):
    open_run(tmp_path / "run", {"model": "m", "token_budget": 8192})
    open_run(tmp_path / "run", {"model": "m"}, ignored=("token_budget",))
    with pytest.raises(PersonascopeError, match="other settings"):
        open_run(tmp_path / "run", {"model": "other"}, ignored=("token_budget",))
