"""Shard files for resumable distributed runs: rows `[k * size, (k + 1) * size)` of the input go to shard `k`,
which is renamed into place once it holds a record for each of its rows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError

PRIMARY = ("scored", "skipped")


def read_shard(path: Path) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """The records of a finished shard, in row order."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            index, kind, row_id, payload = json.loads(line)
            yield int(index), str(kind), str(row_id), payload


class ShardWriter:
    """Collects records into shard files under `folder`."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.count = 0
        self.n_rows = 0
        self.done: set[int] = set()
        self._seen: dict[int, int] = {}

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.jsonl"

    def _partial(self, shard: int) -> Path:
        return self.folder / f".shard-{shard:06d}.partial"

    def rows_in(self, shard: int) -> int:
        return min(self.size, self.n_rows - shard * self.size)

    def plan(self, n_rows: int) -> None:
        """Size the run for `n_rows` input rows; finds the finished shards and clears partial ones."""
        self.n_rows, self.count = n_rows, -(-n_rows // self.size)
        self.done = {k for k in range(self.count) if self.path(k).exists()}
        for stale in self.folder.glob(".shard-*.partial"):
            stale.unlink()

    @property
    def pending(self) -> list[int]:
        return [k for k in range(self.count) if k not in self.done]

    @property
    def pending_rows(self) -> int:
        return sum(self.rows_in(k) for k in self.pending)

    @property
    def finished(self) -> int:
        return len(self.done)

    def add(self, indices: Sequence[int], kinds: Sequence[str], ids: Sequence[str], payloads: Sequence[str]) -> int:
        """Append records (payloads as JSON text); returns how many rows they account for."""
        by_shard: dict[int, list[str]] = {}
        rows = 0
        for index, kind, row_id, payload in zip(indices, kinds, ids, payloads):
            shard = int(index) // self.size
            if shard in self.done:
                raise PersonascopeError(f"row {index} came back for shard {shard}, which is already finished")
            by_shard.setdefault(shard, []).append(
                f"[{int(index)}, {json.dumps(kind)}, {json.dumps(row_id, ensure_ascii=False)}, {payload}]\n")
            if kind in PRIMARY:
                self._seen[shard] = self._seen.get(shard, 0) + 1
                rows += 1
        for shard, lines in by_shard.items():
            with open(self._partial(shard), "a", encoding="utf-8") as out:
                out.writelines(lines)
            if self._seen[shard] == self.rows_in(shard):
                self._finish(shard)
        return rows

    def _finish(self, shard: int) -> None:
        partial = self._partial(shard)
        with open(partial, encoding="utf-8") as lines:
            records = sorted(lines, key=lambda line: int(line[1:line.index(",")]))
        with open(partial, "w", encoding="utf-8") as out:  # the partial file is the temporary one: renamed whole
            out.writelines(records)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(self.path(shard))
        self.done.add(shard)
        del self._seen[shard]

    def check_complete(self) -> None:
        """Raise when a shard did not get a record for each of its rows."""
        missing = self.pending
        if missing:
            raise PersonascopeError(f"shards {missing[:5]} did not receive every row; rerun to finish them")
