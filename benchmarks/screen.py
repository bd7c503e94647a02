"""Dataset screening: samples/s end to end, and peak memory as the dataset grows.

Throughput: `screen_dataset` over a synthetic chat dataset file (a built-in trait's questions, answers of varied
length cut from real text), once with `base="prompt-last"` (`--base prompt-last`: one forward pass per row,
no generation) and once generating the base model's own answers (greedy, `--new-tokens` each), as the CLI
does; from reading the file to writing the scored rows, summary and histogram.

Memory: `personascope screen --base prompt-last` in a fresh process per size (its own peak RSS, read with
`wait4`), on files of `--memory-rows` rows of short chats, each carrying an `--extra-bytes` field (20 kB: a
dataset's metadata, kept in the scored output), read at a shallow layer (memory does not depend on the layer; a
shallow one keeps 20,000 rows quick). Flat means the peak grows by a negligible amount per row: the input is
read, scored and written in chunks, so 20,000 such rows (400 MB) must stay within 150 MB of 1,000.

    python benchmarks/screen.py --json screen.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    console,
    corpus_ids,
    machine,
    print_table,
    response_lengths,
    save,
    trait_messages,
)

from personascope.apply.screen import screen_dataset
from personascope.inference.generate import SamplingConfig
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model
from personascope.vector import PersonaVector


def write_dataset(handle: ModelHandle, path: Path, rows: int, trait: str, shortest: int, longest: int,
                  system: str | None = None, extra_bytes: int = 0) -> Path:
    """A JSONL chat dataset: `rows` of the trait's questions, answered with real text of varied length (and an
    `extra` field of `extra_bytes` characters per row when asked)."""
    text = corpus_ids(handle)
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for i, (messages, length) in enumerate(zip(trait_messages(trait, rows, system=False),
                                                   response_lengths(rows, shortest, longest))):
            start = rng.randrange(0, max(1, len(text) - length))
            answer = handle.tokenizer.decode(text[start : start + length]).strip()
            chat = ([{"role": "system", "content": system}] if system else []) + messages
            row = {"id": f"row{i}", "messages": [*chat, {"role": "assistant", "content": answer}]}
            if extra_bytes:
                row["extra"] = f"{i:08d}" + "x" * (extra_bytes - 8)
            out.write(json.dumps(row) + "\n")
    return path


def random_vector_file(handle: ModelHandle, path: Path, layer: int) -> Path:
    """A persona vector of random directions saved as a file (speed and memory do not depend on its values)."""
    import torch

    directions = torch.randn(handle.num_layers + 1, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector(directions, "benchmark", handle.name, {"best_layer": str(layer)}).save(path)
    return path


def throughput(handle: ModelHandle, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Samples/s of `screen_dataset` with the prompt-last approximation and with generated base answers."""
    vector = PersonaVector.load(random_vector_file(handle, work / "vector.safetensors", args.layer), handle)
    out: dict[str, Any] = {}
    for base, rows in (("prompt-last", args.rows), ("generate", args.generate_rows)):
        data = write_dataset(handle, work / f"{base}.jsonl", rows, args.trait, args.shortest, args.longest)
        start = time.perf_counter()
        report = screen_dataset(handle, data, vector, work / f"{base}.scored.jsonl", base=base,
                                sampling=SamplingConfig(args.new_tokens, 0.0), progress=False)
        seconds = time.perf_counter() - start
        scored = report.summary.n_scored
        out[base] = {"rows": rows, "scored": scored, "seconds": seconds, "samples_per_s": scored / seconds}
    return out


