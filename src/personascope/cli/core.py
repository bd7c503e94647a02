"""`personascope info`, `generate` and `vector …`: the foundation commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from personascope.cli import app, console
from personascope.cli.options import (
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    ModelOption,
    Placement,
    VectorModelOption,
    model_for_vector,
)
from personascope.model import DEFAULT_MODEL

vector_app = typer.Typer(help="Inspect, convert and import persona vector files.", no_args_is_help=True)
app.add_typer(vector_app, name="vector")


@app.command()
def info(model: ModelOption = DEFAULT_MODEL, device: DeviceOption = "auto", dtype: DtypeOption = "auto",
         device_map: DeviceMapOption = None) -> None:
    """Load a model and show its layers, hidden size, dtype, device and the personascope cache."""
    from personascope.model import cache_dir

    handle = Placement(device, dtype, device_map).load(model)
    table = Table(show_header=False, box=None)
    for key, value in (
        ("model", handle.name),
        ("source", handle.source),
        ("architecture", type(handle.model).__name__),
        ("layers", f"{handle.num_layers} (vector rows 0..{handle.num_layers}; 0 = embeddings)"),
        ("hidden size", handle.hidden_size),
        ("context length", handle.max_length or "unknown"),
        ("dtype", str(handle.dtype).removeprefix("torch.")),
        ("device", ", ".join(str(d) for d in handle.devices)),
        ("cache", str(cache_dir())),
    ):
        table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: VectorModelOption = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    vector: Annotated[Optional[Path], typer.Option(help="Persona vector file to steer with.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Layer to steer at (default: the vector's best layer).")] = None,
    coef: Annotated[Optional[float], typer.Option(help="Steering coefficient (default: the vector's best).")] = None,
    scope: Annotated[str, typer.Option(help="Tokens to steer: prompt, response or all.")] = "response",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    temperature: Annotated[Optional[float], typer.Option(
        help="Sampling temperature; 0 is pure greedy (default: the model's sampling settings, else greedy).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        help="Above 1 discourages repeats (default: the model's, else 1.2; 1 for none).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Pure greedy decoding, no repetition penalty.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    engine: EngineOption = "hf",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Chat with a model, optionally steered by a persona vector; the answer streams to the terminal.

    By default it decodes as the model's generation config says, with a repetition penalty against loops
    (greedy with penalty 1.2 on the embedded model); --greedy (or --temperature 0) is pure greedy."""
    from dataclasses import replace

    from personascope.errors import PersonascopeError
    from personascope.inference.engines import check_engine, generate_with
    from personascope.inference.generate import default_decoding, stream_chat
    from personascope.inference.steering import Steering, hooked
    from personascope.vector import PersonaVector

    check_engine(engine)
    handle = Placement(device, dtype, device_map).load(model_for_vector(model, vector))
    sampling = default_decoding(handle, max_new_tokens=max_new_tokens, seed=seed)
    if greedy or temperature == 0:
        sampling = replace(sampling, temperature=0.0, repetition_penalty=1.0)
    elif temperature is not None:
        sampling = replace(sampling, temperature=temperature)
    if repetition_penalty is not None:
        sampling = replace(sampling, repetition_penalty=repetition_penalty)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    steering: list[Steering] = []
    if vector is not None:
        vec = PersonaVector.load(vector, handle)
        chosen_layer = vec.layer(layer)
        chosen_coef = coef if coef is not None else vec.best_coef
        if chosen_coef is None:
            raise PersonascopeError(f"{vector} records no best coefficient: pass --coef")
        steering.append(Steering(vec, chosen_layer, chosen_coef, scope))  # type: ignore[arg-type]
        console.print(f"[dim]steering with {vec.trait} at layer {chosen_layer}, coef {chosen_coef:g}, {scope}[/]")
    elif layer is not None or coef is not None:
        raise PersonascopeError("--layer and --coef need --vector")
    if engine == "vllm":
        request = [("prompt", handle.chat_ids(messages))]
        console.print(generate_with("vllm", handle, request, sampling, steering=steering, progress=False)[0].text,
                      markup=False, highlight=False)
        return
    with hooked(handle, steering):
        stream_chat(handle, messages, sampling,
                    on_text=lambda text: console.print(text, end="", markup=False, highlight=False))
    console.print()


@vector_app.command("show")
def vector_show(path: Annotated[Path, typer.Argument(help="A .safetensors vector file.")]) -> None:
    """Print a vector file's metadata and the norm of each layer's direction."""
    from personascope.vector import PersonaVector

    vec = PersonaVector.load(path)
    table = Table(title=f"{path}", show_header=False, box=None)
    table.add_row("[bold]trait[/]", vec.trait)
    table.add_row("[bold]model[/]", vec.model)
    table.add_row("[bold]shape[/]", f"{vec.num_layers + 1} rows × {vec.hidden_size}")
    for key, value in sorted(vec.metadata.items()):
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    norms = vec.directions.norm(dim=-1)
    console.print("norm by layer: " + " ".join(f"{i}:{float(n):.2f}" for i, n in enumerate(norms)))


@vector_app.command("export-gguf")
def vector_export_gguf(
    path: Annotated[Path, typer.Argument(help="A .safetensors vector file.")],
    out: Annotated[Path, typer.Argument(help="The .gguf control vector to write.")],
) -> None:
    """Export a vector as a llama.cpp control vector (`--control-vector` in llama.cpp)."""
    from personascope.vector import PersonaVector

    PersonaVector.load(path).export_gguf(out)
    console.print(f"wrote {out}")


@vector_app.command("import-gguf")
def vector_import_gguf(
    path: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector .gguf.")],
    out: Annotated[Path, typer.Argument(help="The .safetensors vector file to write.")],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Check it against this model, padding a file without the last layers (repeng)."
    )] = None,
    trait: Annotated[Optional[str], typer.Option(help="Trait name (default: from the file).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Import a GGUF control vector into a personascope vector file."""
    from personascope.vector import PersonaVector

    if model is None:
        _write_new(out, PersonaVector.import_gguf(path, trait=trait))
        return
    handle = Placement(device, dtype, device_map).load(model)
    vec = PersonaVector.import_gguf(path, trait=trait, num_layers=handle.num_layers)
    vec.model = vec.model or handle.name
    vec.check_model(handle)
    _write_new(out, vec)


@vector_app.command("import-pt")
def vector_import_pt(
    path: Annotated[Path, typer.Argument(help="A reference-style [L+1, d] tensor file (.pt).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors vector file to write.")],
    model: ModelOption = DEFAULT_MODEL,
    trait: Annotated[Optional[str], typer.Option(help="Trait name (default: from the file name).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Import a reference `.pt` persona vector (loaded with weights_only, never unpickled) for MODEL."""
    from personascope.vector import PersonaVector

    handle = Placement(device, dtype, device_map).load(model)
    _write_new(out, PersonaVector.import_pt(path, handle, trait=trait))


def _write_new(out: Path, vec: object) -> None:
    from personascope.errors import PersonascopeError

    if out.exists():
        raise PersonascopeError(f"{out} exists: choose another output path (nothing was overwritten)")
    vec.save(out)  # type: ignore[attr-defined]
    console.print(f"wrote {out}")
