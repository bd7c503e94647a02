"""Preventative steering, end to end on the embedded model (Chen et al. 2025, §5.2, at toy scale).

1. Extract a persona vector with `personascope.extract` (small settings). Its run holds the model's own answers
   to the trait's extraction questions under the pos and neg system prompts, and to the held-out eval questions.
2. Build two training sets on the same extraction questions, both stored WITHOUT a system prompt:
   `trait` — the answers given under the trait's pos system prompts; `ordinary` — answers sampled with no system
   prompt (the model's own default behaviour), as many per question.
3. Fine-tune LoRA adapters with one seed: (a) ordinary, (b) trait, (c) trait with `PreventativeSteering` toward
   the trait at the vector's best layer.
4. Measure each adapter, loaded from disk with no steering: the projection shift of the last-prompt-token
   activation on the held-out eval questions versus the base model (`personascope.shift`), and the likelihood
   margin of held-out pos vs neg answers (`personascope.evaluate`), plus judged trait scores with `--judge`.
5. Write `experiments/results/preventative_steering.{md,json}`.

Every stage resumes from its run directory (`--work`); rerunning with other settings is refused.

    python experiments/preventative_steering.py            # defaults: optimistic, ~20-25 min alone on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from personascope.data import load_samples, write_rows
from personascope.evaluate import likelihood_margin, plain_chats, steered_answers
from personascope.extract import ExtractConfig, extract
from personascope.finetune import FinetuneConfig, finetune
from personascope.generate import SamplingConfig, generate_responses
from personascope.guard import PreventativeSteering
from personascope.judges import judge_trait, make_judge
from personascope.models import DEFAULT_MODEL, ModelHandle, load_model
from personascope.rundir import JsonlLog, open_run, write_json
from personascope.shift import projection_shift
from personascope.traits import load_trait
from personascope.vector import PersonaVector

RUNS = ("ordinary", "trait", "trait_guarded")
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageTimes:
    """Wall and CPU seconds per stage, kept in a JSON file so that a resumed run still reports each stage's cost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def stage(self, name: str, done: bool = False) -> Iterator[None]:
        """Time the block; keep the earlier timing when the stage was `done` before (resumed, not rerun)."""
        wall, cpu = time.perf_counter(), _cpu_s()
        yield
        if not done or name not in self.times:
            self.times[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu_s() - cpu, 1)}
            write_json(self.path, self.times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", default="optimistic", help="built-in trait name or trait file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=Path("runs/preventative_steering"), help="run directory")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .md and .json go")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of every generated answer")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=64)
    parser.add_argument("--guard-coef", type=float, default=None, help="default: the vector's best coefficient")
    parser.add_argument("--guard-layers", default=None, help="default: the vector's best layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", default="none", help="judge spec for trait scores (openai:MODEL, …) or none")
    return parser.parse_args(argv)


def ordinary_answers(handle: ModelHandle, questions: list[str], per_question: int, args: argparse.Namespace,
                     path: Path) -> list[dict[str, Any]]:
    """Answers with no system prompt, `per_question` samples each (resumable rows in `path`)."""
    log = JsonlLog(path)
    planned = [{"id": f"ordinary/q{q:02d}/s{s}", "question": question}
               for q, question in enumerate(questions) for s in range(per_question)]
    by_id = {row["id"]: row for row in planned}
    requests = [(row["id"], handle.chat_ids([{"role": "user", "content": row["question"]}])) for row in planned]
    generate_responses(handle, requests, SamplingConfig(args.max_new_tokens, temperature=1.0, seed=args.seed),
                       done=set(log.read()), description="Ordinary answers",
                       on_result=lambda r: log.append({**by_id[r.id], "response": r.text}))
    rows = log.read()
    return [rows[row["id"]] for row in planned]


