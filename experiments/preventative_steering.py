"""Preventative steering, end to end on the embedded model (Chen et al. 2025, §5.2, at toy scale).

1. Extract a persona vector with `personascope.extract.pipeline` (small settings). Its run holds the model's own answers
   to the trait's extraction questions under the pos and neg system prompts, and to the held-out eval questions.
2. Build two training sets on the same extraction questions, both stored WITHOUT a system prompt:
   `trait` — the answers given under the trait's pos system prompts; `ordinary` — answers sampled with no system
   prompt (the model's own default behaviour), as many per question.
3. Fine-tune LoRA adapters with one seed: (a) ordinary, (b) trait, (c) trait with `PreventativeSteering` toward
   the trait at the vector's best layer with personascope's default guard coefficient (a quarter of the vector's
   best steering coefficient), and the same at other fractions of the best coefficient (`--guard-sweep`) to show
   how the shift falls as the guard strengthens.
4. Measure each adapter, loaded from disk with no steering: the projection shift of the last-prompt-token
   activation on the held-out eval questions versus the base model (`personascope.apply.shift`), and the likelihood
   margin of held-out pos vs neg answers (`personascope.evaluate.search`), plus judged trait scores with `--judge`.
5. Write `experiments/results/preventative_steering.{md,json}`.

Every stage resumes from its run directory (`--work`): answers are kept per data setting, and each adapter in
a folder named by a hash of its own training settings, so changing, say, the guard coefficient retrains only the
guarded runs. Changing the data settings (trait, model, answer length, seed) needs a new `--work`.

    python experiments/preventative_steering.py            # defaults: optimistic; 11 min alone on this 2-core CPU
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

from personascope.apply.finetune import FinetuneConfig, finetune
from personascope.apply.guard import PreventativeSteering, default_guard_coef
from personascope.apply.shift import projection_shift
from personascope.evaluate.search import plain_chats, steered_answers
from personascope.extract.pipeline import ExtractConfig, extract
from personascope.inference.generate import SamplingConfig, generate_responses
from personascope.inference.likelihood import likelihood_margin
from personascope.io.data import load_samples, write_rows
from personascope.io.rundir import JsonlLog, open_run, write_json
from personascope.judge.judges import judge_trait, make_judge
from personascope.model import DEFAULT_MODEL, ModelHandle, load_model
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
    parser.add_argument("--guard-coef", type=float, default=None,
                        help="default: personascope's default, a quarter of the vector's best coefficient")
    parser.add_argument("--guard-layers", default=None, help="default: the vector's best layer")
    parser.add_argument("--guard-sweep", default="0.1,0.5,1",
                        help="extra guarded runs at these fractions of the vector's best coefficient "
                             "(comma-separated; '' for none)")
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


def adapter_dir(work: Path, name: str, training: dict[str, Any], guard: dict[str, Any] | None) -> Path:
    """The folder of one fine-tuning run, named by a hash of everything that shapes its weights."""
    config = {"data": name.replace("_guarded", ""), **training, "guard": guard}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return open_run(work / "adapters" / f"{name}-{key}", config, stage="experiment")


def train(out: Path, data: Path, vector: PersonaVector, guard: dict[str, Any] | None,
          args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune one adapter into `out` (skipped when it already holds one); returns its training record."""
    if not (out / "finetune.json").exists():
        samples, _ = load_samples(data)
        handle = load_model(args.model)
        steering = None
        if guard is not None:
            steering = PreventativeSteering(vector, guard["layers"], guard["coef"],
                                            incremental=len(guard["layers"]) > 1)
        config = FinetuneConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, seed=args.seed, logging_steps=5)
        finetune(handle, samples, out, config, guard=steering)
    return json.loads((out / "finetune.json").read_text())


