"""`personascope finetune`: LoRA fine-tuning with an optional preventative-steering guard and trait monitor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personascope.cli import app, console
from personascope.cli.options import DeviceMapOption, DeviceOption, DtypeOption, Placement
from personascope.model import DEFAULT_MODEL


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="Chat dataset: JSONL/CSV/Parquet/saved dataset with messages or prompt/response.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the adapter (must not hold one yet).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id or local dir.")] = DEFAULT_MODEL,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 64,
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimiser step.")] = 1,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: run --epochs).")] = -1,
    seed: Annotated[int, typer.Option(help="Seed of LoRA init and data order.")] = 0,
    max_length: Annotated[int, typer.Option(help="Longest sequence in tokens; longer responses are cut.")] = 1024,
    guard: Annotated[Optional[Path], typer.Option(help="Persona vector to steer toward while training.")] = None,
    guard_layers: Annotated[Optional[str], typer.Option(
        help="Layer, layers like 10,12,14, a range like 6-14, or 'all' (1..L-1; several layers steer incrementally). "
             "Default: the vector's best layer.")] = None,
    guard_coef: Annotated[Optional[float], typer.Option(
        help="Steering coefficient (default: a quarter of the vector's best; the full one over-corrects).")] = None,
    guard_mode: Annotated[str, typer.Option(help="steer (add the vector) or ablate (project it out).")] = "steer",
    monitor: Annotated[Optional[list[Path]], typer.Option(
        help="Persona vector to monitor (repeatable); held-out questions come from trait.json beside it "
             "(an extraction run) or the built-in trait.")] = None,
    monitor_every: Annotated[int, typer.Option(help="Monitor every this many steps.")] = 10,
    report_to: Annotated[str, typer.Option(help="Trainer integrations: none, tensorboard, wandb, ….")] = "none",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Fine-tune a LoRA adapter on DATA (loss on assistant tokens only), optionally guarded and monitored."""
    from personascope.apply.callbacks import TraitMonitorCallback
    from personascope.apply.finetune import FinetuneConfig, check_output_dir
    from personascope.apply.finetune import finetune as run_finetune
    from personascope.apply.gate import trait_for_vector
    from personascope.apply.guard import PreventativeSteering, default_guard_coef
    from personascope.errors import PersonascopeError
    from personascope.io.data import load_samples
    from personascope.io.layers import parse_layers
    from personascope.vector import PersonaVector

    config = FinetuneConfig(lora_r=lora_r, lora_alpha=lora_alpha, epochs=epochs, lr=lr, batch_size=batch_size,
                            grad_accum=grad_accum, max_steps=max_steps, seed=seed, max_length=max_length,
                            report_to=report_to)
    config.check()
    check_output_dir(out)
    if guard is None and (guard_layers is not None or guard_coef is not None):
        raise PersonascopeError("--guard-layers and --guard-coef need --guard VECTOR")
    samples, bad = load_samples(data)
    if bad:
        console.print(f"[yellow]left out {len(bad)} rows of {data}[/] (first: {bad[0].id}: {bad[0].reason})")
    handle = Placement(device, dtype, device_map).load(model)
    steering = None
    if guard is not None:
        vec = PersonaVector.load(guard, handle)
        layers = parse_layers(guard_layers if guard_layers is not None else vec.layer(), handle.num_layers,
                              option="--guard-layers")
        coef = 0.0 if guard_mode == "ablate" else guard_coef if guard_coef is not None else default_guard_coef(vec)
        steering = PreventativeSteering(vec, layers, coef, guard_mode,  # type: ignore[arg-type]
                                        incremental=guard_mode == "steer" and len(layers) > 1)
    watcher = None
    if monitor:
        vectors = [PersonaVector.load(path, handle) for path in monitor]
        questions = {v.trait: list(trait_for_vector(path, v.trait).eval_questions) for path, v in zip(monitor, vectors)}
        watcher = TraitMonitorCallback(handle, vectors, questions, every=monitor_every,
                                       log_path=out / "monitor.jsonl")
    result = run_finetune(handle, samples, out, config, guard=steering, monitor=watcher)
    console.print(f"wrote adapter to {result.adapter_dir} after {result.steps} steps")
    if watcher is not None:
        last = {row["trait"]: row for row in watcher.history}
        for trait, row in last.items():
            console.print(f"  {trait}: projection shift {row['shift']:+.3f} at layer {row['layer']}")
