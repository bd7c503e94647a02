"""Generation throughput: plain, steered and monitored decoding side by side, at batch 1 and 16.

Every case decodes greedily exactly `--new-tokens` tokens per row (min_new_tokens = max_new_tokens), so the work
is equal and the difference is what the hooks cost: steering adds `coef·v` at one layer at every step;
monitoring records the projection on a persona vector at every step (`personascope.apply.monitor.GenerationTrace`).
Cases alternate within each repeat so drift in machine load hits all of them alike.

    python benchmarks/generate.py --json generate.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from common import (
    console,
    interleave,
    left_padded,
    machine,
    print_table,
    rate,
    save,
    set_threads,
    trait_messages,
)
from torch import Tensor

from personascope.apply.monitor import GenerationTrace, Probe
from personascope.hooks import steer
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model
from personascope.vector import PersonaVector


def random_vector(handle: ModelHandle, seed: int = 0) -> PersonaVector:
    """A persona vector of random unit directions (speed does not depend on what the direction means)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(handle.num_layers + 1, handle.hidden_size, generator=generator)
    return PersonaVector(directions / directions.norm(dim=-1, keepdim=True), "benchmark", handle.name)


def decode(handle: ModelHandle, ids: Tensor, mask: Tensor, new_tokens: int, **kwargs: Any) -> Tensor:
    """Greedy decoding of exactly `new_tokens` tokens per row; returns the new tokens `[B, new_tokens]`."""
    with torch.inference_mode():
        out = handle.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=handle.tokenizer.pad_token_id, **kwargs,
        )
    return out[:, ids.shape[1] :]


def generation_cases(
    handle: ModelHandle, ids: Tensor, mask: Tensor, new_tokens: int, vector: PersonaVector, layer: int, coef: float
) -> dict[str, Callable[[], Tensor]]:
    """Plain, steered and monitored decoding of the same prompts."""
    trace = GenerationTrace(handle, Probe.build(handle, [vector], layer))

    def steered() -> Tensor:
        with steer(handle, vector, layer, coef):
            return decode(handle, ids, mask, new_tokens)

    def monitored() -> Tensor:
        trace.begin()
        try:
            return decode(handle, ids, mask, new_tokens)
        finally:
            trace.end()

    return {"plain": lambda: decode(handle, ids, mask, new_tokens), "steered": steered, "monitored": monitored}


def run(args: argparse.Namespace, handle: ModelHandle | None = None) -> dict[str, Any]:
    """Time the three cases at each batch size; print a table and return the figures."""
    set_threads(args.threads)
    handle = handle or load_model(args.model)
    vector = random_vector(handle)
    messages = trait_messages(args.trait, max(args.batches), system=False)
    seconds: dict[str, dict[str, list[float]]] = {}
    speeds: dict[str, dict[str, float]] = {}
    overhead: dict[str, dict[str, float]] = {}
    rows = []
    for batch in args.batches:
        prompts = [handle.chat_ids(m) for m in messages[:batch]]
        ids, mask = left_padded(prompts, handle.tokenizer.pad_token_id, handle.device)
        cases = generation_cases(handle, ids, mask, args.new_tokens, vector, args.layer, args.coef)
        interleave(cases, 1, handle.device)  # warm-up
        times, outputs = interleave(cases, args.repeats, handle.device)
        if torch.equal(outputs["steered"], outputs["plain"]):
            console.print(f"[yellow]batch {batch}: steering did not change the tokens (raise --coef)[/]")
        key = f"batch_{batch}"
        seconds[key] = times
        speeds[key] = {name: rate(batch * args.new_tokens, t) for name, t in times.items()}
        overhead[key] = {name: 1 - speeds[key][name] / speeds[key]["plain"] for name in cases if name != "plain"}
        rows += [[f"{batch}", name, speeds[key][name], f"{100 * overhead[key].get(name, 0.0):+.1f}%"]
                 for name in cases]
    print_table(
        f"Generation ({handle.name}, {args.new_tokens} new tokens per row, greedy, layer {args.layer}, "
        f"best of {args.repeats})",
        ["batch", "case", "tokens/s", "cost vs plain"], rows,
    )
    figures = {
        "benchmark": "generate",
        "machine": machine(handle.device),
        "model": handle.name,
        "dtype": str(handle.dtype),
        "layer": args.layer,
        "coef": args.coef,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seconds": seconds,
        "tokens_per_s": speeds,
        "overhead": overhead,
    }
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded model)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each case, interleaved (default 5)")
    p.add_argument("--layer", type=int, default=20, help="layer steered and monitored (default 20)")
    p.add_argument("--coef", type=float, default=8.0, help="steering coefficient on a unit vector (default 8)")
    p.add_argument("--trait", default="evil", help="built-in trait whose questions are the prompts")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
