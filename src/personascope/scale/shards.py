"""Shard files for resumable distributed runs: rows `[k * size, (k + 1) * size)` of the input go to shard `k`,
which is renamed into place once it holds a record for each of its rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io.records import RecordLog, write_records

PRIMARY = ("scored", "skipped")


def read_shard(path: Path) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """The records of a finished shard, in row order."""
    for index, kind, row_id, payload in RecordLog(path).read():
        yield int(index), str(kind), str(row_id), payload


class ShardWriter:
    """Collects records into shard files under `folder`."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.count = 0
        self.n_rows = 0
        self.done: set[int] = set()
        self.recorded: set[int] = set()  # rows of unfinished shards that have their primary record
        self._seen: dict[int, int] = {}

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.jsonl"

    def _partial(self, shard: int) -> RecordLog:
        return RecordLog(self.folder / f".shard-{shard:06d}.partial")

    def rows_in(self, shard: int) -> int:
        return min(self.size, self.n_rows - shard * self.size)

    def plan(self, n_rows: int) -> None:
        """Size the run for `n_rows` input rows; finds the finished shards, and the rows a killed run recorded in
        unfinished ones (they are not scored again)."""
        self.n_rows, self.count = n_rows, -(-n_rows // self.size)
        self.done = {k for k in range(self.count) if self.path(k).exists()}
        self.recorded, self._seen = set(), {}
        for partial in sorted(self.folder.glob(".shard-*.partial")):
            shard = int(partial.name[len(".shard-"):-len(".partial")])
            if shard in self.done or shard >= self.count:
                partial.unlink()  # a shard finished just before a kill, or a leftover of another plan
                continue
            rows = {int(index) for index, kind, _, _ in RecordLog(partial).read() if kind in PRIMARY}
            self.recorded |= rows
            self._seen[shard] = len(rows)
            if len(rows) == self.rows_in(shard):  # killed between its last record and its rename
                self._finish(shard)

    @property
    def pending(self) -> list[int]:
        return [k for k in range(self.count) if k not in self.done]

    @property
    def pending_rows(self) -> int:
        return sum(self.rows_in(k) for k in self.pending) - len(self.recorded)

    @property
    def finished(self) -> int:
        return len(self.done)

    def add(self, indices: Sequence[int], kinds: Sequence[str], ids: Sequence[str], payloads: Sequence[Any]) -> int:
        """Append records; returns how many rows they account for. A row's other records (`truncated`) are
        written before its primary one, so a row with a primary record has all of its records."""
        by_shard: dict[int, list[list[Any]]] = {}
        rows = 0
        order = sorted(range(len(indices)), key=lambda i: kinds[i] in PRIMARY)
        for i in order:
            index, kind = int(indices[i]), kinds[i]
            shard = index // self.size
            if shard in self.done:
                raise PersonascopeError(f"row {index} came back for shard {shard}, which is already finished")
            by_shard.setdefault(shard, []).append([index, kind, ids[i], payloads[i]])
            if kind in PRIMARY:
                self._seen[shard] = self._seen.get(shard, 0) + 1
                rows += 1
        for shard, records in by_shard.items():
            self._partial(shard).extend(records)
            if self._seen.get(shard) == self.rows_in(shard):
                self._finish(shard)
        return rows

    def _finish(self, shard: int) -> None:
        partial = self._partial(shard)
        write_records(self.path(shard), sorted(partial.read(), key=lambda record: int(record[0])))
        partial.path.unlink()
        self.done.add(shard)
        self.recorded -= set(range(shard * self.size, shard * self.size + self.rows_in(shard)))
        del self._seen[shard]

    def check_complete(self) -> None:
        """Raise when a shard did not get a record for each of its rows."""
        missing = self.pending
        if missing:
            raise PersonascopeError(f"shards {missing[:5]} did not receive every row; rerun to finish them")
