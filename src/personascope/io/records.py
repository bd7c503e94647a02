"""Append-only record files (JSONL): the one writer and reader of every file a run appends to."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from personascope.errors import PersonascopeError
from personascope.io.files import atomic_write, write_error

log = logging.getLogger("personascope")

_TAIL_CHUNK = 1 << 16


def encode(record: Any) -> str:
    """A record as one JSON line (with its newline): the one serialisation of JSONL rows, appended or whole."""
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class RecordLog:
    """A JSONL file of records, appended and flushed one call at a time.

    Every `append`/`extend` call writes its lines with one `write`, flushes them (a killed process loses nothing
    written) and fsyncs them (a lost machine loses at most that call). A killed writer can leave a torn last line;
    the first read or write of the file moves it, appended, to `<file>.torn` (one warning line), so its record is
    made again. A line that is not JSON anywhere else is damage, not a kill: it raises, naming file and line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.torn_path = self.path.with_name(self.path.name + ".torn")
        self._checked = False

    def read(self) -> list[Any]:
        """Every record in file order, read line by line (a torn last line is moved aside first)."""
        if not self.path.exists():
            return []
        self._cut_unfinished_line()
        records: list[Any] = []
        bad: tuple[int, int, ValueError] | None = None  # (line number, offset, error) of a line that did not parse
        offset = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if bad is not None:
                    raise PersonascopeError(
                        f"{self.path}, line {bad[0]}: not a JSON record ({bad[2]}); the file is damaged in the "
                        "middle, which a killed run cannot cause: repair or delete that line, then rerun")
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    bad = (number, offset, exc)
                offset += len(line)
        if bad is not None:  # a whole last line that does not parse: torn all the same
            self._move_aside(bad[1])
        return records

    def rows(self) -> dict[str, dict[str, Any]]:
        """The records that are objects with an `id`, by id (a later record with the same id wins)."""
        return {str(r["id"]): r for r in self.read() if isinstance(r, dict) and "id" in r}

    def append(self, record: Any) -> None:
        """Append one record, flushed and synced."""
        self.extend([record])

    def extend(self, records: Iterable[Any]) -> None:
        """Append records with one write, flushed and synced."""
        text = "".join(encode(r) for r in records)
        if not text:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._checked:
                self._cut_unfinished_line()
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # what reached the file is at most a torn last line, moved aside on resume
            raise write_error(self.path, exc) from None

    def _cut_unfinished_line(self) -> None:
        """Move the bytes after the last newline (a line a kill cut short) to the `.torn` file."""
        self._checked = True
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            cut = _last_line_end(handle)
        if cut is not None:
            self._move_aside(cut)

    def _move_aside(self, offset: int) -> None:
        """Append the bytes from `offset` to the end to the `.torn` file, then cut the log there."""
        with open(self.path, "rb+") as handle:
            handle.seek(offset)
            torn = handle.read()
            with open(self.torn_path, "ab") as aside:
                aside.write(torn.rstrip(b"\n") + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(offset)
            handle.flush()
            os.fsync(handle.fileno())
        log.warning(f"warning: {self.path}: moved a torn last line ({len(torn)} bytes, left by an interrupted run) "
                    f"to {self.torn_path.name}; its record is made again")


def _last_line_end(handle: BinaryIO) -> int | None:
    """The offset just after the file's last newline (0 if it has none), or None when it ends with one."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return None
    handle.seek(end - 1)
    if handle.read(1) == b"\n":
        return None
    position = end
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        handle.seek(start)
        found = handle.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def write_records(path: str | Path, records: Iterable[Any]) -> Path:
    """Write a finished record file whole, atomically (temporary file, synced, renamed)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for record in records:
                out.write(encode(record))

    return atomic_write(path, write)
