"""Scale-out: generation tokens/s with hf vs vLLM on the same rows; Ray screening rows/s with 1 and 2 workers;
the Ray driver's peak RSS at two dataset sizes.

* `generation` (run it in .venv-vllm, where both engines are): `generate_with("hf" | "vllm", ...)` on the same
  chats (a built-in trait's questions under its system prompts, as extraction asks them), sampled at
  temperature 1 with `--new-tokens` each; tokens/s counts the tokens each engine actually produced (both stop
  at the end of turn). vLLM's start-up (engine process, weights, compilation) is timed apart.
* `ray`: `personascope screen --base prompt-last` on one JSONL file, single-process and with `--ray local
  --workers 1` and `2`, each a fresh process, timed end to end (Ray's and the actors' start-up included).
* `memory`: the Ray driver's own peak RSS (`VmHWM`, polled) at two sizes; the model is loaded in the workers,
  the driver only streams small records to shard files.

    .venv-vllm/bin/python benchmarks/scale.py --json benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import console, machine, print_table, save, trait_messages
from screen import random_vector_file, write_dataset


def generation(args: argparse.Namespace) -> dict[str, Any]:
    from personascope.inference.engines import generate_with
    from personascope.inference.generate import SamplingConfig
    from personascope.inference.vllm_engine import close_engines, engine_for
    from personascope.model import load_model

    handle = load_model(args.model)
    requests = [(f"row{i}", handle.chat_ids(chat)) for i, chat in enumerate(trait_messages("evil", args.rows))]
    sampling = SamplingConfig(args.new_tokens, 1.0, seed=0)
    out: dict[str, Any] = {"rows": args.rows, "new_tokens": args.new_tokens, "engines": {}}
    for engine in ("hf", "vllm"):  # hf first: an idle vLLM engine's processes would share the CPU with it
        if engine == "vllm":
            start = time.perf_counter()
            engine_for(handle)
            out["vllm_startup_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        results = generate_with(engine, handle, requests, sampling, max_batch=args.max_batch, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results)
        out["engines"][engine] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": tokens / seconds}
    close_engines()
    out["speedup"] = out["engines"]["vllm"]["tokens_per_s"] / out["engines"]["hf"]["tokens_per_s"]
    return out


def _screen(data: Path, vector: Path, out: Path, model: str, ray: list[str]) -> tuple[float, float]:
    """Run `personascope screen --base prompt-last` (plus `ray` options); seconds and the driver's peak RSS."""
    command = [sys.executable, "-m", "personascope.cli", "screen", str(data), "-v", str(vector), "--out", str(out),
               "--model", model, "--base", "prompt-last", *ray]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
                       / 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read()[-2000:] if process.stderr else ''}")
    return seconds, peak


def ray_screening(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from personascope.model import load_model

    handle = load_model(args.model)
    vector = random_vector_file(handle, work / "vector.safetensors", args.layer)
    data = write_dataset(handle, work / "data.jsonl", args.screen_rows, "evil", 16, 128)
    out: dict[str, Any] = {"rows": args.screen_rows, "layer": args.layer, "cases": {}}
    cases = {"single process": [], **{f"ray, {n} worker{'s' * (n > 1)}": ["--ray", "local", "--workers", str(n),
                                                                             "--shard-rows", "250"] for n in (1, 2)}}
    for name, options in cases.items():
        seconds, peak = _screen(data, vector, work / f"{name.replace(' ', '_').replace(',', '')}.jsonl",
                                args.model, options)
        out["cases"][name] = {"seconds": round(seconds, 1), "rows_per_s": args.screen_rows / seconds,
                              "driver_peak_rss_mib": round(peak)}
    memory = {}
    for rows in args.memory_rows:
        data = write_dataset(handle, work / f"memory{rows}.jsonl", rows, "evil", 8, 24)
        seconds, peak = _screen(data, vector, work / f"memory{rows}.out.jsonl", args.model,
                                ["--ray", "local", "--workers", "2", "--shard-rows", "1000", "--layer", "1"])
        memory[str(rows)] = {"driver_peak_rss_mib": round(peak), "seconds": round(seconds, 1)}
    out["driver_memory"] = memory
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parts", nargs="+", default=["generation", "ray"], choices=["generation", "ray"])
    p.add_argument("--rows", type=int, default=64, help="chats generated by each engine (default 64)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens per answer at most (default 96)")
    p.add_argument("--max-batch", type=int, default=64, help="hf rows per batch (default 64)")
    p.add_argument("--screen-rows", type=int, default=1000, help="rows screened per case (default 1000)")
    p.add_argument("--layer", type=int, default=20, help="layer read by the screening cases (default 20)")
    p.add_argument("--memory-rows", type=int, nargs="*", default=[2000, 20000], help="sizes for the driver's RSS")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    figures: dict[str, Any] = {"benchmark": "scale", "machine": machine(),
                               "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE")}}
    table: list[list[Any]] = []
    if "generation" in args.parts:
        console.print("[bold]generation[/]: hf vs vLLM")
        gen = figures["generation"] = generation(args)
        save(args.json, figures)
        for engine, run in gen["engines"].items():
            table.append([f"generate {gen['rows']} chats: {engine}", f"{run['tokens_per_s']:,.1f} tokens/s",
                          f"{run['tokens']} tokens in {run['seconds']} s"])
        table.append(["vLLM start-up", f"{gen['vllm_startup_seconds']} s", f"vLLM {gen['speedup']:.2f}× hf"])
    if "ray" in args.parts:
        console.print("[bold]ray[/]: screening rows/s and the driver's memory")
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as folder:
            ray = figures["ray"] = ray_screening(args, Path(folder))
        save(args.json, figures)
        for name, run in ray["cases"].items():
            table.append([f"screen {ray['rows']} rows: {name}", f"{run['rows_per_s']:,.1f} rows/s",
                          f"{run['seconds']} s end to end"])
        for rows, run in ray["driver_memory"].items():
            table.append([f"Ray driver peak RSS, {rows} rows", f"{run['driver_peak_rss_mib']:,} MiB",
                          f"{run['seconds']} s"])
    print_table("Scale-out", ["measure", "value", "note"], table)
    save(args.json, figures)
    return figures


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this module again
    main()
