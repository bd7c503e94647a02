"""The web playground and persona dashboard: a static page, its assets, and a served run's report."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_FILE = STATIC_DIR / "index.html"


def _index() -> HTMLResponse:
    return HTMLResponse(INDEX_FILE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def resolve_run_file(runs_dir: Path, rel: str) -> Path | None:
    """The file `rel` inside `runs_dir`, or None if it is missing or would leave the directory."""
    root = runs_dir.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def mount_web(app: FastAPI, runs_dir: Path | None = None) -> None:
    """Serve the playground/dashboard page at `/`, its assets at `/static`, and `runs_dir` at `/runs`."""
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/dashboard", _index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    async def web_config() -> dict:
        has_report = runs_dir is not None and resolve_run_file(runs_dir, "report.html") is not None
        return {"runs": runs_dir is not None, "report": "/runs/report.html" if has_report else None}

    app.add_api_route("/web/config", web_config, methods=["GET"], include_in_schema=False)

    if runs_dir is None:
        return
    runs_root = Path(runs_dir)

    async def run_file(path: str) -> FileResponse:
        target = resolve_run_file(runs_root, path)
        if target is None:
            raise HTTPException(status_code=404, detail=f"no such file in the served run: {path}")
        return FileResponse(target)

    app.add_api_route("/runs/{path:path}", run_file, methods=["GET"], include_in_schema=False)
