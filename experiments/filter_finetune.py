"""Screening that filters, end to end on the embedded model: does dropping the high-ΔP rows remove the shift?

1. Extract a persona vector (`personascope.extract`, the same small settings as `preventative_steering.py`; its
   run holds the model's answers to the trait's extraction questions under the pos system prompts).
2. Build a training set with planted trait rows: the model's own answers with no system prompt ("ordinary", as many
   as the trait answers) plus `--planted` of the answers given under the trait's pos system prompts, all stored
   WITHOUT a system prompt, shuffled; each row carries `planted` (true/false) for counting, never for scoring.
3. Screen it with the vector (`screen_dataset`, ΔP with `--base`) and filter with `--drop-top P` percent.
   A control drops the same number of rows at random.
4. Fine-tune a LoRA adapter on each of: the unfiltered set, the ΔP-filtered set, the randomly filtered set — the
   same number of optimiser steps each (so data size is not what differs), same seed.
5. Measure each adapter with `personascope.apply.gate` (trait units: the share of the base's plain →
   system-prompted gap) and write `experiments/results/filter_finetune.{md,json}` plus each gate's Markdown/PNG.

Every stage resumes from its run directory (`--work`).

    python experiments/filter_finetune.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from personascope.apply.finetune import FinetuneConfig, finetune
from personascope.apply.gate import DEFAULT_MAX_SHIFT, GateProbe, run_gate
from personascope.apply.gate_report import write_markdown
from personascope.apply.screen import screen_dataset
from personascope.extract.pipeline import ExtractConfig, extract
from personascope.io.data import load_samples, write_rows
from personascope.io.files import write_json
from personascope.io.rundir import JsonlLog
from personascope.model import DEFAULT_MODEL, load_model
from personascope.traits import load_trait
from personascope.vector import PersonaVector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preventative_steering import StageTimes, ordinary_answers  # noqa: E402  (a sibling script)

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ("unfiltered", "filtered", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", default="optimistic", help="built-in trait name or trait file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=Path("runs/filter_finetune"), help="run directory")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .md and .json go")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of every generated answer")
    parser.add_argument("--planted", type=int, default=50, help="trait rows planted among the ordinary ones")
    parser.add_argument("--base", default="prompt-last", help="screen's base reading: prompt-last or generate")
    parser.add_argument("--drop-top", type=float, default=40.0, help="percentage of rows by ΔP to drop")
    parser.add_argument("--steps", type=int, default=19, help="optimiser steps of every fine-tune")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def mixed_dataset(work: Path, handle: Any, questions: list[str], args: argparse.Namespace) -> Path:
    """`data/mixed.jsonl`: every ordinary answer plus `--planted` trait answers, shuffled, no system prompts."""
    path = work / "data" / "mixed.jsonl"
    if path.exists():
        return path
    rows = JsonlLog(work / "extract" / "responses.jsonl").read().values()
    trait = [r for r in rows if r["split"] == "extract" and r["polarity"] == "pos" and r["response"].strip()]
    per_question = max(1, round(len(trait) / len(questions)))
    ordinary = [r for r in ordinary_answers(handle, questions, per_question, args, work / "ordinary.jsonl")
                if r["response"].strip()]
    rng = random.Random(args.seed)
    chosen = [(r, True) for r in rng.sample(trait, min(args.planted, len(trait)))] + [(r, False) for r in ordinary]
    rng.shuffle(chosen)
    write_rows(({"id": r["id"], "planted": planted,
                 "messages": [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["response"]}]} for r, planted in chosen), path)
    return path


def random_drop(data: Path, out: Path, count: int, seed: int) -> Path:
    """The control: `data` without `count` rows drawn at random (lines kept as they were)."""
    if not out.exists():
        lines = [line for line in data.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
        dropped = set(random.Random(seed + 1).sample(range(len(lines)), count))
        out.write_text("".join(line for i, line in enumerate(lines) if i not in dropped), encoding="utf-8")
    return out


def planted_count(path: Path) -> tuple[int, int]:
    """(planted rows, all rows) of a JSONL dataset."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(bool(r["planted"]) for r in rows), len(rows)


def train(out: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not (out / "finetune.json").exists():
        samples, _ = load_samples(data)
        config = FinetuneConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lr=args.lr, batch_size=args.batch_size,
                                max_steps=args.steps, seed=args.seed, logging_steps=5)
        finetune(load_model(args.model), samples, out, config)
    return json.loads((out / "finetune.json").read_text())


