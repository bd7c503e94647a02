"""The GPU benchmark, prepared for a session lent a GPU: a Qwen2.5-7B-shaped model in bf16, in one call.

Model weights cannot travel to the device machine, so the model is built from Qwen2.5-7B-Instruct's config
(written out below) with random weights: the work per token, and so the speed, does not depend on the values.
Measured, in this order (figures are saved after each part, so a run cut short still reports what it did):

1. the ceilings: a large bf16 matmul's rate and a device-to-device copy's bandwidth;
2. activation reading (pooled response means at one layer) by personascope vs the reference-style loop
   (batch 1, autograd on, every hidden state, full logits), same chats, same values; personascope's rate as a
   fraction of the matmul peak, counting the FLOPs of the layers it actually runs;
3. generation, plain and steered, with HF `generate` eager (dynamic cache) and with a static cache compiled
   by `torch.compile` (fullgraph, so a hook that broke the graph would fail loudly), against the
   memory-bandwidth bound (bytes of the weights read per step ÷ measured bandwidth). Greedy tokens of the
   compiled steered run must equal the eager steered run's and differ from plain;
4. unsteered generation with vLLM (`--engine vllm`) on the same model (saved to a temporary directory) and the
   same prompts, at the eager batch sizes (against HF eager plain) and at larger ones, when vLLM is installed
   (`pip install vllm`, or .venv-vllm); greedy, exactly `--new-tokens` per row.

On the device machine (torch and transformers are there; personascope travels as source):
    PYTHONPATH=src python3 benchmarks/gpu.py
It writes `$OUT/gpu.json` when `$OUT` is set (else `--json PATH`). Its code paths run on a CPU with a tiny model:
    python benchmarks/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch
from activations import compare, personascope_read, reference_read
from common import (
    console,
    interleave,
    left_padded,
    machine,
    print_table,
    rate,
    save,
    synchronize,
)
from torch import Tensor

from personascope.hooks import steer
from personascope.inference.activations import EncodedChat
from personascope.model import ModelHandle

#: Qwen/Qwen2.5-7B-Instruct's config.json (architecture fields).
QWEN25_7B = dict(
    model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False,
    sliding_window=131072, max_window_layers=28, bos_token_id=151643, eos_token_id=151645,
)
#: The same architecture, small enough to run every code path on a CPU in seconds (one 64-wide head: vLLM's CPU
#: attention has no kernel for heads narrower than 32).
TINY = {**QWEN25_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 1,
        "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 2048, "bos_token_id": 1,
        "eos_token_id": 2}
PAD = 0


@dataclass
class TokenIds:
    """Stands in for a tokenizer: the benchmark feeds token ids, so only the pad id is used."""

    pad_token_id: int = PAD


def build_model(config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> ModelHandle:
    """A random-weight causal LM of `config`, created directly on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to(device).eval()
    model.generation_config.pad_token_id = PAD
    return ModelHandle(model=model, tokenizer=TokenIds(), name=f"random-{config['model_type']}")


def synthetic_chats(rows: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int]) -> list[EncodedChat]:
    """Chats of random token ids: prompt lengths uniform in `prompt`, response lengths log-uniform in `response`."""
    rng = random.Random(0)
    chats = []
    for i in range(rows):
        p = rng.randint(*prompt)
        r = round(response[0] * (response[1] / response[0]) ** rng.random())
        chats.append(EncodedChat(str(i), [rng.randrange(3, vocab) for _ in range(p + r)], p))
    return chats


# -- ceilings ---------------------------------------------------------------------------------------------


