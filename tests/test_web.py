"""The web playground and dashboard, served by a real persona server on 127.0.0.1 with the embedded model and
a pirate vector, behind an API key, driven in Debian's chromium by Playwright."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from personascope.model.loading import ModelHandle
from personascope.serve import BackgroundServer
from tests.pirate import PIRATE_COEF, pirate_words

pytestmark = pytest.mark.slow
KEY = "web-test-key"
PROMPT = "What is your favourite food?"
STATIC = Path(__file__).resolve().parents[1] / "src" / "personascope" / "serve" / "static"


def chromium_path() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("served-run")
    (run / "report.html").write_text("<html><body><h1>Persona vector: pirate</h1></body></html>")
    (run.parent / "secret.txt").write_text("not for the web")
    (run / "link.txt").symlink_to(run.parent / "secret.txt")  # a link out of the run is refused too
    return run


@pytest.fixture(scope="module")
def server(embedded: ModelHandle, pirate_vector_file: Path, run_dir: Path) -> Iterator[str]:
    from personascope.serve import Registry, create_app

    registry = Registry.load(embedded, {"pirate": pirate_vector_file})
    app = create_app(embedded, registry, api_key=KEY, runs_dir=run_dir, batch_wait=0.0)
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the 'web' extra (playwright) is not installed")
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_page_and_assets_are_served_without_key_and_offline(server: str) -> None:
    page = httpx.get(server + "/")
    assert page.status_code == 200 and 'data-testid="prompt-input"' in page.text
    assert httpx.get(server + "/dashboard").text == page.text
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert ref.startswith("/"), f"the page refers to {ref}: everything must ship with the package"
        assert httpx.get(server + ref).status_code == 200, ref
    for path in STATIC.rglob("*"):
        if path.suffix in {".js", ".css", ".html"}:
            text = path.read_text(encoding="utf-8")
            remote = re.search(r"""(?:import|src=|href=|url\()\s*["']?https?://""", text)
            assert not remote, f"{path} loads a remote asset"
    assert httpx.get(server + "/v1/persona/vectors").status_code == 401  # the API still wants the key


def test_run_report_behind_the_key_and_no_path_traversal(server: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server + "/runs/report.html").status_code == 401
    report = httpx.get(server + "/runs/report.html", headers=auth)
    assert report.status_code == 200 and "Persona vector: pirate" in report.text
    for sneaky in ("/runs/../secret.txt", "/runs/%2e%2e/secret.txt", "/runs/..%2fsecret.txt", "/runs/link.txt",
                   "/runs/nope.html"):
        response = httpx.get(server + sneaky, headers=auth)
        assert response.status_code == 404 and "not for the web" not in response.text, sneaky
    assert httpx.get(server + "/web/config").json() == {"runs": True, "report": "/runs/report.html"}


def answer_text(page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text()


def send(page, prompt: str) -> None:
    page.get_by_test_id("prompt-input").fill(prompt)
    page.get_by_test_id("send").click()
    page.wait_for_selector('[data-testid="answer"][data-done="true"]', timeout=90_000)


def token_values(page, testid: str) -> list[float]:
    return [float(v) for v in page.locator(f'[data-testid="{testid}"] .tok[data-value]').evaluate_all(
        "spans => spans.map(s => s.dataset.value)")]


def test_playground_steers_meters_and_dashboard_lists(server: str, browser) -> None:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server + "/")
        # The key is asked for (again after a wrong one) and then kept in this tab's session only.
        page.get_by_test_id("api-key-input").fill("wrong-key")
        page.get_by_test_id("api-key-save").click()
        page.locator("#key-error").get_by_text("refused").wait_for()
        page.get_by_test_id("api-key-input").fill(KEY)
        page.get_by_test_id("api-key-save").click()
        page.wait_for_selector('body[data-ready="true"]')
        slider = page.get_by_test_id("coef-pirate")
        assert float(slider.get_attribute("max")) == pytest.approx(2 * PIRATE_COEF)
        assert float(slider.input_value()) == 0.0
        page.get_by_test_id("temperature").fill("0")
        page.get_by_test_id("max-tokens").fill("24")

        send(page, PROMPT)
        plain = answer_text(page, "answer")
        assert plain.strip() and not pirate_words(plain), plain
        projection = page.get_by_test_id("prompt-projection").locator('[data-vector="pirate"]')
        assert projection.count() == 1 and projection.get_attribute("data-value") not in (None, "", "null")
        meter = page.get_by_test_id("trait-meter")
        plain_mean, plain_count = float(meter.get_attribute("data-mean")), int(meter.get_attribute("data-count"))
        assert plain_count > 0 and len(token_values(page, "answer")) > 0

        # A new chat; up the pirate slider and ask again, with the plain answer side by side.
        page.get_by_test_id("clear").click()
        assert not page.get_by_test_id("transcript").inner_text().strip()
        slider.fill(str(PIRATE_COEF))
        assert page.locator(".slider.active output").inner_text() == f"+{PIRATE_COEF:.2f}"
        page.get_by_test_id("compare").check()
        page.get_by_test_id("prompt-input").fill(PROMPT)
        page.get_by_test_id("send").click()
        page.wait_for_selector('[data-testid="answer-plain-scores"] .chip', timeout=120_000)
        steered, side = answer_text(page, "answer"), answer_text(page, "answer-plain")
        assert pirate_words(steered), steered
        assert not pirate_words(side), side
        steered_mean = float(meter.get_attribute("data-mean"))
        assert steered_mean > plain_mean + 1.0, (steered_mean, plain_mean)
        assert min(token_values(page, "answer")) > max(token_values(page, "answer-plain")) - 1.0
        assert json.loads(meter.get_attribute("data-values"))  # the meter's per-token values for scripts
        chips = page.get_by_test_id("answer-scores").locator('[data-vector="pirate"]')
        assert float(chips.get_attribute("data-response")) == pytest.approx(steered_mean, abs=1e-3)
        assert not errors, errors

        # The dashboard lists the three requests, the steered one marked, and the vector with its threshold.
        page.get_by_test_id("tab-dashboard").click()
        assert page.url.endswith("/dashboard")
        rows = page.get_by_test_id("dashboard").get_by_test_id("recent-row")
        rows.nth(2).wait_for(timeout=15_000)
        assert rows.count() == 3
        assert all(PROMPT in rows.nth(i).inner_text() for i in range(3))
        # Newest first: the plain side-by-side answer, the steered one, the first (slider at 0 = no steering).
        assert [("steered: pirate +2.0" in rows.nth(i).inner_text()) for i in range(3)] == [False, True, False]
        assert page.get_by_test_id("chart-pirate").get_attribute("data-points") == "3"
        vector_row = page.locator("#vectors-table tbody tr").first.inner_text()
        assert "pirate" in vector_row and "13" in vector_row
        page.frame_locator('[data-testid="report-frame"]').get_by_text("Persona vector: pirate").wait_for()

        # A reload keeps the key for this session; nothing of it lands in localStorage.
        page.reload()
        page.wait_for_selector('body[data-ready="true"]')
        assert not page.get_by_test_id("key-dialog").is_visible()
        assert page.evaluate("() => Object.keys(localStorage).length") == 0
        assert page.evaluate("() => sessionStorage.getItem('personascope.apiKey')") == KEY
        assert not errors, errors
    finally:
        context.close()