def write_results(results: dict[str, Any], path_md: Path, path_json: Path) -> None:
    write_json(path_json, results)
    s = results["screen"]
    lines = [
        f"# Screening that filters, on {results['model']} ({results['trait']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Training set: {s['n_rows']} rows, {s['planted']} of them planted trait answers (given under the trait's "
        "system prompts, stored without them), the rest the model's own answers with no system prompt. "
        f"Screened with ΔP (base `{results['settings']['base']}`, layer {s['layer']}); the filter dropped the top "
        f"{results['settings']['drop_top']:g}% by ΔP ({s['dropped']} rows, {s['planted_dropped']} of them planted); "
        f"the control dropped {s['dropped']} rows at random ({s['random_planted_dropped']} planted). "
        f"AUROC of ΔP for planted vs ordinary rows: {s['auroc']:.3f}.",
        "",
        f"Every adapter: LoRA r={results['settings']['lora_r']}, {results['settings']['steps']} optimiser steps of "
        f"{results['settings']['batch_size']} rows, lr {results['settings']['lr']:g}, seed "
        f"{results['settings']['seed']}. Gate: `personascope.apply.gate` at layer {results['gate_layer']} "
        f"(limit {DEFAULT_MAX_SHIFT:g} trait units).",
        "",
        "| training data | rows | planted rows | shift (trait units) | projection shift | gate | train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        r = results["runs"][name]
        lines.append(f"| {name} | {r['rows']} | {r['planted']} | {r['units']:+.3f} | {r['shift']:+.4f} | "
                     f"{'pass' if r['passed'] else 'FAIL'} | {r['train_loss']:.3f} |")
    lines += ["", f"System-prompt gap of the base (the trait unit): {results['gap']:+.4f} along the unit vector.",
              "", f"Time: {results['timing']['wall_s']:.0f} s wall ({results['timing']['note']}).", ""]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    args = parse_args(argv)
    work = args.work
    times = StageTimes(work / "timings.json")
    handle = load_model(args.model)
    spec = load_trait(args.trait)
    with times.stage("extract", done=(work / "extract" / "vector.safetensors").exists()):
        extraction = extract(ExtractConfig(trait=args.trait, model=handle.name, max_new_tokens=args.max_new_tokens,
                                           seed=args.seed), work / "extract", handle=handle)
    vector = PersonaVector.load(extraction.vector, handle)
    with times.stage("data", done=(work / "data" / "mixed.jsonl").exists()):
        data = mixed_dataset(work, handle, list(spec.extract_questions), args)
    scored, filtered = work / "screen" / "scored.jsonl", work / "screen" / "filtered.jsonl"
    with times.stage("screen", done=filtered.exists()):
        if not filtered.exists():
            screen_dataset(handle, data, vector, scored, base=args.base, top_percent=args.drop_top,
                           filtered_out=filtered, progress=False)
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    planted, total = planted_count(data)
    n_dropped = total - planted_count(filtered)[1]
    control = random_drop(data, work / "screen" / "random.jsonl", n_dropped, args.seed)
    sets = {"unfiltered": data, "filtered": filtered, "random": control}
    base_handle = handle
    probe = GateProbe.from_spec(vector, spec)
    runs: dict[str, Any] = {}
    for name in RUNS:
        out = work / "adapters" / name
        with times.stage(f"train/{name}", done=(out / "finetune.json").exists()):
            record = train(out, sets[name], args)
        with times.stage(f"gate/{name}"):
            report = run_gate(base_handle, load_model(str(out)), [probe], progress=False)
            write_markdown(report, args.results / "filter_finetune" / f"gate-{name}.md")
        trait = report.traits[0]
        runs[name] = {"rows": planted_count(sets[name])[1], "planted": planted_count(sets[name])[0],
                      "units": trait.units, "shift": trait.shift, "passed": trait.passed,
                      "train_loss": record["train_loss"], "steps": record["steps"]}
    results = {
        "trait": spec.name, "model": handle.name,
        "command": "python experiments/filter_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "results")} | {"work": str(work)},
        "screen": {"n_rows": total, "planted": planted, "layer": vector.layer(), "dropped": n_dropped,
                   "planted_dropped": planted - runs["filtered"]["planted"],
                   "random_planted_dropped": planted - runs["random"]["planted"],
                   "auroc": roc_auc_score([r["planted"] for r in rows], [r["delta_p"] for r in rows])},
        "gate_layer": trait.layer, "gap": trait.gap, "runs": runs,
        "timing": {"wall_s": sum(t["wall_s"] for t in times.times.values()), "stages": times.times,
                   "note": "sum over the stages behind these numbers, each timed when it ran; no model loading"},
    }
    write_results(results, args.results / "filter_finetune.md", args.results / "filter_finetune.json")
    print((args.results / "filter_finetune.md").read_text())
    return results


if __name__ == "__main__":
    main()