def _median_seconds(fn: Any, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of an `n×n×n` matrix product on random data (median of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _median_seconds(lambda: torch.mm(a, b, out=out), device, 3, 10)


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, 3, 10)


# -- FLOPs and bytes --------------------------------------------------------------------------------------


def forward_flops(config: dict[str, Any], lengths: list[int], layers: int, logits: bool = False) -> float:
    """Matmul FLOPs of running `layers` decoder layers (and the LM head if `logits`) over chats of `lengths`
    tokens: 2·params per token for the projections, plus causal attention (each token attends to itself and
    the tokens before it)."""
    d, ff = config["hidden_size"], config["intermediate_size"]
    head = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    params = d * q + 2 * d * kv + q * d + 3 * d * ff
    total = 0.0
    for t in lengths:
        total += layers * (2 * params * t + 2 * q * t * (t + 1))  # QKᵀ and AV: 2·2·q per (query, key) pair, halved
        if logits:
            total += 2 * d * config["vocab_size"] * t
    return total


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decoding step reads: every parameter except the input embedding table (only the
    batch's rows of it are gathered)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


# -- generation -------------------------------------------------------------------------------------------


def compile_config(device: torch.device, backend: str) -> Any:
    """fullgraph (a graph break in a hook fails), CUDA graphs on a GPU; allowed on a CPU for testing."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return config


def decode(handle: ModelHandle, ids: Tensor, mask: Tensor, new_tokens: int, **kwargs: Any) -> Tensor:
    """Greedy decoding of exactly `new_tokens` tokens per row; returns the new tokens `[B, new_tokens]`."""
    with torch.inference_mode():
        out = handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, **kwargs)
    return out[:, ids.shape[1] :]


def first_difference(a: Tensor, b: Tensor) -> int | None:
    """The first decoding step at which any row of `a` and `b` differs, or None when they are equal."""
    differs = (a != b).any(0).nonzero()
    return None if len(differs) == 0 else int(differs[0])


class Benchmark:
    """The parts of the run, sharing the model, the chats and the figures (saved after each part)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = TINY if args.tiny else QWEN25_7B
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = args.dtype or ("float32" if args.tiny else "bfloat16")
        self.dtype = getattr(torch, dtype_name)
        self.started = time.perf_counter()
        self.json = args.json or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else None)
        self.figures: dict[str, Any] = {"benchmark": "gpu", "machine": machine(self.device), "dtype": dtype_name,
                                        "config": self.config, "skipped": []}
        self.table: list[list[Any]] = []
        self.handle: ModelHandle | None = None
        self.new_tokens = 8 if args.tiny else args.new_tokens
        self.eager_tokens: dict[int, dict[str, Tensor]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def part(self, name: str, fn: Any) -> None:
        """Run one part unless the time budget is spent; record and save its figures."""
        if self.elapsed() > self.args.budget_s:
            console.print(f"[yellow]skipped {name}: {self.elapsed():.0f} s used of {self.args.budget_s:.0f} s[/]")
            self.figures["skipped"].append(name)
            return
        console.print(f"[bold]{name}[/] (at {self.elapsed():.0f} s)")
        start = time.perf_counter()
        try:
            self.figures[name] = fn()
        except Exception as exc:  # keep the other parts' figures: a lease is too short to rerun everything
            console.print_exception()
            self.figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.table.append([name, "FAILED", f"{type(exc).__name__}: {str(exc)[:60]}"])
        self.figures[name]["part_seconds"] = round(time.perf_counter() - start, 1)
        save(self.json, self.figures)

    # -- parts ----------------------------------------------------------------------------------------------

    def ceilings(self) -> dict[str, Any]:
        n = 8192 if self.device.type == "cuda" else 512
        peak = matmul_peak(n, self.dtype, self.device)
        bandwidth = copy_bandwidth(2**31 if self.device.type == "cuda" else 2**26, self.device)
        self.table += [["matmul peak", f"{peak / 1e12:.3g} TFLOP/s", f"{n}³ {self.figures['dtype']}"],
                       ["copy bandwidth", f"{bandwidth / 1e9:.3g} GB/s", "read + write"]]
        return {"matmul_flops_per_s": peak, "matmul_n": n, "bandwidth_bytes_per_s": bandwidth}

    def model(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.handle = build_model(self.config, self.dtype, self.device)
        params = sum(p.numel() for p in self.handle.model.parameters())
        return {"parameters": params, "build_seconds": round(time.perf_counter() - start, 1),
                "weight_bytes_per_step": weight_bytes_per_step(self.handle.model)}

    def activations(self) -> dict[str, Any]:
        args, handle = self.args, self.handle
        assert handle is not None
        rows = 12 if args.tiny else args.rows
        chats = synthetic_chats(rows, self.config["vocab_size"], (8, 24) if args.tiny else (40, 120),
                                (4, 40) if args.tiny else (32, 512))
        lengths = [len(c.ids) for c in chats]
        tokens = sum(lengths)
        layer = min(args.layer, handle.num_layers)
        cases = {"reference": lambda: reference_read(handle, chats, layer)}
        for budget in args.token_budgets:
            cases[f"personascope, budget {budget}"] = (
                lambda b=budget: personascope_read(handle, chats, [layer], token_budget=b, max_batch=256))
        # Warm-up: kernels, handles and the allocator's pool (personascope's whole run: its first batch is
        # its largest; a few rows for the reference, whose buffers are small).
        interleave({**cases, "reference": lambda: reference_read(handle, chats[:4], layer)}, 1, self.device)
        times, results = interleave(cases, args.repeats, self.device)
        speeds = {name: rate(tokens, t) for name, t in times.items()}
        best = max((n for n in cases if n != "reference"), key=speeds.__getitem__)
        check = compare(results[best], results["reference"], args.min_cosine)
        ours_flops = forward_flops(self.config, lengths, layer)
        reference_flops = forward_flops(self.config, lengths, handle.num_layers, logits=True)
        peak = self.figures.get("ceilings", {}).get("matmul_flops_per_s")
        fraction = {n: s * ours_flops / tokens / peak for n, s in speeds.items() if n != "reference"} if peak else {}
        for name in cases:
            note = (f"{100 * fraction[name]:.0f}% of matmul peak" if name in fraction else
                    f"{reference_flops / ours_flops:.1f}× the FLOPs")
            self.table.append([f"activations: {name}", f"{speeds[name]:,.0f} tokens/s",
                               f"{speeds[name] / speeds['reference']:.2f}× ref; {note}"])
        self.table.append(["activations: same values", str(check["same_values"]),
                           f"min cosine {check['min_cosine']:.5f}, max rel diff {check['max_rel_diff']:.1e}"])
        return {"mean_norm": float(results["reference"].norm(dim=-1).mean()),
                "rows": rows, "tokens": tokens, "layer": layer, "seconds": times, "tokens_per_s": speeds,
                "speedup": speeds[best] / speeds["reference"], "best": best, "flops_per_token": ours_flops / tokens,
                "reference_flops_per_token": reference_flops / tokens, "fraction_of_peak": fraction, **check}

    def _prompts(self, batch: int) -> tuple[Tensor, Tensor]:
        """`batch` left-padded prompts of random ids (the same ones for every case at that batch size)."""
        rng = random.Random(batch)
        shortest, longest = (16, 48) if self.args.tiny else (60, 120)
        prompts = [[rng.randrange(3, self.config["vocab_size"]) for _ in range(rng.randint(shortest, longest))]
                   for _ in range(batch)]
        return left_padded(prompts, PAD, self.device)

    def _pair(self, batch: int, label: str, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Plain and steered decoding of the batch's prompts, alternating; the first run of each warms up (and,
        on the static path, compiles its graph). Returns the timings and each case's tokens."""
        handle, layer = self.handle, min(self.args.layer, self.config["num_hidden_layers"])
        assert handle is not None
        ids, mask = self._prompts(batch)
        new_tokens = self.new_tokens
        direction = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(1))
        # As long as a typical activation at this layer: strong enough to change the greedy tokens.
        vector = direction / direction.norm() * self.figures.get("activations", {}).get("mean_norm", 1.0)

        def steered() -> Tensor:
            with steer(handle, vector, layer, coef=1.0):
                return decode(handle, ids, mask, new_tokens, **kwargs)

        cases = {f"{label} plain": lambda: decode(handle, ids, mask, new_tokens, **kwargs),
                 f"{label} steered": steered}
        warmup, _ = interleave(cases, 1, self.device)
        times, tokens = interleave(cases, self.args.repeats, self.device)
        runs = {name: {"seconds": t, "tokens_per_s": rate(batch * new_tokens, t),
                       "warmup_seconds": round(warmup[name][0], 1)} for name, t in times.items()}
        for name, run in runs.items():
            bound = self._bound(batch)
            note = f"{100 * run['tokens_per_s'] / bound:.0f}% of bandwidth bound" if bound else ""
            self.table.append([f"generate b={batch}: {name}", f"{run['tokens_per_s']:,.1f} tokens/s", note])
        return runs, tokens

    def _bound(self, batch: int) -> float | None:
        """Tokens/s if each decoding step only read the weights once at the measured copy bandwidth."""
        bandwidth = self.figures.get("ceilings", {}).get("bandwidth_bytes_per_s")
        return batch * bandwidth / self.figures["model"]["weight_bytes_per_step"] if bandwidth else None

    def eager_generation(self) -> dict[str, Any]:
        out: dict[str, Any] = {"new_tokens": self.new_tokens, "batches": {}}
        for batch in self.args.batches:
            runs, tokens = self._pair(batch, "eager")
            self.eager_tokens[batch] = tokens
            figures = {"runs": runs, "bandwidth_bound_tokens_per_s": self._bound(batch),
                       "steered_differs_from_plain": not torch.equal(tokens["eager steered"], tokens["eager plain"])}
            if figures["bandwidth_bound_tokens_per_s"]:
                self.table.append([f"generate b={batch}: bandwidth bound",
                                   f"{figures['bandwidth_bound_tokens_per_s']:,.0f} tokens/s",
                                   f"{self.figures['model']['weight_bytes_per_step'] / 1e9:.3g} GB of weights/step"])
            out["batches"][str(batch)] = figures
        return out

    def compiled_generation(self) -> dict[str, Any]:
        config = compile_config(self.device, self.args.compile_backend)
        out: dict[str, Any] = {"new_tokens": self.new_tokens, "backend": self.args.compile_backend,
                               "mode": config.mode, "batches": {}}
        for batch in self.args.compile_batches:
            runs, tokens = self._pair(batch, "compiled", cache_implementation="static", compile_config=config)
            plain, steered = runs["compiled plain"]["tokens_per_s"], runs["compiled steered"]["tokens_per_s"]
            figures: dict[str, Any] = {"runs": runs, "steered_cost": 1 - steered / plain,
                                       "steered_differs_from_plain": not torch.equal(tokens["compiled steered"],
                                                                                     tokens["compiled plain"])}
            eager = self.eager_tokens.get(batch)
            if eager is not None:
                eager_plain = self.figures["eager_generation"]["batches"][str(batch)]["runs"]["eager plain"]
                figures["vs_eager_plain"] = plain / eager_plain["tokens_per_s"]
                figures["plain_first_difference"] = first_difference(tokens["compiled plain"], eager["eager plain"])
                figures["steered_first_difference"] = first_difference(tokens["compiled steered"],
                                                                       eager["eager steered"])
                self.table.append([f"generate b={batch}: compiled steered = eager steered",
                                   str(figures["steered_first_difference"] is None),
                                   f"plain = eager plain: {figures['plain_first_difference'] is None}; "
                                   f"{figures['vs_eager_plain']:.2f}× eager"])
            self.table.append([f"generate b={batch}: compiled steering cost", f"{100 * figures['steered_cost']:+.1f}%",
                               f"steered differs from plain: {figures['steered_differs_from_plain']}"])
            out["batches"][str(batch)] = figures
        return out

    def vllm_generation(self) -> dict[str, Any]:
        """vLLM's tokens/s on the eager cases' prompts (and larger batches), from the model saved to disk."""
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError:
            self.table.append(["generate: vLLM", "skipped", "vllm is not installed"])
            return {"skipped": "vllm is not installed"}
        handle = self.handle
        assert handle is not None
        out: dict[str, Any] = {"new_tokens": self.new_tokens, "batches": {}}
        with tempfile.TemporaryDirectory(prefix="gpu-bench-model-") as folder:
            start = time.perf_counter()
            handle.model.save_pretrained(folder)
            out["save_seconds"] = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            llm = LLM(model=folder, skip_tokenizer_init=True, dtype=self.figures["dtype"], seed=0,
                      gpu_memory_utilization=self.args.vllm_memory, max_model_len=1024 if self.args.tiny else 4096)
            out["startup_seconds"] = round(time.perf_counter() - start, 1)
            params = SamplingParams(temperature=0.0, max_tokens=self.new_tokens, min_tokens=self.new_tokens,
                                    ignore_eos=True, detokenize=False)
            for batch in sorted(set(self.args.batches) | set(self.args.vllm_batches)):
                ids, mask = self._prompts(batch)
                prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist())
                           for row, m in zip(ids.cpu(), mask.cpu())]
                llm.generate(prompts, params, use_tqdm=False)  # warm-up (graph capture for this batch shape)
                seconds = []
                for _ in range(self.args.repeats):
                    start = time.perf_counter()
                    results = llm.generate(prompts, params, use_tqdm=False)
                    seconds.append(time.perf_counter() - start)
                tokens = torch.tensor([list(r.outputs[0].token_ids) for r in results], device=self.device)
                figures: dict[str, Any] = {"seconds": seconds,
                                           "tokens_per_s": rate(batch * self.new_tokens, seconds)}
                eager = self.figures.get("eager_generation", {}).get("batches", {}).get(str(batch))
                note = ""
                if eager and "runs" in eager:
                    hf = eager["runs"]["eager plain"]["tokens_per_s"]
                    figures["vs_hf_eager_plain"] = figures["tokens_per_s"] / hf
                    if batch in self.eager_tokens:
                        figures["greedy_first_difference"] = first_difference(tokens,
                                                                              self.eager_tokens[batch]["eager plain"])
                    note = f"{figures['vs_hf_eager_plain']:.2f}× HF eager plain"
                self.table.append([f"generate b={batch}: vLLM", f"{figures['tokens_per_s']:,.1f} tokens/s", note])
                out["batches"][str(batch)] = figures
            del llm
        return out

    def run(self) -> dict[str, Any]:
        console.print(f"device {self.device}, {self.figures['dtype']}, "
                      f"{'tiny' if self.args.tiny else 'Qwen2.5-7B'}-shaped random model")
        self.part("ceilings", self.ceilings)
        self.part("model", self.model)
        self.part("activations", self.activations)
        self.part("eager_generation", self.eager_generation)
        if self.args.compile_batches:
            self.part("compiled_generation", self.compiled_generation)
        else:
            console.print("[yellow]the static-cache compiled path was skipped (no --compile-batches)[/]")
        if self.args.vllm_batches is not None:
            self.part("vllm_generation", self.vllm_generation)
        self.figures["total_seconds"] = round(self.elapsed(), 1)
        save(self.json, self.figures)
        print_table(f"GPU benchmark ({self.figures['machine'].get('gpu', self.device.type)}, "
                    f"{self.figures['dtype']})", ["measure", "value", "note"], self.table)
        return self.figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU test)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--dtype", help="default bfloat16 (float32 with --tiny)")
    p.add_argument("--rows", type=int, default=256, help="chats for activation reading (default 256)")
    p.add_argument("--layer", type=int, default=20, help="layer read and steered (default 20)")
    p.add_argument("--token-budgets", type=int, nargs="+", default=[8192, 32768],
                   help="personascope token budgets to time (default 8192 32768)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each case (default 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="generation batch sizes (default 1 16)")
    p.add_argument("--compile-batches", type=int, nargs="*", default=[1],
                   help="batch sizes also run compiled (default 1; each costs two compilations; none to skip)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--vllm-batches", type=int, nargs="*", default=[256],
                   help="batch sizes vLLM also runs, beyond --batches (default 256; omit the option's values to "
                   "run only --batches)")
    p.add_argument("--vllm-memory", type=float, default=0.5,
                   help="fraction of the GPU vLLM may take (the HF model stays loaded; default 0.5)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--min-cosine", type=float, default=0.999, help="per-row cosine for same_values (bf16)")
    p.add_argument("--budget-s", type=float, default=420, help="skip parts that would start after this many seconds")
    p.add_argument("--json", help="write the figures here (default $OUT/gpu.json when $OUT is set)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return Benchmark(parser().parse_args(argv)).run()


if __name__ == "__main__":
    main()
