"""`benchmarks/serve.py` runs end to end with tiny settings and reports what it promises."""

from __future__ import annotations

import json

import pytest

from tests.test_benchmarks import _script

pytestmark = pytest.mark.slow


def test_serve_benchmark_reports_throughput_and_persona_cost(embedded, tmp_path) -> None:
    bench = _script("serve")
    out = tmp_path / "serve.json"
    args = bench.parser().parse_args(["--clients", "3", "--new-tokens", "3", "--repeats", "1", "--json", str(out)])
    figures = bench.run(args, embedded)
    saved = json.loads(out.read_text())
    assert saved["batched_answers_equal_sequential"] is True
    assert set(saved["tokens_per_s"]) == {"sequential", "concurrent", "concurrent_persona"}
    assert saved["concurrency_speedup"] == pytest.approx(
        saved["tokens_per_s"]["concurrent"] / saved["tokens_per_s"]["sequential"])
    assert saved["completion_tokens"]["sequential"] == saved["completion_tokens"]["concurrent"] > 0
    assert figures["clients"] == 3 and saved["machine"]["date"]
    assert saved["batch_sizes_last_run"]["sequential"] == [1, 1, 1]
    assert sum(saved["batch_sizes_last_run"]["concurrent"]) == 3