def peak_memory(handle: ModelHandle, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of `personascope screen --base prompt-last` in a fresh process per dataset size."""
    vector = random_vector_file(handle, work / "vector_shallow.safetensors", args.memory_layer)
    out: dict[str, Any] = {}
    for rows in args.memory_rows:
        data = write_dataset(handle, work / f"memory_{rows}.jsonl", rows, args.trait, 4, 24, system="Be brief.",
                             extra_bytes=args.extra_bytes)
        command = [sys.executable, "-m", "personascope.cli", "screen", str(data), "--vector", str(vector),
                   "--out", str(work / f"memory_{rows}.scored.jsonl"), "--base", "prompt-last",
                   "--layer", str(args.memory_layer), "--model", args.model]
        log = work / f"memory_{rows}.log"
        start = time.perf_counter()
        with log.open("wb") as err:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
            process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
        out[str(rows)] = {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds,
                          "bytes": data.stat().st_size}
        for leftover in work.glob(f"memory_{rows}*"):  # 400 MB each at 20,000 rows
            leftover.unlink()
    sizes = sorted(args.memory_rows)
    if len(sizes) > 1:
        low, high = out[str(sizes[0])]["peak_rss_mib"], out[str(sizes[-1])]["peak_rss_mib"]
        out["growth_mib"] = high - low
        out["growth_ratio"] = high / low
        out["bytes_per_extra_row"] = (high - low) * 2**20 / (sizes[-1] - sizes[0])
    return out


def run(args: argparse.Namespace, handle: ModelHandle | None = None) -> dict[str, Any]:
    """Throughput of both base modes, then peak memory per dataset size; print a table, return the figures."""
    handle = handle or load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="screen-bench-") as tmp:
        work = Path(tmp)
        console.print(f"{handle.name}: screening {args.rows} rows (prompt-last) and {args.generate_rows} rows "
                      f"(generated base answers, {args.new_tokens} tokens) at layer {args.layer}")
        speed = throughput(handle, work, args)
        console.print(f"peak memory of `personascope screen --base prompt-last` at {args.memory_rows} rows")
        memory = peak_memory(handle, work, args) if args.memory_rows else {}
    rows = [[f"screen, base {base}", f"{f['rows']} rows", f"{f['samples_per_s']:.2f} samples/s",
             f"{f['seconds']:.1f} s"] for base, f in speed.items()]
    rows += [[f"peak RSS, {n} rows", f"{n} rows", f"{memory[str(n)]['peak_rss_mib']:,.0f} MiB",
              f"{memory[str(n)]['seconds']:.1f} s"] for n in args.memory_rows]
    if "growth_mib" in memory:
        rows.append(["peak RSS growth", f"{min(args.memory_rows)}→{max(args.memory_rows)} rows",
                     f"{memory['growth_mib']:+,.0f} MiB", f"{memory['bytes_per_extra_row']:,.0f} B/row"])
    print_table(f"Screening ({handle.name}, layer {args.layer}; memory runs at layer {args.memory_layer})",
                ["measure", "size", "value", "time"], rows)
    figures = {"benchmark": "screen", "machine": machine(handle.device), "model": handle.name,
               "layer": args.layer, "new_tokens": args.new_tokens, "throughput": speed,
               "memory_layer": args.memory_layer, "extra_bytes": args.extra_bytes, "memory": memory}
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded model)")
    p.add_argument("--rows", type=int, default=128, help="rows screened with prompt-last (default 128)")
    p.add_argument("--generate-rows", type=int, default=32,
                   help="rows screened with generated base answers (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="length of generated base answers (default 32)")
    p.add_argument("--layer", type=int, default=20, help="layer read for throughput (default 20)")
    p.add_argument("--shortest", type=int, default=16, help="shortest training answer, tokens (default 16)")
    p.add_argument("--longest", type=int, default=256, help="longest training answer, tokens (default 256)")
    p.add_argument("--memory-rows", type=int, nargs="*", default=[1000, 20000],
                   help="dataset sizes for peak memory (default 1000 20000; none to skip)")
    p.add_argument("--extra-bytes", type=int, default=20000,
                   help="size of the extra field of each row in the memory runs (default 20000)")
    p.add_argument("--memory-layer", type=int, default=1, help="layer read in the memory runs (default 1)")
    p.add_argument("--trait", default="evil", help="built-in trait whose questions make the dataset")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
