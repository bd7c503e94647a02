"""Soak: 64 concurrent streaming clients against `personascope serve` for minutes, some hanging up mid-stream.

A real `personascope serve` process on loopback; each client thread streams chat completions one after another
(1 in `--leave-every` of them reads a few chunks, then closes the connection). Reported: requests that stayed and
failed (must be 0), requests refused with 503 (the bounded queue; retried after Retry-After), the server's
resident memory (RSS, from /proc, sampled every `--sample-every` s; start, middle and end are the medians of the
first, middle and last third of the samples after `--warmup`), and the server's own counts from /metrics (rows
by how they ended, tokens spent on clients that left).

    python benchmarks/soak.py --json results/soak.json                  # the embedded model, 150 s
    python benchmarks/soak.py --model /path/to/tiny-model --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from common import console, machine, print_table, save, trait_messages

from personascope.model.loading import DEFAULT_MODEL


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(text: str, name: str, **labels: str) -> float:
    """A counter from Prometheus text, summed over the labels not given."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


class Tally:
    """Counts shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"completed": 0, "left": 0, "failed": 0, "refused_503": 0}
        self.failures: list[str] = []

    def add(self, key: str, why: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            if why and len(self.failures) < 20:
                self.failures.append(why)


def client(url: str, index: int, args: argparse.Namespace, chats: list[Any], model: str, until: float,
           tally: Tally) -> None:
    rng = random.Random(index)
    with httpx.Client(timeout=args.timeout) as http:
        n = 0
        while time.monotonic() < until:
            n += 1
            leave = (index + n) % args.leave_every == 0
            body = {"model": model, "messages": chats[(index + n) % len(chats)], "stream": True,
                    "max_tokens": rng.randint(args.max_tokens // 4, args.max_tokens),
                    "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(2**31)}
            try:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                    if reply.status_code == 503:
                        reply.read()
                        tally.add("refused_503")
                        time.sleep(float(reply.headers.get("Retry-After", "1")))
                        continue
                    if reply.status_code != 200:
                        tally.add("failed", f"status {reply.status_code}: {reply.read()[:200]!r}")
                        continue
                    lines = reply.iter_lines()
                    if leave:  # a few chunks, then hang up
                        for _ in range(rng.randint(1, 6)):
                            next(lines, None)
                        tally.add("left")
                        continue
                    data = [line[6:] for line in lines if line.startswith("data: ")]
                reasons = [c["choices"][0]["finish_reason"] for c in map(json.loads, data[:-1]) if c.get("choices")]
                if data and data[-1] == "[DONE]" and reasons and reasons[-1] in ("stop", "length"):
                    tally.add("completed")
                else:
                    tally.add("failed", f"incomplete stream: {data[-2:]!r}")
            except httpx.HTTPError as exc:
                tally.add("failed", f"{type(exc).__name__}: {exc}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the clients for `args.duration` seconds, print and return the figures."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    server = subprocess.Popen([sys.executable, "-m", "personascope.cli", "serve", "--model", args.model, "--port",
                               str(port), "--max-tokens", str(args.max_tokens), "--max-queue", str(args.max_queue)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        chats = trait_messages(args.trait, 40)
        tally = Tally()
        start = time.monotonic()
        until = start + args.duration
        threads = [threading.Thread(target=client, args=(url, i, args, chats, model, until, tally), daemon=True)
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        samples: list[tuple[float, float]] = []
        while time.monotonic() < until:
            samples.append((round(time.monotonic() - start, 1), round(rss_mib(server.pid), 1)))
            time.sleep(min(args.sample_every, max(0.0, until - time.monotonic())))
        for thread in threads:
            thread.join(args.timeout + 30)
        samples.append((round(time.monotonic() - start, 1), round(rss_mib(server.pid), 1)))
        alive = httpx.get(url + "/healthz", timeout=10).status_code == 200
        text = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(60)
    steady = [rss for t, rss in samples if t >= args.warmup] or [samples[-1][1]]
    thirds = [statistics.median(steady[i * len(steady) // 3:max((i + 1) * len(steady) // 3, i * len(steady) // 3 + 1)])
              for i in range(3)]
    figures = {
        "benchmark": "soak",
        "machine": machine(),
        "model": model,
        "clients": args.clients,
        "duration_s": args.duration,
        "leave_every": args.leave_every,
        "max_tokens": args.max_tokens,
        "server_threads": args.threads or "torch default",
        "requests": tally.counts,
        "failed_among_those_that_stayed": tally.counts["failed"],
        "failures": tally.failures,
        "healthy_at_end": alive,
        "rss_mib": {"before_load": samples[0][1], "start": thirds[0], "middle": thirds[1], "end": thirds[2],
                    "min_after_warmup": min(steady), "max": max(rss for _, rss in samples)},
        "rss_growth_start_to_end_mib": round(thirds[2] - thirds[0], 1),
        "rss_samples": samples,
        "server_rows": {reason: metric(text, "personascope_rows_total", reason=reason)
                        for reason in ("stop", "length", "cancelled", "failed")},
        "server_tokens": {reason: metric(text, "personascope_row_tokens_total", reason=reason)
                          for reason in ("stop", "length", "cancelled", "failed")},
    }
    print_table(f"Soak ({model}, {args.clients} streaming clients, {args.duration:g} s)", ["figure", "value"], [
        ["requests completed", tally.counts["completed"]],
        ["clients that hung up mid-stream", tally.counts["left"]],
        ["failed among those that stayed", tally.counts["failed"]],
        ["refused with 503 (queue full), retried", tally.counts["refused_503"]],
        ["server RSS before load (MiB)", f"{samples[0][1]:.0f}"],
        ["server RSS start / middle / end (median of each third, MiB)",
         f"{thirds[0]:.0f} / {thirds[1]:.0f} / {thirds[2]:.0f}"],
        ["server RSS max (MiB)", f"{max(rss for _, rss in samples):.0f}"],
        ["rows cancelled (server) / their tokens", f"{figures['server_rows']['cancelled']:.0f} / "
                                                    f"{figures['server_tokens']['cancelled']:.0f}"],
        ["healthy at the end", alive],
    ])
    for why in tally.failures:
        console.print(f"failure: {why}")
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model the server loads (default: the embedded model)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--duration", type=float, default=150, help="seconds the clients keep asking (default 150)")
    p.add_argument("--leave-every", type=int, default=4, help="1 request in this many hangs up mid-stream (4)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of a request: 1/4 to all of it (32)")
    p.add_argument("--max-queue", type=int, default=256, help="the server's --max-queue (default 256)")
    p.add_argument("--warmup", type=float, default=20, help="seconds before the RSS baseline (default 20)")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between RSS samples (default 5)")
    p.add_argument("--timeout", type=float, default=300, help="a client's read timeout in seconds (default 300)")
    p.add_argument("--threads", type=int, help="the server's torch CPU threads (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--trait", default="evil", help="built-in trait whose questions are the prompts")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
