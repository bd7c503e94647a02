"""report.html: one self-contained page (inlined PNG plots, no external references) with model text escaped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.evaluate.report import write_report
from personascope.evaluate.result import EvalSettings
from personascope.evaluate.search import evaluate_run
from personascope.judge.judges import make_judge
from personascope.model import ModelHandle
from tests.loopback import Loopback, Reply, openai_reply
from tests.test_evaluate import build_run, tiny_handle

SCRIPT = "<script>alert('steered')</script>"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, embedded: ModelHandle) -> Path:
    """A run of a small random model, evaluated with a loopback judge (so the steering curve is drawn)."""
    tiny = tiny_handle(embedded, layers=4)
    run = build_run(tmp_path_factory.mktemp("report-run"), tiny)
    settings = EvalSettings(examples=2, fractions=(1.0,), curve_questions=2, curve_max_new_tokens=3, bootstrap=50)
    with pytest.MonkeyPatch.context() as env, Loopback(lambda r: Reply(openai_reply("80", {"80": 0.0}))) as server:
        env.setenv("OPENAI_API_KEY", "sk-loopback")
        judge = make_judge("openai:judge", base_url=server.url + "/v1")
        evaluate_run(run, tiny, judge=judge, settings=settings, progress=False)
    return run


def test_report_is_self_contained(run: Path) -> None:
    html = write_report(run).read_text()
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)  # nothing loaded from elsewhere
    images = re.findall(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(images) == 7  # AUROC, margin gain, histogram, likelihood sweep; trait, relevance, fluency curves
    for needle in ("Persona vector: pirate", "best layer", "Run configuration", "margin gain", "Honest validation",
                   "95% bootstrap interval", "distinct-2", "looping", "judged coherence", "judged relevance",
                   "Steering beside prompting", "trait expression", "relevance (95% CI)", "fluency loss", "prompted",
                   "Spearman"):
        assert needle in html


def test_report_escapes_model_and_user_text(run: Path) -> None:
    evaluation = json.loads((run / "eval.json").read_text())
    evaluation["examples"][0]["steered"] = SCRIPT
    (run / "eval.json").write_text(json.dumps(evaluation))
    html = write_report(run).read_text()
    assert SCRIPT not in html and "&lt;script&gt;alert(&#x27;steered&#x27;)&lt;/script&gt;" in html
    # an eval question with markup (from the trait file) is shown as text
    assert "<b>your</b>" not in html and "&lt;b&gt;your&lt;/b&gt; favourite book &amp; why?" in html


def test_report_of_chosen_layers_goes_beside_the_run_report(run: Path) -> None:
    chosen = run / "eval.layers-1-2.json"
    chosen.write_text((run / "eval.json").read_text())
    assert write_report(run, chosen) == run / "report.layers-1-2.html"


def test_report_needs_an_evaluation(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError, match="no eval.json"):
        write_report(tmp_path)