def measure(adapter: Path | None, base: ModelHandle, vector: PersonaVector, layer: int, questions: list[str],
            pos: list, neg: list, judge: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Shift versus the base model, likelihood margin (and judged trait score) of one model, unsteered."""
    handle = base if adapter is None else load_model(str(adapter))
    shift = projection_shift(base, handle, vector, questions, progress=False)
    margin = likelihood_margin(handle, vector, layer, [0.0], pos, neg)[0]
    result = {"shift": shift.shift, "relative_shift": shift.relative_shift, "margin": margin,
              "shift_by_layer": {row.layer: round(row.shift, 4) for row in shift.layers}}
    if judge is not None:
        answers = steered_answers(handle, questions, max_new_tokens=args.max_new_tokens)
        scores = [r.score for r in judge_trait(judge, spec, list(zip(questions, answers)))]
        scored = [s for s in scores if s is not None]
        result["trait_score"] = sum(scored) / len(scored) if scored else None
    return result


def _table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(run, training data, guard, measurements) for every fine-tuned run, in table order."""
    rows = [(name, results["data"][name.replace("_guarded", "")],
             results["guard"]["describe"] if name == "trait_guarded" else "—", results[name]) for name in RUNS]
    for run in results["guard_sweep"]:
        rows.append((f"trait_guarded, {run['fraction']:g}× best coef", results["data"]["trait"],
                     f"as above, coef {run['coef']:.3g}", run))
    return rows


def write_results(results: dict[str, Any], path_md: Path, path_json: Path) -> None:
    write_json(path_json, results)
    layer, base = results["vector"]["layer"], results["base"]
    rows = _table_rows(results)
    judged = any("trait_score" in row for *_, row in rows)
    lines = [
        f"# Preventative steering on {results['model']} ({results['trait_name']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"| run | training data | guard | shift (layer {layer}) | relative shift | margin | Δ margin vs base "
        "| train loss |" + (" trait score |" if judged else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if judged else ""),
    ]
    for name, data, guard, row in rows:
        cells = [name, data, guard, f"{row['shift']:+.3f}", f"{row['relative_shift']:+.3f}", f"{row['margin']:+.4f}",
                 f"{row['margin'] - base['margin']:+.4f}", f"{row['train_loss']:.3f}"]
        if judged:
            cells.append(f"{row['trait_score']:.1f}" if row.get("trait_score") is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    base_cells = ["base", "—", "—", "0", "0", f"{base['margin']:+.4f}", "0", "—"]
    if judged:
        base_cells.append(f"{base['trait_score']:.1f}" if base.get("trait_score") is not None else "—")
    lines += [
        "| " + " | ".join(base_cells) + " |",
        "",
        "- **shift**: mean last-prompt-token activation on the trait's held-out eval questions "
        f"({results['counts']['eval_questions']}, no system prompt), fine-tuned minus base, projected on the unit "
        "vector at its best layer; relative = divided by the vector's norm there (the pos−neg gap it was made from).",
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


def reading(results: dict[str, Any]) -> list[str]:
    """What the numbers say, in words computed from them (nothing here is written by hand)."""
    o, t, g = (results[n]["shift"] for n in RUNS)
    out = [f"- Trait data shifted the projection {'more' if t > o else 'NOT more'} than ordinary data "
           f"({t:+.3f} vs {o:+.3f})."]
    if t:
        verdict = "reduced" if abs(g) < abs(t) else "did NOT reduce"
        out.append(f"- The guard (coef {results['guard']['coef']:.3g}) {verdict} the size of the shift on the same "
                   f"data and seed ({g:+.3f} vs {t:+.3f}, {100 * (1 - abs(g) / abs(t)):.0f}% less)"
                   + ("; the shift is practically cancelled." if abs(g) <= 0.1 * abs(t)
                      else "; it overshoots: the model moved AWAY from the trait." if g < 0 < t else "."))
    sweep = sorted([(0.0, t), *((r["coef"], r["shift"]) for r in results["guard_sweep"]),
                    (results["guard"]["coef"], g)])
    if len(sweep) > 2:
        falling = all(b[1] < a[1] for a, b in zip(sweep, sweep[1:]))
        points = ", ".join(f"coef {c:.3g}: {v:+.3f}" for c, v in sweep)
        out.append(f"- Shift by guard strength: {points} — "
                   f"{'falls steadily' if falling else 'does NOT fall steadily'} as the guard strengthens.")
    mo, mt, mg = (results[n]["margin"] for n in RUNS)
    out.append(f"- Likelihood margin: ordinary {mo:+.4f}, trait {mt:+.4f}, guarded {mg:+.4f} "
               f"(base {results['base']['margin']:+.4f}).")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.work
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "results")}
    data_keys = ("trait", "model", "max_new_tokens", "seed")
    open_run(work, {k: settings[k] for k in data_keys}, stage="experiment")
    training = {k: settings[k] for k in ("epochs", "lr", "batch_size", "lora_r", "lora_alpha", "seed")}
    fractions = [float(x) for x in args.guard_sweep.split(",") if x.strip()]
    times = StageTimes(work / "timings.json")
    handle = load_model(args.model)
    spec = load_trait(args.trait)

    with times.stage("extract", done=(work / "extract" / "vector.safetensors").exists()):
        extraction = extract(ExtractConfig(trait=args.trait, model=handle.name, max_new_tokens=args.max_new_tokens,
                                           seed=args.seed), work / "extract", handle=handle)
    vector = PersonaVector.load(extraction.vector, handle)
    layer = vector.layer()
    layers = [layer] if args.guard_layers is None else [int(x) for x in str(args.guard_layers).split(",")]
    coef = args.guard_coef if args.guard_coef is not None else default_guard_coef(vector)
    with times.stage("ordinary_answers", done=(work / "data" / "ordinary.jsonl").exists()):
        data = training_sets(work, handle, list(spec.extract_questions), args)

    plans = [(name, {"layers": layers, "coef": coef} if name == "trait_guarded" else None) for name in RUNS]
    plans += [("trait_guarded", {"layers": layers, "coef": vector.best_coef * f}) for f in fractions]
    trained, used_stages = [], ["extract", "ordinary_answers"]
    for name, guard in plans:
        out = adapter_dir(work, name, training, guard)
        used_stages.append(f"train/{out.name}")
        with times.stage(used_stages[-1], done=(out / "finetune.json").exists()):
            trained.append((name, guard, out, train(out, data[name.replace("_guarded", "")], vector, guard, args)))

    eval_rows = [r for r in JsonlLog(work / "extract" / "responses.jsonl").read().values()
                 if r["split"] == "eval" and r["response"].strip()]
    pos = plain_chats(handle, [r for r in eval_rows if r["polarity"] == "pos"])
    neg = plain_chats(handle, [r for r in eval_rows if r["polarity"] == "neg"])
    judge = make_judge(args.judge, cache_path=work / "judge_cache.sqlite")
    questions = list(spec.eval_questions)
    measured = []
    with times.stage("measure"):
        base = measure(None, handle, vector, layer, questions, pos, neg, judge, spec, args)
        for name, guard, out, record in trained:
            row = measure(out, handle, vector, layer, questions, pos, neg, judge, spec, args)
            row.update(train_loss=record["train_loss"], steps=record["steps"], samples=record["samples"],
                       adapter=str(out))
            measured.append(row)
    runs = dict(zip(RUNS, measured))
    sweep = [{"fraction": f, "coef": vector.best_coef * f, **row} for f, row in zip(fractions, measured[len(RUNS):])]
    stages = {name: times.times[name] for name in [*used_stages, "measure"]}
    records = {name: record for name, guard, out, record in trained[:len(RUNS)]}
    results = {
        "trait_name": spec.name,
        "model": handle.name,
        "command": "python experiments/preventative_steering.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "vector": {"layer": layer, "best_coef": vector.best_coef, "norm": float(vector.directions[layer].norm()),
                   "source": f"extracted by personascope.extract.pipeline (judge none, {extraction.summary.get('kept_pairs')} "
                             f"pos/neg pairs, response_avg mean difference, best layer/coef from its evaluation) "
                             f"in {work / 'extract'}"},
        "guard": {"layers": layers, "coef": coef, "mode": "steer", "incremental": len(layers) > 1,
                  "describe": f"steer, layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}, "
                              f"coef {coef:.3g}, all tokens, training passes only"},
        "data": {"trait": f"{records['trait']['samples']} answers under the pos system prompts (stored without)",
                 "ordinary": f"{records['ordinary']['samples']} answers with no system prompt"},
        "counts": {"margin_pos": len(pos), "margin_neg": len(neg), "eval_questions": len(questions)},
        "settings": settings,
        "base": base,
        **runs,
        "guard_sweep": sweep,
        "timing": {"stages": stages,
                   "wall_s": round(sum(t["wall_s"] for t in stages.values()), 1),
                   "cpu_s": round(sum(t["cpu_s"] for t in stages.values()), 1),
                   "note": "sum over the stages behind these numbers, each timed when it ran; model loading "
                           "not counted"},
    }
    results["reading"] = reading(results)
    write_results(results, args.results / "preventative_steering.md", args.results / "preventative_steering.json")
    print((args.results / "preventative_steering.md").read_text())
    return results


if __name__ == "__main__":
    main()