def training_sets(work: Path, handle: ModelHandle, spec_questions: list[str], args: argparse.Namespace
                  ) -> dict[str, Path]:
    """`trait.jsonl` and `ordinary.jsonl`: question + answer, no system prompt, same questions and counts."""
    rows = JsonlLog(work / "extract" / "responses.jsonl").read().values()
    trait = [r for r in rows if r["split"] == "extract" and r["polarity"] == "pos" and r["response"].strip()]
    per_question = max(1, round(len(trait) / len(spec_questions)))
    ordinary = [r for r in ordinary_answers(handle, spec_questions, per_question, args, work / "ordinary.jsonl")
                if r["response"].strip()]
    paths = {}
    for name, source in (("trait", trait), ("ordinary", ordinary)):
        path = work / "data" / f"{name}.jsonl"
        if not path.exists():
            write_rows(({"id": r["id"], "messages": [{"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["response"]}]}
                        for r in source), path)
        paths[name] = path
    return paths


def train(name: str, data: Path, adapters: Path, vector: PersonaVector, layers: list[int], coef: float,
          args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune one adapter (skipped when its directory already holds one); returns its training record."""
    out = adapters / name
    if not (out / "finetune.json").exists():
        samples, _ = load_samples(data)
        handle = load_model(args.model)
        guard = None
        if name == "trait_guarded":
            guard = PreventativeSteering(vector, layers, coef, incremental=len(layers) > 1)
        config = FinetuneConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, seed=args.seed, logging_steps=5)
        finetune(handle, samples, out, config, guard=guard)
    return json.loads((out / "finetune.json").read_text())


def measure(adapter: Path | None, base: ModelHandle, vector: PersonaVector, layer: int, questions: list[str],
            pos: list, neg: list, judge: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Shift versus the base model, likelihood margin (and judged trait score) of one model, unsteered."""
    handle = base if adapter is None else load_model(str(adapter))
    shift = projection_shift(base, handle, vector, questions, progress=False)
    margin = likelihood_margin(handle, vector, layer, [0.0], pos, neg)[0]
    result = {"shift": shift["shift"], "relative_shift": shift["relative_shift"], "margin": margin,
              "shift_by_layer": {row["layer"]: round(row["shift"], 4) for row in shift["layers"]}}
    if judge is not None:
        answers = steered_answers(handle, questions, max_new_tokens=args.max_new_tokens)
        scores = [r.score for r in judge_trait(judge, spec, list(zip(questions, answers)))]
        scored = [s for s in scores if s is not None]
        result["trait_score"] = sum(scored) / len(scored) if scored else None
    return result


def write_results(results: dict[str, Any], path_md: Path, path_json: Path) -> None:
    write_json(path_json, results)
    layer, runs = results["vector"]["layer"], {name: results[name] for name in RUNS}
    judged = any("trait_score" in runs[name] for name in RUNS)
    head = "| run | training data | guard | shift (layer {l}) | relative shift | margin | Δ margin vs base | train loss |"
    lines = [
        f"# Preventative steering on {results['model']} ({results['trait_name']})",
        "",
        f"Command: `{results['command']}`",
        "",
        head.format(l=layer) + (" trait score |" if judged else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if judged else ""),
    ]
    base_margin = results["base"]["margin"]
    for name in RUNS:
        row = runs[name]
        guard = results["guard"]["describe"] if name == "trait_guarded" else "—"
        cells = [name, results["data"][name.replace("_guarded", "")], guard, f"{row['shift']:+.3f}",
                 f"{row['relative_shift']:+.3f}", f"{row['margin']:+.4f}", f"{row['margin'] - base_margin:+.4f}",
                 f"{row['train_loss']:.3f}"]
        if judged:
            cells.append(f"{row.get('trait_score'):.1f}" if row.get("trait_score") is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        f"| base | — | — | 0 | 0 | {base_margin:+.4f} | 0 | — |" + (
            f" {results['base']['trait_score']:.1f} |" if judged and results["base"].get("trait_score") is not None
            else (" — |" if judged else "")),
        "",
        "- **shift**: mean last-prompt-token activation on the trait's 20 held-out eval questions (no system "
        "prompt), fine-tuned minus base, projected on the unit vector at its best layer; relative = divided by "
        "the vector's norm there (the pos−neg gap it was made from).",
        "- **margin**: mean per-token log-likelihood of held-out trait-positive answers minus trait-negative "
        f"answers ({results['counts']['margin_pos']} + {results['counts']['margin_neg']} eval rows, no system "
        "prompt, unsteered).",
        f"- **vector**: {results['vector']['source']}",
        f"- **settings**: {json.dumps(results['settings'])}",
        f"- **time**: {results['timing']['wall_s']:.0f} s wall, {results['timing']['cpu_s']:.0f} s CPU "
        f"({results['timing']['note']})",
        "",
        "## Reading",
        "",
        *results["reading"],
    ]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text("\n".join(lines) + "\n")


def reading(runs: dict[str, Any]) -> list[str]:
    """What the numbers say, in words computed from them (nothing here is written by hand)."""
    o, t, g = (runs[n]["shift"] for n in RUNS)
    out = [
        f"- Trait data shifted the projection {'more' if t > o else 'NOT more'} than ordinary data "
        f"({t:+.3f} vs {o:+.3f}).",
        f"- The guard {'reduced' if g < t else 'did NOT reduce'} the shift on the same data and seed "
        f"({g:+.3f} vs {t:+.3f}; {100 * (1 - g / t):.0f}% of it removed)." if t else "- The trait run did not shift.",
    ]
    mo, mt, mg = (runs[n]["margin"] for n in RUNS)
    out.append(f"- Likelihood margin: ordinary {mo:+.4f}, trait {mt:+.4f}, guarded {mg:+.4f}.")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.work
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "results")}
    data_keys = ("trait", "model", "max_new_tokens", "seed")
    open_run(work, {k: settings[k] for k in data_keys}, stage="experiment")
    training = {k: v for k, v in settings.items() if k not in data_keys and k != "judge"}
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:10]
    adapters = open_run(work / "adapters" / key, training, stage="experiment")
    data_times, train_times = StageTimes(work / "timings.json"), StageTimes(adapters / "timings.json")
    handle = load_model(args.model)
    spec = load_trait(args.trait)

    with data_times.stage("extract", done=(work / "extract" / "vector.safetensors").exists()):
        extraction = extract(ExtractConfig(trait=args.trait, model=handle.name, max_new_tokens=args.max_new_tokens,
                                           seed=args.seed), work / "extract", handle=handle)
    vector = PersonaVector.load(extraction.vector, handle)
    layer = vector.layer()
    layers = [layer] if args.guard_layers is None else [int(x) for x in str(args.guard_layers).split(",")]
    coef = args.guard_coef if args.guard_coef is not None else vector.best_coef
    with data_times.stage("ordinary_answers", done=(work / "data" / "ordinary.jsonl").exists()):
        data = training_sets(work, handle, list(spec.extract_questions), args)
    records = {}
    for name in RUNS:
        with train_times.stage(f"train_{name}", done=(adapters / name / "finetune.json").exists()):
            records[name] = train(name, data[name.replace("_guarded", "")], adapters, vector, layers, coef, args)

    eval_rows = [r for r in JsonlLog(work / "extract" / "responses.jsonl").read().values()
                 if r["split"] == "eval" and r["response"].strip()]
    pos = plain_chats(handle, [r for r in eval_rows if r["polarity"] == "pos"])
    neg = plain_chats(handle, [r for r in eval_rows if r["polarity"] == "neg"])
    judge = make_judge(args.judge, cache_path=work / "judge_cache.sqlite")
    questions = list(spec.eval_questions)
    runs = {}
    with train_times.stage("measure"):
        base = measure(None, handle, vector, layer, questions, pos, neg, judge, spec, args)
        for name in RUNS:
            runs[name] = measure(adapters / name, handle, vector, layer, questions, pos, neg, judge, spec, args)
            runs[name].update(train_loss=records[name]["train_loss"], steps=records[name]["steps"],
                              samples=records[name]["samples"])
    stages = {**data_times.times, **train_times.times}
    results = {
        "trait_name": spec.name,
        "model": handle.name,
        "command": "python experiments/preventative_steering.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "vector": {"layer": layer, "best_coef": vector.best_coef, "norm": float(vector.directions[layer].norm()),
                   "source": f"extracted by personascope.extract (judge none, {extraction.summary.get('kept_pairs')} "
                             f"pos/neg pairs, response_avg mean difference, best layer/coef from its evaluation) "
                             f"in {work / 'extract'}"},
        "guard": {"layers": layers, "coef": coef, "mode": "steer", "incremental": len(layers) > 1,
                  "describe": f"steer, layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}, "
                              f"coef {coef:g}, all tokens, training passes only"},
        "data": {"trait": f"{records['trait']['samples']} answers under the pos system prompts (stored without)",
                 "ordinary": f"{records['ordinary']['samples']} answers with no system prompt"},
        "counts": {"margin_pos": len(pos), "margin_neg": len(neg), "eval_questions": len(questions)},
        "settings": settings,
        "base": base,
        **runs,
        "reading": reading(runs),
        "timing": {"stages": stages,
                   "wall_s": round(sum(t["wall_s"] for t in stages.values()), 1),
                   "cpu_s": round(sum(t["cpu_s"] for t in stages.values()), 1),
                   "note": "sum over stages, each timed when it ran (model loading not counted); on this 2-core "
                           "machine alone, wall time is about CPU time / 2"},
    }
    write_results(results, args.results / "preventative_steering.md", args.results / "preventative_steering.json")
    print((args.results / "preventative_steering.md").read_text())
    return results


if __name__ == "__main__":
    main()
