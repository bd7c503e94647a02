"""Screening on Ray Data (a local Ray instance, two scoring actors) gives the single-process screen's rows, ΔP,
skipped list, summary and filtered dataset, from JSONL or Parquet (killed runs: tests/test_faults.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from personascope.apply.screen import screen_dataset
from personascope.errors import PersonascopeError
from personascope.inference.generate import SamplingConfig
from personascope.io.files import to_jsonable
from tests.test_screen import read_jsonl, tiny, write_jsonl  # noqa: F401  (tiny is a fixture)

ray = pytest.importorskip("ray")
from personascope.scale.ray_screen import RaySettings, ray_screen  # noqa: E402

WORKERS = RaySettings(workers=2, shard_rows=7)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module's in-process runs (ray_screen joins it and leaves it running)."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def dataset_rows(count: int = 30) -> list[dict]:
    rows = [{"id": f"r{i:02d}", "prompt": f"Question {i}: " + "why? " * (i % 4), "response": f"Answer {i}, yes."}
            for i in range(count)]
    rows[3] = {"id": None, "prompt": "No id here.", "response": "So my index is my id."}
    rows[5] = {"id": "long", "prompt": "Talk.", "response": "word " * 300}
    rows[8] = {"id": "empty", "prompt": "Say something.", "response": " "}
    return rows


def assert_same_screen(ray_report, single_report, tolerance=1e-4):
    ours, theirs = read_jsonl(ray_report.scored), read_jsonl(single_report.scored)
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k not in ("projection", "base_projection", "delta_p")} == \
            {k: v for k, v in b.items() if k not in ("projection", "base_projection", "delta_p")}
        for key in ("projection", "base_projection", "delta_p"):
            assert a[key] == pytest.approx(b[key], abs=tolerance)
    def by_id(rows):
        return sorted(rows, key=lambda r: (r["id"], r["action"]))

    assert by_id(read_jsonl(ray_report.skipped)) == by_id(read_jsonl(single_report.skipped))  # ours in row order
    mine, single = ray_report.summary, single_report.summary
    for key in ("n_rows", "n_scored", "n_skipped", "n_truncated", "layer", "trait", "base", "model"):
        assert getattr(mine, key) == getattr(single, key), key
    assert mine.delta_p.mean == pytest.approx(single.delta_p.mean, abs=tolerance)
    assert [t.id for t in mine.top] == [t.id for t in single.top]
    assert json.loads(ray_report.summary_path.read_text()) == json.loads(json.dumps(mine, default=to_jsonable))
    assert ray_report.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_screen_equals_the_single_process_screen(tiny, local_ray, tmp_path):
    handle, vector, model_dir = tiny
    rows = dataset_rows()
    rows[20] = {"id": "r02", "prompt": "Same id as row 2.", "response": "In another shard."}  # iter_samples drops it
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    vector_path = model_dir.parent / "tiny.safetensors"
    single = screen_dataset(handle, data, vector, tmp_path / "single.jsonl", base="prompt-last", top_percent=20,
                            filtered_out=tmp_path / "single-kept.jsonl", progress=False)
    report = ray_screen(data, vector_path, tmp_path / "ray.jsonl", model=str(model_dir), base="prompt-last",
                        top_percent=20, filtered_out=tmp_path / "ray-kept.jsonl", max_batch=4, settings=WORKERS,
                        progress=False)
    assert_same_screen(report, single)
    assert read_jsonl(report.filtered) == read_jsonl(single.filtered)
    assert report.summary.filter.cutoff == pytest.approx(single.summary.filter.cutoff, abs=1e-4)
    shards = sorted((tmp_path / "ray.work" / "ray").glob("shard-*.jsonl"))
    assert len(shards) == 5  # 30 rows in shards of 7
    reasons = {r["id"]: r["reason"] for r in read_jsonl(report.skipped)}
    assert reasons.keys() == {"long", "empty", "r02"} and "over the context length" in reasons["long"]
    assert reasons["r02"] == "duplicate id" and reasons["empty"] == "empty response"
    first = [json.loads(line) for line in shards[0].read_text().splitlines()]
    assert [index for index, kind, _, _ in first if kind in ("scored", "skipped")] == list(range(7))
    assert first[3][2] == "3"  # the row without an id goes by its index, as in the single-process screen
    assert ray.is_initialized()  # it joined the running instance and left it running


def test_parquet_input_with_generated_base_answers(tiny, local_ray, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle, vector, model_dir = tiny
    rows = [r for r in dataset_rows(12) if r["id"] is not None]
    data = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    sampling = SamplingConfig(8, 0.0)
    single = screen_dataset(handle, data, vector, tmp_path / "single.jsonl", base="generate", sampling=sampling,
                            progress=False)
    report = ray_screen(data, model_dir.parent / "tiny.safetensors", tmp_path / "ray.parquet", model=str(model_dir),
                        base="generate", sampling=sampling, max_batch=4, settings=WORKERS, progress=False)
    parquet = pq.read_table(report.scored).to_pylist()
    assert [r["id"] for r in parquet] == [r["id"] for r in read_jsonl(single.scored)]
    ray_jsonl = tmp_path / "ray-copy.jsonl"
    write_jsonl(ray_jsonl, parquet)
    assert_same_screen(dataclasses.replace(report, scored=ray_jsonl), single)


def test_bad_settings_and_unreadable_files_are_refused(tiny, local_ray, tmp_path):
    _, _, model_dir = tiny
    data = write_jsonl(tmp_path / "data.jsonl", dataset_rows(10))
    vector_path = model_dir.parent / "tiny.safetensors"
    with pytest.raises(PersonascopeError, match="workers"):
        ray_screen(data, vector_path, tmp_path / "o.jsonl", model=str(model_dir), settings=RaySettings(workers=0))
    with pytest.raises(PersonascopeError, match="base"):
        ray_screen(data, vector_path, tmp_path / "o.jsonl", model=str(model_dir), base=str(data))
    with pytest.raises(PersonascopeError, match="engine"):
        ray_screen(data, vector_path, tmp_path / "o.jsonl", model=str(model_dir), engine="tgi")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\nhi,there\n")
    with pytest.raises(PersonascopeError, match="jsonl or .parquet"):
        ray_screen(csv, vector_path, tmp_path / "o.jsonl", model=str(model_dir), base="prompt-last")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "response": "there"}\nnot json at all\n')
    with pytest.raises(PersonascopeError, match="ray.data cannot read"):
        ray_screen(broken, vector_path, tmp_path / "o.jsonl", model=str(model_dir), base="prompt-last")
