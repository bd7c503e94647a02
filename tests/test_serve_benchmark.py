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


def test_soak_benchmark_reports_failures_and_server_memory(tiny_chat, tmp_path) -> None:
    bench = _script("soak")
    out = tmp_path / "soak.json"
    args = bench.parser().parse_args(["--model", str(tiny_chat), "--clients", "6", "--duration", "6", "--leave-every",
                                      "2", "--max-tokens", "12", "--warmup", "0", "--sample-every", "1",
                                      "--json", str(out)])
    figures = bench.run(args)
    saved = json.loads(out.read_text())
    assert saved["failed_among_those_that_stayed"] == 0 and saved["healthy_at_end"] is True, saved["failures"]
    assert saved["requests"]["completed"] > 0 and saved["requests"]["left"] > 0
    assert 0 < saved["rss_mib"]["start"] <= saved["rss_mib"]["max"] and len(saved["rss_samples"]) >= 2
    assert saved["server_rows"]["stop"] + saved["server_rows"]["length"] >= saved["requests"]["completed"]
    assert figures["clients"] == 6 and saved["machine"]["date"]
