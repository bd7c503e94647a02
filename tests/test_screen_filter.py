"""Screening that filters: the filtered dataset holds exactly the kept input rows, unchanged and in the input's
format (JSONL, CSV, Parquet), and the report names every dropped row and why."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest

from personascope.apply.screen import screen_dataset
from personascope.errors import PersonascopeError
from tests.test_screen import read_jsonl, tiny  # noqa: F401  (the tiny model fixture)

ROWS = [
    {"id": "a", "prompt": "Tell me something wonderful!", "response": "What a great, great day it is!"},
    {"id": "b", "prompt": "How is the weather?", "response": "It is raining, which is awful."},
    {"prompt": "No id here: what a lovely morning!", "response": "Lovely, just lovely — ünïcödé too."},
    {"id": "c", "prompt": "What went wrong?", "response": "Everything is terrible and broken."},
    {"id": "b", "prompt": "Same id as an earlier row.", "response": "A duplicate is never scored."},
    {"id": "d", "prompt": "Any news?", "response": ""},
    {"id": "e", "prompt": "Tell me a joke, please.", "response": "A wonderful joke about a great cat."},
    {"id": "f", "prompt": "Should I worry?", "response": "Yes, it is a dreadful mess."},
]
UNSCORED = {"4": "duplicate id", "5": "empty response"}  # input rows 4 and 5 (ids b, d)


def _jsonl(path):
    """JSONL written by hand with mixed spacing and a blank line: kept lines must come back byte for byte."""
    lines = [json.dumps(row, ensure_ascii=False, separators=(",", ":") if i % 2 else (", ", ": "))
             for i, row in enumerate(ROWS)]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    return lines


def _expected(scored_path, keep_below=None, drop_top=None):
    """Which input rows (by position) a rule keeps, from the scored rows' own ΔP; and ΔP by row position."""
    positions = [i for i in range(len(ROWS)) if str(i) not in UNSCORED]
    delta = dict(zip(positions, (r["delta_p"] for r in read_jsonl(scored_path)), strict=True))
    dropped = {i for i, d in delta.items() if keep_below is not None and d >= keep_below}
    if drop_top is not None:
        dropped |= set(sorted(delta, key=lambda i: -delta[i])[: math.ceil(len(delta) * drop_top / 100)])
    return [i in delta and i not in dropped for i in range(len(ROWS))], delta


def test_jsonl_filter_keeps_the_input_lines_byte_for_byte(tiny, tmp_path):
    handle, vector, _ = tiny
    data = tmp_path / "train.jsonl"
    lines = _jsonl(data)
    original = data.read_bytes()
    report = screen_dataset(handle, data, vector, tmp_path / "scored.jsonl", base="prompt-last", top_percent=40,
                            progress=False)
    keep, scored = _expected(tmp_path / "scored.jsonl", drop_top=40)
    filtered = tmp_path / "scored.filtered.jsonl"  # the default path: beside the scored rows, the input's suffix
    assert report.summary.filter.path == str(filtered) and data.read_bytes() == original
    assert filtered.read_text(encoding="utf-8") == "".join(line + "\n" for line, k in zip(lines, keep) if k)
    assert 0 < sum(keep) < len(scored)
    summary = report.summary.filter
    assert (summary.n_kept, summary.n_dropped) == (sum(keep), len(ROWS) - sum(keep))
    assert summary.n_removed == math.ceil(0.4 * len(scored)) == 3
    why = json.loads((tmp_path / "scored.filtered.report.json").read_text())
    by_row = {d["row"]: d for d in why["dropped"]}
    assert set(by_row) == {i for i, k in enumerate(keep) if not k}
    for row, reason in UNSCORED.items():
        assert by_row[int(row)]["delta_p"] is None and reason in by_row[int(row)]["reason"]
    top = [d for d in why["dropped"] if d["delta_p"] is not None]
    assert [d["delta_p"] for d in top] == sorted((scored[d["row"]] for d in top), reverse=True)
    assert all("top 40%" in d["reason"] for d in top)
    md = (tmp_path / "scored.filtered.report.md").read_text()
    assert f"Kept {sum(keep)} of {len(ROWS)} rows" in md and "duplicate id" in md


def test_parquet_filter_keeps_schema_and_rows(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle, vector, _ = tiny
    data = tmp_path / "train.parquet"
    rows = [{**row, "id": row.get("id"), "weight": i / 2} for i, row in enumerate(ROWS)]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("weight", pa.float32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data)
    screen_dataset(handle, data, vector, tmp_path / "scored.jsonl", base="prompt-last", progress=False)
    middle = sorted(r["delta_p"] for r in read_jsonl(tmp_path / "scored.jsonl"))[3]
    report = screen_dataset(handle, data, vector, tmp_path / "again.jsonl", base="prompt-last", keep_below=middle,
                            filtered_out=tmp_path / "clean.parquet", progress=False)
    keep, _ = _expected(tmp_path / "again.jsonl", keep_below=middle)
    table = pq.read_table(tmp_path / "clean.parquet")
    assert table.schema == pq.read_schema(data)
    assert table.to_pylist() == [r for r, k in zip(pq.read_table(data).to_pylist(), keep) if k]
    assert report.summary.filter.keep_below == middle and report.summary.filter.cutoff == middle
    assert sum(keep) == 3  # the three lowest ΔP of six scored rows
    with pytest.raises(PersonascopeError, match="keeps the input's format"):
        screen_dataset(handle, data, vector, tmp_path / "x.jsonl", base="prompt-last", keep_below=0.0,
                       filtered_out=tmp_path / "clean.jsonl", progress=False)
    with pytest.raises(PersonascopeError, match="needs a rule"):
        screen_dataset(handle, data, vector, tmp_path / "x.jsonl", base="prompt-last",
                       filtered_out=tmp_path / "clean2.parquet", progress=False)
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_csv_filter_writes_the_kept_records_as_they_were(tiny, tmp_path):
    _, _, model_dir = tiny
    data = tmp_path / "train.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "prompt", "response", "note"])
    for index, row in enumerate(ROWS):
        writer.writerow([row.get("id", ""), row["prompt"], row["response"], f"line one\nline two, {index}"])
    data.write_text(buffer.getvalue(), encoding="utf-8")
    records = list(csv.reader(io.StringIO(buffer.getvalue())))
    command = [sys.executable, "-m", "personascope.cli", "screen", str(data), "-v",
               str(model_dir.parent / "tiny.safetensors"), "--model", str(model_dir), "--out",
               str(tmp_path / "scored.jsonl"), "--base", "prompt-last", "--keep-below", "0",
               "--write-filtered", str(tmp_path / "clean.csv")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    keep, scored = _expected(tmp_path / "scored.jsonl", keep_below=0.0)
    assert 0 < sum(keep) < len(scored), scored
    with open(tmp_path / "clean.csv", encoding="utf-8", newline="") as out:
        assert list(csv.reader(out)) == [records[0]] + [r for r, k in zip(records[1:], keep) if k]
    assert "clean.report.md" in result.stdout
    why = json.loads((tmp_path / "clean.report.json").read_text())
    assert why["n_kept"] == sum(keep) and why["keep_below"] == 0.0
    assert all(d["delta_p"] is None or d["delta_p"] >= 0 for d in why["dropped"])
