"""Activation reading: personascope's batched reader against the reference implementation's loop.

The reference code (Chen et al. 2025, `generate_vec.py`) reads activations one chat per forward pass, with
autograd on, `output_hidden_states=True` and the full vocabulary logits, then averages the response tokens
of the layer it wants. personascope reads the same pooled values in length-sorted batches under a token
budget, stops after the deepest layer needed, computes no logits and pools on the device. Both run here on
the same model and the same chats, alternating, and their pooled values are compared.

    python benchmarks/activations.py --json activations.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from common import (
    console,
    interleave,
    machine,
    print_table,
    rate,
    save,
    set_threads,
    trait_chats,
)
from torch import Tensor

from personascope.inference.activations import EncodedChat, read_activations
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model


def reference_read(handle: ModelHandle, chats: list[EncodedChat], layer: int, grad: bool = True) -> Tensor:
    """The reference loop: batch 1, every hidden state and the logits; `[N, d]` response means at `layer`.

    `grad=True` keeps autograd on, as the reference code does (it has no `no_grad`).
    """
    model, device = handle.model, handle.device
    out = []
    with torch.set_grad_enabled(grad):
        for chat in chats:
            ids = torch.tensor([chat.ids], device=device)
            outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            out.append(outputs.hidden_states[layer][:, chat.prompt_len :].mean(dim=1).detach().float().cpu())
            del outputs
    return torch.cat(out)


def personascope_read(handle: ModelHandle, chats: list[EncodedChat], layers: list[int], **kwargs: Any) -> Tensor:
    """`read_activations` for the response means: `[N, d]` at `layers[0]` (further layers only add work)."""
    return read_activations(handle, chats, layers, ["response_avg"], progress=False, **kwargs)["response_avg"][:, 0]


def weight_bound(handle: ModelHandle, layer: int) -> float:
    """The most a reader that stops after `layer` can gain over the full model with logits, when both are
    compute-bound: each weight is one multiply-add per token, so the ratio of the weights each one uses (all
    decoder layers + the LM head, vs decoder layers 1..`layer`). Attention scores are left out (small here)."""
    sizes = [sum(p.numel() for p in block.parameters()) for block in handle.layers]
    head = handle.model.get_output_embeddings().weight.numel()
    return (sum(sizes) + head) / sum(sizes[:layer])


def compare(ours: Tensor, reference: Tensor, min_cosine: float) -> dict[str, Any]:
    """How far two `[N, d]` readings are apart; `same_values` when every row's cosine reaches `min_cosine` and
    no element differs by more than 1% of the reference's largest magnitude."""
    diff = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min().item()
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale else 0.0,
        "min_cosine": cosine,
        "same_values": bool(cosine >= min_cosine and diff <= 0.01 * scale),
    }


def run(args: argparse.Namespace, handle: ModelHandle | None = None) -> dict[str, Any]:
    """Time both readers on the same chats, compare their values, print a table and return the figures."""
    set_threads(args.threads)
    handle = handle or load_model(args.model)
    chats = trait_chats(handle, args.rows, args.trait, shortest=args.shortest, longest=args.longest)
    tokens = sum(len(c.ids) for c in chats)
    budget = {k: v for k, v in (("token_budget", args.token_budget), ("max_batch", args.max_batch)) if v}

    def cases(rows: list[EncodedChat]) -> dict[str, Any]:
        out = {
            "reference": lambda: reference_read(handle, rows, args.layer),
            "personascope": lambda: personascope_read(handle, rows, [args.layer], **budget),
        }
        if args.variants:  # where the speed comes from
            out["reference, no autograd"] = lambda: reference_read(handle, rows, args.layer, grad=False)
            out["personascope, all layers"] = lambda: personascope_read(
                handle, rows, [args.layer, handle.num_layers], **budget)
        return out

    timed = cases(chats)
    console.print(f"{handle.name}: {len(chats)} chats, {tokens:,} tokens, layer {args.layer}; "
                  f"{args.repeats} interleaved repeats of: {', '.join(timed)}")
    interleave(cases(chats[:2]), 1, handle.device)  # warm-up: first calls allocate and pick kernels
    times, results = interleave(timed, args.repeats, handle.device)
    speeds = {name: rate(tokens, t) for name, t in times.items()}
    check = compare(results["personascope"], results["reference"], args.min_cosine)
    print_table(
        f"Activation reading ({handle.name}, layer {args.layer}, {len(chats)} chats, {tokens:,} tokens)",
        ["method", "best s", "tokens/s", "× reference"],
        [[name, tokens / speeds[name], speeds[name], speeds[name] / speeds["reference"]] for name in timed],
    )
    bound = weight_bound(handle, args.layer)
    console.print(f"compute-bound ceiling of the ratio (weights used per token): {bound:.2f}×")
    console.print(f"same values: {check['same_values']} (max abs diff {check['max_abs_diff']:.2e}, "
                  f"max rel diff {check['max_rel_diff']:.2e}, min cosine {check['min_cosine']:.7f})")
    figures = {
        "benchmark": "activations",
        "machine": machine(handle.device),
        "model": handle.name,
        "dtype": str(handle.dtype),
        "layer": args.layer,
        "rows": len(chats),
        "tokens": tokens,
        "repeats": args.repeats,
        "seconds": times,
        "tokens_per_s": speeds,
        "speedup": speeds["personascope"] / speeds["reference"],
        "compute_bound_speedup": bound,
        **check,
    }
    save(args.json, figures)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded model)")
    p.add_argument("--rows", type=int, default=64, help="chats to read (default 64)")
    p.add_argument("--trait", default="evil", help="built-in trait whose prompts and questions make the chats")
    p.add_argument("--shortest", type=int, default=16, help="shortest response, tokens (default 16)")
    p.add_argument("--longest", type=int, default=384, help="longest response, tokens (default 384)")
    p.add_argument("--layer", type=int, default=20, help="layer to read (default 20)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each method, interleaved (default 2)")
    p.add_argument("--token-budget", type=int, default=None, help="personascope's padded tokens per batch")
    p.add_argument("--max-batch", type=int, default=None, help="personascope's rows per batch")
    p.add_argument("--min-cosine", type=float, default=0.9999, help="per-row cosine for same_values")
    p.add_argument("--variants", action="store_true",
                   help="also time the reference without autograd and personascope reading every layer")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
