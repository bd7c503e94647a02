"""Take docs/playground.png and docs/dashboard.png against a live persona server.

Serves the embedded model with the test suite's pirate vector (tests/pirate.py) on 127.0.0.1, sends a little
traffic (plain and pirate-steered questions), and photographs both pages in Debian's chromium.

    PYTHONPATH=src:. python scripts/screenshots.py [--runs RUN_DIR] [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import httpx

import personascope as ps
from personascope.serve import Registry, create_app
from tests.liveserver import live_server
from tests.pirate import PIRATE_COEF, build_pirate_vector

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="a run directory whose report.html the dashboard shows")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    handle = ps.load_model()
    vector_file = args.out / ".pirate.safetensors"
    args.out.mkdir(parents=True, exist_ok=True)
    build_pirate_vector(handle).save(vector_file)
    try:
        registry = Registry.load(handle, {"pirate": vector_file})
    finally:
        vector_file.unlink()
    app = create_app(handle, registry, runs_dir=args.runs, batch_wait=0.0)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with live_server(app) as url, sync_playwright() as playwright:
        traffic(url, handle.name)
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 760}, device_scale_factor=1)
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
            page.screenshot(path=str(args.out / "playground.png"), full_page=True)
            page.get_by_test_id("tab-dashboard").click()
            page.wait_for_selector('[data-testid="recent-row"]')
            alerts = page.locator('[data-testid="alert"] summary')
            if alerts.count():
                alerts.first.click()
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    print(f"wrote {args.out / 'playground.png'} and {args.out / 'dashboard.png'}")


if __name__ == "__main__":
    main()
