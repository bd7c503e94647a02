"""Screening that filters: drop rows by ΔP and write the others in the input's own format, unchanged, with a
report of every dropped row and why."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.apply.screen_summary import Screening, top_ids
from personascope.errors import PersonascopeError
from personascope.io.data import iter_rows, row_id
from personascope.io.files import atomic_write, check_output, write_json, write_text

#: Dropped rows listed in the Markdown report (the JSON report lists them all).
MARKDOWN_ROWS = 100


@dataclass(frozen=True)
class FilterRule:
    """Which scored rows to drop: ΔP ≥ `keep_below`, and/or the top `drop_top` % by ΔP (rounded up). Rows that
    could not be scored are dropped too: nothing vouches for them."""

    keep_below: float | None = None
    drop_top: float | None = None

    def check(self) -> None:
        if self.keep_below is None and self.drop_top is None:
            raise PersonascopeError("a filter needs --keep-below DELTA_P or --drop-top PERCENT")
        if self.keep_below is not None and not math.isfinite(self.keep_below):
            raise PersonascopeError(f"--keep-below must be a finite ΔP, got {self.keep_below}")
        if self.drop_top is not None and not 0 < self.drop_top < 100:
            raise PersonascopeError(f"--drop-top must be a percentage between 0 and 100 (exclusive), got "
                                    f"{self.drop_top}")


@dataclass(frozen=True)
class DroppedRow:
    """One input row left out of the filtered dataset: its position in the input, id, ΔP (None when unscored)."""

    row: int
    id: str
    delta_p: float | None
    reason: str


@dataclass(frozen=True)
class FilterReport:
    """What a filter kept and dropped (written as `<filtered>.report.json` and `.report.md`)."""

    data: str
    filtered: str
    keep_below: float | None
    drop_top: float | None
    cutoff: float | None
    n_rows: int
    n_kept: int
    n_dropped: int
    dropped: list[DroppedRow]


def default_filtered_path(data: Path, out: Path) -> Path:
    """`<out stem>.filtered<input suffix>` beside the scored rows (a folder for a saved dataset dir)."""
    suffix = "" if data.is_dir() else data.suffix
    return out.with_name(f"{out.stem}.filtered{suffix}")


def report_paths(filtered: Path) -> tuple[Path, Path]:
    """The JSON and Markdown report beside the filtered dataset."""
    stem = filtered.with_suffix("") if filtered.suffix else filtered
    return stem.with_name(stem.name + ".report.json"), stem.with_name(stem.name + ".report.md")


def check_filtered_path(data: Path, filtered: Path, inputs: Sequence[Path]) -> None:
    """The filtered dataset keeps the input's format: same suffix (or a new folder for a dataset dir)."""
    if data.is_dir():
        if filtered.exists():
            raise PersonascopeError(f"{filtered} exists: the filtered dataset goes into a new folder")
    elif filtered.suffix.lower() != data.suffix.lower():
        raise PersonascopeError(f"the filtered dataset keeps the input's format: name it *{data.suffix} "
                                f"(got {filtered})")
    for target in (filtered, *report_paths(filtered)):
        check_output(target, inputs, suffixes=None, what="filtered dataset")


def filter_dataset(screening: Screening, data: Path, filtered: Path, rule: FilterRule,
                   inputs: Sequence[Path]) -> FilterReport:
    """Write the input rows that the rule keeps to `filtered`, in the input's format and unchanged, and the
    report of the others beside it."""
    rule.check()
    check_filtered_path(data, filtered, inputs)
    delta = {s.id: s.delta_p for s in screening.scores}
    rejected: dict[str, str] = {}
    cutoff = rule.keep_below
    if rule.drop_top is not None and screening.scores:
        top, top_cutoff = top_ids(screening.scores, rule.drop_top)
        rejected.update({i: f"among the top {rule.drop_top:g}% by ΔP (ΔP ≥ {top_cutoff:.4g})" for i in top})
        cutoff = top_cutoff if cutoff is None else min(cutoff, top_cutoff)
    if rule.keep_below is not None:
        rejected.update({i: f"ΔP {d:.4g} ≥ --keep-below {rule.keep_below:g}" for i, d in delta.items()
                         if d >= rule.keep_below and i not in rejected})
    unscored: dict[str, deque[str]] = defaultdict(deque)
    for bad in screening.skipped:
        unscored[bad.id].append(bad.reason)
    keep = bytearray()
    dropped: list[DroppedRow] = []
    seen: set[str] = set()
    for rows in iter_rows(data):
        for row in rows:
            index, rid = len(keep), row_id(row, len(keep))
            scored = rid in delta and rid not in seen  # a scored id is always its first row (iter_samples)
            seen.add(rid)
            keep.append(scored and rid not in rejected)
            if keep[-1]:
                continue
            if scored:
                dropped.append(DroppedRow(index, rid, delta[rid], rejected[rid]))
            else:
                reason = unscored[rid].popleft() if unscored[rid] else "not scored"
                dropped.append(DroppedRow(index, rid, None, f"not scored: {reason}"))
    write_like_input(data, filtered, keep)
    dropped.sort(key=lambda d: (d.delta_p is None, -(d.delta_p or 0.0), d.row))
    report = FilterReport(str(data), str(filtered), rule.keep_below, rule.drop_top, cutoff, len(keep), sum(keep),
                          len(dropped), dropped)
    json_path, md_path = report_paths(filtered)
    write_json(json_path, report)
    write_text(md_path, markdown(report))
    return report


