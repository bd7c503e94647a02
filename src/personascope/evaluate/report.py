"""`DIR/report.html`: one self-contained page (plots inlined as base64 PNGs) from a run's eval.json and manifest."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ddd; padding: 4px 8px;
vertical-align: top; text-align: left; } th { background: #f6f6f6; }
.answer { white-space: pre-wrap; max-width: 420px; } .note { color: #a40; }
"""


def _figure_png(draw: Any) -> str:
    """Run `draw(ax)` on a new Agg figure; return an `<img>` tag with the PNG inlined."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.4), dpi=100)
    axes = figure.add_subplot()
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _by_layer(layers: list[dict[str, Any]], key: str, label: str, best: int) -> Any:
    def draw(ax: Any) -> None:
        points = [(e["layer"], e[key]) for e in layers if e.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3)
        chosen = [(e["layer"], e[key]) for e in layers if e.get(key) is not None and e.get("eligible")]
        ax.plot([p[0] for p in chosen], [p[1] for p in chosen], "o", ms=6, mfc="none", label="eligible (AUROC)")
        ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"best layer {best}")
        if key == "auroc":
            ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by layer")
        ax.legend(loc="best", fontsize=8)

    return draw


def _histogram(projections: dict[str, Any]) -> Any:
    def draw(ax: Any) -> None:
        import numpy as np

        bins = np.histogram_bin_edges(projections["pos"] + projections["neg"], bins=20)
        ax.hist(projections["neg"], bins=bins, alpha=0.6, label="neg (trait-negative prompt)")
        ax.hist(projections["pos"], bins=bins, alpha=0.6, label="pos (trait-positive prompt)")
        ax.set_xlabel(f"projection on the unit vector at layer {projections['layer']}")
        ax.set_ylabel("eval responses")
        ax.set_title("Held-out projections (no system prompt)")
        ax.legend(fontsize=8)

    return draw


def _sweep(sweep: list[dict[str, Any]], layer: int) -> Any:
    def draw(ax: Any) -> None:
        xs = [0.0] + [e["fraction"] for e in sweep]  # no steering: no gain
        for key, label in (("margin_gain", "margin gain"), ("pos_gain", "pos log-lik gain"),
                           ("neg_gain", "neg log-lik gain")):
            ax.plot(xs, [0.0] + [e[key] for e in sweep], marker="o", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("steering strength (fraction of the residual norm)")
        ax.set_ylabel("nats per token")
        ax.set_title(f"Likelihood under steering at layer {layer}")
        ax.legend(fontsize=8)

    return draw


def _curve(curve: list[dict[str, Any]]) -> Any:
    def draw(ax: Any) -> None:
        xs = [p["coef"] for p in curve]
        ax.plot(xs, [p["trait"] for p in curve], marker="o", label="trait score")
        ax.plot(xs, [p["coherence"] for p in curve], marker="s", label="coherence")
        ax.axhline(75, color="grey", ls=":", lw=1)
        ax.set_ylim(0, 100)
        ax.set_xlabel("steering coefficient")
        ax.set_ylabel("judge score (0-100)")
        ax.set_title("Judged steering curve")
        ax.legend(fontsize=8)

    return draw


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None, cls: str = "") -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{cls}">{escape(_fmt(v))}</td>' for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersonascopeError(f"cannot read {path} ({exc}); rerun `personascope evaluate` on the run") from None


def render_report(evaluation: dict[str, Any], config: dict[str, Any] | None = None, title: str = "") -> str:
    """The report page for one evaluation (as `evaluate_run` returns it) and the run's config."""
    best, trait = evaluation["best_layer"], evaluation["trait"]
    parts = [f"<h1>Persona vector: {escape(trait)}</h1>",
             f'<p class="sub">{escape(title or evaluation.get("model", ""))}</p>',
             "<h2>Choice</h2>",
             _table([("best layer", best), ("best coefficient", evaluation["best_coef"]),
                     ("as fraction of the residual norm", evaluation["best_fraction"]),
                     ("coefficient chosen by", evaluation["coef_source"]), ("rule", evaluation["rule"]),
                     ("judge", evaluation.get("judge", "none"))])]
    parts += [f'<p class="note">{escape(n)}</p>' for n in evaluation.get("notes", [])]
    layers = evaluation["layers"]
    plots = [_figure_png(_by_layer(layers, "auroc", "held-out AUROC", best)),
             _figure_png(_by_layer(layers, "margin_gain", f"margin gain at {layers[0]['fraction']:g}·norm", best)),
             _figure_png(_histogram(evaluation["projections"])),
             _figure_png(_sweep(evaluation["sweep"], best))]
    if evaluation.get("steering_curve"):
        plots.append(_figure_png(_curve(evaluation["steering_curve"])))
    parts += ["<h2>Validation</h2>", '<div class="grid">', *plots, "</div>"]
    if evaluation.get("steering_curve"):
        parts += ["<h3>Steering curve</h3>",
                  _table([(p["coef"], p["fraction"], p["trait"], p["coherence"], p["scored"], p["failed"])
                          for p in evaluation["steering_curve"]],
                         ("coef", "fraction", "trait", "coherence", "scored", "failed"))]
    parts += [f"<h2>Examples (greedy, no system prompt; steered at layer {best}, "
              f"coef {evaluation['best_coef']:.4g})</h2>",
              _table([(e["question"], e["unsteered"], e["steered"]) for e in evaluation["examples"]],
                     ("question", "unsteered", "steered"), cls="answer"),
              "<h2>Layers</h2>",
              _table([(e["layer"], e["auroc"], e["margin_gain"], e["coef"], e["residual_norm"], e["vector_norm"])
                      for e in layers],
                     ("layer", "AUROC", "margin gain", "coef", "residual norm", "vector norm")),
              "<h2>Counts and timings</h2>",
              _table([(k, v) for k, v in {**evaluation["counts"], **evaluation["timings"]}.items()])]
    if config:
        parts += ["<h2>Run configuration</h2>", _table(sorted(config.items()))]
    parts += ["<h2>Evaluation settings</h2>", _table(sorted(evaluation["settings"].items()))]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(trait)} persona vector</title><style>{_STYLE}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


def write_report(run_dir: Path) -> Path:
    """Write `DIR/report.html` from `DIR/eval.json` (and `DIR/manifest.json` for the run config); returns it."""
    run_dir = Path(run_dir)
    eval_path = run_dir / "eval.json"
    if not eval_path.exists():
        raise PersonascopeError(f"{run_dir} has no eval.json: run `personascope evaluate {run_dir}` first")
    evaluation = _read_json(eval_path)
    manifest = run_dir / "manifest.json"
    config = _read_json(manifest).get("config") if manifest.exists() else None
    html = render_report(evaluation, config, title=f"{evaluation.get('model', '')} · {run_dir.name}")
    out = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
