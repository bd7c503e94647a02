"""`personascope serve`: the OpenAI-compatible persona server (thin over `personascope.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personascope.cli import app, err_console
from personascope.cli.core import ModelOption
from personascope.errors import InputError, PersonascopeError
from personascope.io.checks import check_number
from personascope.model.loading import DEFAULT_MODEL

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    """`NAME=VALUE` options as a dict; one clear error for a malformed or repeated one."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise PersonascopeError(f"{what} {value!r}: write NAME={'FILE' if what == '--vector' else 'VALUE'}")
        if name.strip() in out:
            raise PersonascopeError(f"{what} {name.strip()!r} is given twice")
        out[name.strip()] = rest.strip()
    return out


@app.command()
def serve(
    vector: Annotated[list[str], typer.Option("--vector", "-v", help="NAME=FILE: a persona vector clients may "
                                                "name; repeat for several.")] = [],  # noqa: B006
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="PERSONASCOPE_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /healthz (prefer the environment variable: "
             "a command-line value shows in the process list).")] = None,
    threshold: Annotated[list[str], typer.Option(help="NAME=VALUE: alert threshold for a vector, overriding the "
                                                      "one derived from its file.")] = [],  # noqa: B006
    max_tokens: Annotated[int, typer.Option(help="Most tokens one request may generate (also the default).")] = 512,
    max_batch: Annotated[int, typer.Option(help="Most requests batched into one forward pass.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="A batch keeps taking requests while they arrive within "
                                                      "this many ms of each other (at most 10× in all).")] = 20.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1_000_000,
    max_messages: Annotated[int, typer.Option(help="Most messages in one request.")] = 64,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting for the model; beyond, 503 with Retry-After.")]
    = 256,
    runs: Annotated[Optional[Path], typer.Option(help="A run directory whose report the dashboard links.")] = None,
) -> None:
    """Serve the model behind an OpenAI-style API with per-request steering and monitoring.

    POST /v1/chat/completions takes a `persona` field ({"steer": [...], "monitor": [...] | true, "trace": bool});
    see README "Serving" for the routes and fields.
    """
    import uvicorn

    from personascope.model.loading import load_model
    from personascope.serve import Limits, Registry, create_app

    files = _pairs(vector, "--vector")
    thresholds = {}
    for name, value in _pairs(threshold, "--threshold").items():
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"--threshold {name}={value}: the threshold must be a number") from None
        thresholds[name] = check_number(f"--threshold {name}", number)
    if runs is not None and not runs.is_dir():
        raise PersonascopeError(f"--runs {runs} is not a directory")
    handle = load_model(model)
    registry = Registry.load(handle, files, thresholds)
    limits = Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_messages=max_messages,
                    max_queue=max_queue)
    app_ = create_app(handle, registry, api_key=api_key or None, limits=limits, max_batch=max_batch,
                      batch_wait=batch_wait_ms / 1000, runs_dir=runs)
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning:[/] binding {host}: the server is reachable from other machines"
                          + ("" if api_key else " and needs no API key (set PERSONASCOPE_API_KEY)"))
    for entry in registry.describe():
        err_console.print(f"vector {entry['name']}: trait {entry['trait']}, layer {entry['layer']}, best coef "
                          f"{entry['best_coef']}, alert threshold {entry['threshold']} ({entry['threshold_source']})")
    uvicorn.run(app_, host=host, port=port, log_level="info")
