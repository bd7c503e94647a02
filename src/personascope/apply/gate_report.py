"""The gate's verdict for CI systems: JUnit XML (one test case per trait) and a Markdown summary with a plot."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from personascope.apply.gate import GateReport, TraitGate
from personascope.io.files import write_text

SUITE = "personascope gate"


def _verdict(t: TraitGate) -> str:
    side = "within" if t.passed else "past"
    return (f"{t.trait}: shift {t.units:+.3f} trait units ({t.shift:+.4f} along the vector at layer {t.layer}; "
            f"the system-prompt gap is {t.gap:+.4f}), {side} the limit {t.max_shift:g}")


def write_junit(report: GateReport, path: str | Path) -> Path:
    """One `testcase` per trait, with a `failure` element when it shifted past the limit."""
    suite = ET.Element("testsuite", name=SUITE, tests=str(len(report.traits)), failures=str(len(report.failed)),
                       errors="0", skipped="0")
    properties = ET.SubElement(suite, "properties")
    for name, value in (("base", report.base_model), ("candidate", report.candidate_model),
                        ("max_shift", f"{report.max_shift:g}")):
        ET.SubElement(properties, "property", name=name, value=value)
    for trait in report.traits:
        case = ET.SubElement(suite, "testcase", classname="personascope.gate", name=trait.trait)
        if not trait.passed:
            failure = ET.SubElement(case, "failure", message=_verdict(trait), type="PersonaShift")
            failure.text = (f"candidate {report.candidate_model} vs base {report.base_model}: base projection "
                            f"{trait.base_projection:+.4f}, candidate {trait.candidate_projection:+.4f}, base under "
                            f"the trait's system prompts {trait.prompted_projection:+.4f} "
                            f"({trait.n_questions} probe questions)")
        ET.SubElement(case, "system-out").text = _verdict(trait)
    root = ET.Element("testsuites", name=SUITE, tests=suite.get("tests", "0"), failures=suite.get("failures", "0"))
    root.append(suite)
    ET.indent(root)
    return write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n")


def plot_gate(report: GateReport, path: str | Path) -> Path:
    """Horizontal bars of each trait's shift in trait units, with the limit as a dashed line (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6, 1.4 + 0.45 * len(report.traits)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = [t.trait for t in report.traits]
    axes.barh(names, [t.units for t in report.traits],
              color=["#55a868" if t.passed else "#c44e52" for t in report.traits])
    axes.axvline(report.max_shift, color="black", linestyle="--", linewidth=1, label=f"limit {report.max_shift:g}")
    axes.axvline(0.0, color="grey", linewidth=0.8)
    axes.invert_yaxis()
    axes.set(xlabel="shift (share of the plain → system-prompted gap)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)
    return path


def write_markdown(report: GateReport, path: str | Path) -> Path:
    """A summary table and a bar plot (written beside it as `<name>.png` and linked by its file name)."""
    path = Path(path)
    image = plot_gate(report, path.with_suffix(".png"))
    verdict = "passed" if report.passed else f"FAILED ({', '.join(t.trait for t in report.failed)})"
    lines = [
        f"## Persona gate: {verdict}",
        "",
        f"Candidate `{report.candidate_model}` against base `{report.base_model}`; limit {report.max_shift:g} "
        "trait units (share of the plain → system-prompted gap).",
        "",
        "| trait | layer | shift (trait units) | shift (projection) | system-prompt gap | result |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {t.trait} | {t.layer} | {t.units:+.3f} | {t.shift:+.4f} | {t.gap:+.4f} | "
              f"{'pass' if t.passed else '**FAIL**'} |" for t in report.traits]
    lines += ["", f"![persona shift per trait]({image.name})", ""]
    return write_text(path, "\n".join(lines))