def write_like_input(data: Path, out: Path, keep: bytearray) -> Path:
    """Copy the input rows whose flag in `keep` is set (by row position) to `out`, in the input's format: JSONL
    lines and CSV records as they were, Parquet batches with the input's schema, a dataset dir via `datasets`."""
    suffix = data.suffix.lower()
    if data.is_dir():
        from personascope.io.data import load_rows

        load_rows(data).select([i for i, k in enumerate(keep) if k]).save_to_disk(str(out))
        return out
    if suffix == ".parquet":
        return atomic_write(out, lambda tmp: _parquet(data, tmp, keep))
    if suffix == ".csv":
        return atomic_write(out, lambda tmp: _csv(data, tmp, keep))
    if suffix == ".json" and data.read_text(encoding="utf-8").lstrip().startswith("["):
        rows = json.loads(data.read_text(encoding="utf-8"))
        return write_text(out, json.dumps([r for r, k in zip(rows, keep) if k], ensure_ascii=False, indent=1))
    return atomic_write(out, lambda tmp: _lines(data, tmp, keep))


def _lines(data: Path, tmp: Path, keep: bytearray) -> None:
    """JSON lines: the kept lines byte for byte (blank lines are not rows)."""
    index = 0
    with open(data, encoding="utf-8", newline="") as source, open(tmp, "w", encoding="utf-8", newline="") as out:
        for line in source:
            if not line.strip():
                continue
            if keep[index]:
                out.write(line if line.endswith("\n") else line + "\n")
            index += 1


def _csv(data: Path, tmp: Path, keep: bytearray) -> None:
    """CSV: the header and the kept records, every field as the text it was (blank lines are not rows)."""
    with open(data, encoding="utf-8", newline="") as source, open(tmp, "w", encoding="utf-8", newline="") as out:
        records = (record for record in csv.reader(source) if record)
        writer = csv.writer(out)
        writer.writerow(next(records, []))
        for index, record in enumerate(records):
            if keep[index]:
                writer.writerow(record)


def _parquet(data: Path, tmp: Path, keep: bytearray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(data)
    start = 0
    with pq.ParquetWriter(tmp, reader.schema_arrow) as writer:
        for batch in reader.iter_batches():
            taken = [i for i in range(batch.num_rows) if keep[start + i]]
            start += batch.num_rows
            if taken:
                writer.write_table(pa.Table.from_batches([batch]).take(taken))


def markdown(report: FilterReport, shown: int = MARKDOWN_ROWS) -> str:
    """The report as Markdown: the rule, the counts and a table of the dropped rows (highest ΔP first)."""
    rule = " and ".join(part for part in (
        f"ΔP ≥ {report.keep_below:g} dropped" if report.keep_below is not None else "",
        f"top {report.drop_top:g}% by ΔP dropped" if report.drop_top is not None else "") if part)
    lines = [f"# Filtered {report.data}", "",
             f"Rule: {rule}; rows that could not be scored are dropped too.", "",
             f"Kept {report.n_kept} of {report.n_rows} rows in `{report.filtered}`; dropped {report.n_dropped}.", "",
             "| row | id | ΔP | why |", "|---|---|---|---|"]
    for d in report.dropped[:shown]:
        value = "—" if d.delta_p is None else f"{d.delta_p:+.4f}"
        lines.append(f"| {d.row} | {_cell(d.id)} | {value} | {_cell(d.reason)} |")
    if len(report.dropped) > shown:
        lines.append(f"\n… {len(report.dropped) - shown} more dropped rows in the JSON report.")
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
