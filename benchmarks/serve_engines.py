"""Serving engines side by side: `serve --engine hf`, `serve --engine vllm` and plain vLLM without the plugin,
under the same load (run in .venv-vllm).

Each server is started as its own process on 127.0.0.1, one at a time (they would slow each other on a small
machine), and answers the same chat completions through HTTP: `--clients` concurrent clients (16 and 64 by
default), one request each, up to `--new-tokens` tokens (greedy). Cases per server:

* `plain` — no persona field;
* `persona` (personascope servers) — every request steered (one of two random vectors, alternating, with two
  coefficients) and monitored, as mixed traffic would be;
* plain vLLM runs with the personascope plugin left out (`VLLM_PLUGINS` names only vLLM's own), so its figure is
  vLLM's own speed.

Reported: completion tokens per second of wall time, and p50/p95 request latency. The steering + monitoring cost
is `1 − persona tokens/s ÷ plain vLLM tokens/s`.

    .venv-vllm/bin/python benchmarks/serve_engines.py --json results/serve_engines.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from common import console, machine, print_table, save, trait_messages
from generate import random_vector

from personascope.model.loading import DEFAULT_MODEL, load_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, stopped on exit even when the benchmark fails."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, health: str) -> None:
        self.command, self.env, self.log, self.health = command, env, log, health

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("w"))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.command[0]} did not start in 900 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(url: str, model: str, chats: list[list[dict[str, str]]], new_tokens: int,
         extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Send every chat at once (one client each); tokens/s and latency percentiles."""
    def one(i: int) -> tuple[int, float]:
        body = {"model": model, "messages": chats[i], "max_tokens": new_tokens, "temperature": 0, **extras[i]}
        start = time.perf_counter()
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"], time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(len(chats)) as pool:
        done = list(pool.map(one, range(len(chats))))
    wall = time.perf_counter() - start
    latencies = sorted(t for _, t in done)
    tokens = sum(n for n, _ in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    handle = load_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="serve-engines-"))
    files = []
    for seed in (0, 1):
        path = folder / f"v{seed}.safetensors"
        vector = random_vector(handle, seed=seed)
        vector.metadata["best_layer"] = str(args.layer)
        vector.save(path)
        files.append(path)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    results: dict[str, dict[str, Any]] = {}
    for engine in args.servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if engine == "vllm-plain":
            # `vllm serve` (its `vllm` script fails on vllm-cpu 0.32.0, which looks up a package named vllm)
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", handle.source,
                       "--host", "127.0.0.1", "--port", str(port),
                       "--served-model-name", handle.name, "--max-model-len", str(args.max_model_len),
                       "--dtype", str(handle.dtype).removeprefix("torch."), "--seed", "0"]
            server_env = {**env, "VLLM_PLUGINS": "lora_filesystem_resolver"}  # vLLM's own only: no personascope
            health = url + "/health"
        else:
            command = [str(bin_dir / "personascope"), "serve", "--model", args.model, "--port", str(port),
                       "--engine", engine, "--max-tokens", str(args.new_tokens), "--max-batch", str(max(args.clients)),
                       "-v", f"a={files[0]}", "-v", f"b={files[1]}"]
            server_env, health = env, url + "/healthz"
        console.print(f"[bold]{engine}[/]: starting")
        with Server(command, server_env, folder / f"{engine}.log", health):
            for clients in args.clients:
                chats = trait_messages(args.trait, clients, system=False)
                no_extra: list[dict[str, Any]] = [{} for _ in chats]
                load(url, handle.name, chats[:2], 4, no_extra[:2])  # warm-up
                results[f"{engine}/{clients}/plain"] = load(url, handle.name, chats, args.new_tokens, no_extra)
                if engine != "vllm-plain":
                    persona = [{"persona": {"steer": [{"vector": "ab"[i % 2], "coef": (2.0, 4.0)[i // 2 % 2],
                                                       "layer": args.layer}], "monitor": ["a", "b"]}}
                               for i in range(clients)]
                    results[f"{engine}/{clients}/persona"] = load(url, handle.name, chats, args.new_tokens, persona)
    rows = [[case, r["tokens"], f"{r['tokens_per_s']:.1f}", f"{r['p50_s']:.1f}", f"{r['p95_s']:.1f}"]
            for case, r in results.items()]
    print_table(f"Serving engines ({handle.name}, up to {args.new_tokens} tokens a request, greedy)",
                ["server / clients / case", "tokens", "tokens/s", "p50 s", "p95 s"], rows)

    def speed(key: str) -> float | None:
        return results[key]["tokens_per_s"] if key in results else None

    ratios = {}
    for clients in args.clients:
        hf, ours, plain = (speed(f"{e}/{clients}/{c}") for e, c in (("hf", "persona"), ("vllm", "persona"),
                                                                     ("vllm-plain", "plain")))
        if hf and ours:
            ratios[f"vllm_over_hf_{clients}"] = ours / hf
        if ours and plain:
            ratios[f"persona_cost_vs_plain_vllm_{clients}"] = 1 - ours / plain
    for name, value in ratios.items():
        console.print(f"{name}: {value:.3f}")
    figures = {"benchmark": "serve_engines", "machine": machine(handle.device), "model": handle.name,
               "new_tokens": args.new_tokens, "clients": args.clients, "layer": args.layer, "results": results,
               **ratios}
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded model)")
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64], help="concurrent clients (default 16 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    p.add_argument("--layer", type=int, default=20, help="layer steered (default 20)")
    p.add_argument("--max-model-len", type=int, default=2048, help="plain vLLM's context (default 2048)")
    p.add_argument("--trait", default="evil", help="built-in trait whose questions are the prompts")
    p.add_argument("--servers", nargs="+", default=["hf", "vllm", "vllm-plain"],
                   choices=["hf", "vllm", "vllm-plain"], help="servers to run (default all three)")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
