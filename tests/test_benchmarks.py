"""The benchmark scripts run end to end with tiny settings and report what they promise.

They are scripts, not package modules: each is loaded from `benchmarks/` (which goes on `sys.path`, as it
does when a script runs, so their `import common` works).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_activations_benchmark_reads_the_same_values_as_the_reference_loop(embedded, tmp_path):
    bench = _script("activations")
    out = tmp_path / "activations.json"
    args = bench.parser().parse_args(["--rows", "5", "--longest", "24", "--repeats", "1", "--json", str(out)])
    figures = bench.run(args, embedded)
    saved = json.loads(out.read_text())
    assert saved["same_values"] is True and saved["min_cosine"] > 0.9999
    assert saved["speedup"] == pytest.approx(
        saved["tokens_per_s"]["personascope"] / saved["tokens_per_s"]["reference"])
    assert saved["tokens"] == figures["tokens"] > 5 * 24
    assert saved["machine"]["date"] and saved["layer"] == 20
    # 30 equal decoder layers and the LM head, against the first 20 layers
    layer_weights = sum(p.numel() for p in embedded.layers[0].parameters())
    head = embedded.model.get_output_embeddings().weight.numel()
    assert saved["compute_bound_speedup"] == pytest.approx((30 * layer_weights + head) / (20 * layer_weights))


def test_generate_benchmark_times_plain_steered_and_monitored(embedded, tmp_path):
    bench = _script("generate")
    out = tmp_path / "generate.json"
    args = bench.parser().parse_args(["--batches", "2", "--new-tokens", "3", "--repeats", "1", "--json", str(out)])
    bench.run(args, embedded)
    saved = json.loads(out.read_text())
    for batch in ("batch_2",):
        assert set(saved["tokens_per_s"][batch]) == {"plain", "steered", "monitored"}
        assert all(v > 0 for v in saved["tokens_per_s"][batch].values())
        assert set(saved["overhead"][batch]) == {"steered", "monitored"}
        assert saved["overhead"][batch]["steered"] == pytest.approx(
            1 - saved["tokens_per_s"][batch]["steered"] / saved["tokens_per_s"][batch]["plain"])


def test_gpu_benchmark_tiny_steers_inside_the_compiled_static_cache_path(tmp_path):
    """The GPU script's code paths on a tiny model; Dynamo (fullgraph, no inductor: fast) traces the steering
    hook into the static-cache decoding graph, and greedy tokens match eager steered decoding."""
    bench = _script("gpu")
    out = tmp_path / "gpu.json"
    bench.main(["--tiny", "--compile-backend", "eager", "--repeats", "1", "--batches", "1", "3",
                "--compile-batches", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["skipped"] == [] and not any("error" in saved[part] for part in saved if isinstance(saved[part], dict))
    assert saved["activations"]["same_values"] is True
    assert 0 < saved["activations"]["fraction_of_peak"]["personascope, budget 8192"]
    compiled = saved["compiled_generation"]["batches"]["3"]
    assert compiled["plain_first_difference"] is None and compiled["steered_first_difference"] is None
    assert compiled["steered_differs_from_plain"] is True
    assert set(compiled["runs"]) == {"compiled plain", "compiled steered"}
    assert set(saved["eager_generation"]["batches"]) == {"1", "3"}
    assert saved["eager_generation"]["batches"]["3"]["steered_differs_from_plain"] is True


def test_screen_benchmark_reports_samples_per_second_and_peak_memory(embedded, tmp_path):
    bench = _script("screen")
    out = tmp_path / "screen.json"
    args = bench.parser().parse_args(["--rows", "4", "--generate-rows", "2", "--new-tokens", "3", "--longest", "24",
                                      "--memory-rows", "12", "--json", str(out)])
    bench.run(args, embedded)
    saved = json.loads(out.read_text())
    for base, rows in (("prompt-last", 4), ("generate", 2)):
        assert saved["throughput"][base]["scored"] == rows
        assert saved["throughput"][base]["samples_per_s"] > 0
    assert saved["memory"]["12"]["peak_rss_mib"] > 100  # a fresh process that loaded torch and the model


def test_steering_quality_benchmark_checks_the_targets(embedded, tmp_path):
    """The per-trait row and the README table from a real (small) evaluation; targets checked as stated."""
    from personascope.evaluate.result import EvalSettings
    from personascope.evaluate.search import evaluate_run
    from tests.test_evaluate import build_run

    bench = _script("steering_quality")
    settings = EvalSettings(examples=1, fractions=(0.25, 0.5), curve_questions=2, curve_max_new_tokens=8,
                            bootstrap=50)
    evaluation = evaluate_run(build_run(tmp_path, embedded), embedded, layers=[12], settings=settings, progress=False)
    row = bench.row(evaluation)
    steered = evaluation.comparison.steered
    assert row["steered"]["trait"] == steered.trait.value and row["layer"] == 12
    expected = ((steered.trait.value or 0) >= 0.5 and (steered.relevance.value or 0) >= 0.8
                and steered.loop_answers == 0 and steered.distinct_2 >= 0.75)
    assert row["targets_met"] == expected == (not row["missed"])
    assert (row["best_and_why"] is None) == expected
    table = bench.markdown([row])
    assert table.startswith("| trait | layer |") and "| pirate | 12 |" in table
    assert ("Missed, with the best" in table) == (not expected)
