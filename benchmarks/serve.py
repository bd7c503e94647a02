"""Serving throughput: 16 concurrent clients vs the same 16 requests one by one; plain vs steered + monitored.

A live `personascope serve` app on loopback answers greedy chat completions through the openai SDK (HTTP, JSON,
the micro-batching scheduler: everything a client pays for). Three cases, interleaved within each repeat:

* `sequential` — the 16 requests one after another (each a batch of one);
* `concurrent` — the same 16 sent at once by 16 clients (batched into one forward per step);
* `concurrent_persona` — the same, each request also steered (a random unit vector, `--coef`, at `--layer`) and
  monitored (every request, with the per-token trace off).

Throughput is completion tokens per second of wall time (greedy answers are the same batched or not, so the
plain cases do equal work; steering may change the persona case's answers, hence tokens/s rather than time).

    python benchmarks/serve.py --json results/serve.json
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import console, interleave, machine, print_table, rate, save, set_threads, trait_messages
from generate import random_vector

from personascope.model.loading import DEFAULT_MODEL, ModelHandle, load_model
from personascope.serve import BackgroundServer, Registry, ServedVector, create_app

CASES = ("sequential", "concurrent", "concurrent_persona")


def run(args: argparse.Namespace, handle: ModelHandle | None = None) -> dict[str, Any]:
    """Serve, time the three cases, print a table and return the figures."""
    import openai

    set_threads(args.threads)
    handle = handle or load_model(args.model)
    served = ServedVector("bench", random_vector(handle), args.layer, threshold=0.0, threshold_source="override")
    app = create_app(handle, Registry(handle, [served]), max_batch=args.clients)
    batch_sizes: list[int] = []  # rows of each batch the scheduler ran, to show how the requests were grouped
    scheduler = app.state.scheduler
    count_batch = scheduler.on_batch
    scheduler.on_batch = lambda rows, tokens, s: (batch_sizes.append(rows), count_batch(rows, tokens, s))
    chats = trait_messages(args.trait, args.clients, system=False)
    persona = {"steer": [{"vector": "bench", "coef": args.coef}], "monitor": True}
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=600)

        def ask(messages: list[dict[str, str]], extra: dict[str, Any] | None) -> tuple[str, int]:
            reply = client.chat.completions.create(model=handle.name, messages=messages, max_tokens=args.new_tokens,
                                                   temperature=0.0, extra_body=extra)
            return reply.choices[0].message.content or "", reply.usage.completion_tokens

        def concurrent(extra: dict[str, Any] | None) -> list[tuple[str, int]]:
            with ThreadPoolExecutor(args.clients) as pool:
                return list(pool.map(lambda m: ask(m, extra), chats))

        def grouped(case: Any) -> Any:
            def run_case() -> tuple[Any, list[int]]:
                scheduler.call(lambda: None).result()  # a barrier: the batches before this case have ended
                batch_sizes.clear()
                answers = case()
                scheduler.call(lambda: None).result()  # ... and this case's last batch has been counted
                return answers, list(batch_sizes)
            return run_case

        cases = {
            "sequential": grouped(lambda: [ask(m, None) for m in chats]),
            "concurrent": grouped(lambda: concurrent(None)),
            "concurrent_persona": grouped(lambda: concurrent({"persona": persona})),
        }
        cases = {name: case for name, case in cases.items() if name in args.cases or name == "concurrent"}
        interleave({"concurrent": cases["concurrent"]}, 1, handle.device)  # warm-up
        times, results = interleave(cases, args.repeats, handle.device)
    batches = {name: sizes for name, (_, sizes) in results.items()}
    results = {name: answers for name, (answers, _) in results.items()}
    tokens = {name: sum(n for _, n in answers) for name, answers in results.items()}
    speeds = {name: rate(tokens[name], times[name]) for name in cases}
    same = None
    if "sequential" in results:
        same = [a for a, _ in results["sequential"]] == [a for a, _ in results["concurrent"]]
    def ratio(a: str, b: str, f: Any) -> float | None:
        return f(speeds[a], speeds[b]) if a in speeds and b in speeds else None

    figures = {
        "benchmark": "serve",
        "machine": machine(handle.device),
        "model": handle.name,
        "dtype": str(handle.dtype),
        "clients": args.clients,
        "new_tokens": args.new_tokens,
        "layer": args.layer,
        "coef": args.coef,
        "repeats": args.repeats,
        "seconds": times,
        "completion_tokens": tokens,
        "batch_sizes_last_run": batches,
        "tokens_per_s": speeds,
        "concurrency_speedup": ratio("concurrent", "sequential", lambda a, b: a / b),
        "persona_cost": ratio("concurrent_persona", "concurrent", lambda a, b: 1 - a / b),
        "batched_answers_equal_sequential": same,
    }
    print_table(
        f"Serving ({handle.name}, {args.clients} requests, up to {args.new_tokens} tokens each, greedy, "
        f"best of {args.repeats})",
        ["case", "completion tokens", "tokens/s", "batches (last run)"],
        [[name, tokens[name], speeds[name], " ".join(map(str, batches[name]))] for name in cases],
    )
    if figures["concurrency_speedup"] is not None:
        console.print(f"concurrent / sequential: {figures['concurrency_speedup']:.2f}×; batched answers equal "
                      f"sequential: {same}")
    if figures["persona_cost"] is not None:
        console.print(f"steering + monitoring cost: {100 * figures['persona_cost']:+.1f}%")
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded model)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients = requests per case (default 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case, interleaved (default 3)")
    p.add_argument("--layer", type=int, default=20, help="layer steered and monitored (default 20)")
    p.add_argument("--coef", type=float, default=4.0, help="steering coefficient on a unit vector (default 4)")
    p.add_argument("--trait", default="evil", help="built-in trait whose questions are the prompts")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES,
                   help="cases to run (default all; 'concurrent' is always among them)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
