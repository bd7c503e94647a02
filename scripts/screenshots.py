"""Take docs/playground.png and docs/dashboard.png against a live persona server.

Serves the embedded model on 127.0.0.1 with two vectors: the test suite's hand-tuned pirate vector
(tests/pirate.py) and `pirate-run`, the vector of a small evaluated run directory (the hand-written answers of
tests/test_evaluate.py, validated on its held-out half: AUROC, best layer, report.html), which is also served
as `--runs`. Sends a little traffic (plain and pirate-steered questions) and photographs both pages in
Debian's chromium. About two minutes on a CPU.

    PYTHONPATH=src:. python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

import personascope as ps
from personascope.evaluate.report import write_report
from personascope.evaluate.search import EvalSettings, evaluate_run
from personascope.extract.pipeline import recommend_vector
from personascope.model.loading import ModelHandle
from personascope.serve import BackgroundServer, Registry, create_app
from tests.pirate import PIRATE_COEF, build_pirate_vector
from tests.test_evaluate import build_run

WIDTH, HEIGHT = 1400, 760
QUESTIONS = ["What is your favourite food?", "How do I learn to cook?", "Tell me about your day.",
             "What should I do this weekend?", "How can I sleep better?", "What makes a good friend?"]


def traffic(url: str, model: str) -> None:
    """Plain and steered questions through the OpenAI-style API, so that the dashboard has something to show."""
    for i, question in enumerate(QUESTIONS):
        coef = PIRATE_COEF if i % 2 else 0.0
        persona = {"monitor": True, "steer": [{"vector": "pirate", "coef": coef}] if coef else []}
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                "temperature": 0, "persona": persona}
        httpx.post(url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()


def evaluated_run(handle: ModelHandle, run: Path) -> Path:
    """A small run directory validated as `personascope extract` would: eval.json, report.html, vector.safetensors."""
    build_run(run, handle)
    evaluation = evaluate_run(run, handle, layers=[8, 10, 12, 14, 16], settings=EvalSettings(examples=1),
                              out=run / "eval.json",
                              progress=False)
    vector = recommend_vector(run, evaluation)  # (clears what follows it in a run, the report included)
    write_report(run)
    return vector


def shoot(page: Any, path: Path) -> None:
    """The whole page: the viewport grows to fit it (a full-page capture leaves the report's frame blank)."""
    height = page.evaluate("() => document.documentElement.scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": max(height, HEIGHT)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": WIDTH, "height": HEIGHT})


def photograph(app: Any, model: str, out: Path) -> None:
    """Send the traffic, then photograph the playground (one steered and plain answer) and the dashboard."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with BackgroundServer(app) as server, sync_playwright() as playwright:
        url = server.url
        traffic(url, model)
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector('body[data-ready="true"]')
            page.get_by_test_id("temperature").fill("0")
            page.get_by_test_id("max-tokens").fill("40")
            page.get_by_test_id("coef-pirate").fill(str(PIRATE_COEF))
            page.get_by_test_id("compare").check()
            page.get_by_test_id("prompt-input").fill(QUESTIONS[0])
            page.get_by_test_id("send").click()
            page.wait_for_selector('[data-testid="answer-plain-scores"] .chip', timeout=180_000)
            page.wait_for_timeout(300)
            shoot(page, out / "playground.png")
            page.get_by_test_id("tab-dashboard").click()
            page.wait_for_selector('[data-testid="recent-row"]')
            alerts = page.locator('[data-testid="alert"] summary')
            if alerts.count():
                alerts.first.click()
            page.frame_locator('[data-testid="report-frame"]').locator("h1").first.wait_for()
            page.wait_for_timeout(500)
            shoot(page, out / "dashboard.png")
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()

    handle = ps.load_model()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "pirate-run"
        files = {"pirate": build_pirate_vector(handle).save(Path(tmp) / "pirate.safetensors"),
                 "pirate-run": evaluated_run(handle, run)}
        app = create_app(handle, Registry.load(handle, files), runs_dir=run, batch_wait=0.0)
        photograph(app, handle.name, args.out)
    print(f"wrote {args.out / 'playground.png'} and {args.out / 'dashboard.png'}")


if __name__ == "__main__":
    main()
