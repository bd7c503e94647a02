"""The one append-only record writer and reader: torn last lines moved aside and redone, damage in the middle an
error naming file and line, and a writer killed at random moments loses nothing it finished writing."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from personascope.errors import PersonascopeError
from personascope.io.records import RecordLog, write_records


def test_records_append_read_and_rows_by_id(tmp_path):
    log = RecordLog(tmp_path / "deep" / "rows.jsonl")
    assert log.read() == [] and log.rows() == {}
    log.append({"id": "a", "v": 1})
    log.extend([{"id": "b", "v": "é"}, [1, "list", "record"], {"id": "a", "v": 2}])
    log.extend([])
    assert log.read() == [{"id": "a", "v": 1}, {"id": "b", "v": "é"}, [1, "list", "record"], {"id": "a", "v": 2}]
    assert log.rows() == {"a": {"id": "a", "v": 2}, "b": {"id": "b", "v": "é"}}
    assert log.path.read_text(encoding="utf-8").count("\n") == 4 and not log.torn_path.exists()


def test_a_torn_last_line_is_moved_aside_with_one_warning_and_redone(tmp_path, caplog):
    log = RecordLog(tmp_path / "rows.jsonl")
    log.extend([{"id": "1"}, {"id": "2"}])
    with open(log.path, "ab") as handle:
        handle.write(b'{"id": "3", "te')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING, logger="personascope"):
        assert set(RecordLog(log.path).rows()) == {"1", "2"}
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {log.path}: moved a torn last line (15 bytes, left by an interrupted run) to rows.jsonl.torn; "
        "its record is made again"]
    assert log.torn_path.read_bytes() == b'{"id": "3", "te\n'
    RecordLog(log.path).append({"id": "3"})  # redone
    # a whole last line that does not parse (e.g. zeros after a power loss) is torn too, and appended aside
    with open(log.path, "ab") as handle:
        handle.write(b"\x00\x00\x00\n")
    appender = RecordLog(log.path)
    assert [r["id"] for r in appender.read()] == ["1", "2", "3"]
    assert log.torn_path.read_bytes() == b'{"id": "3", "te\n\x00\x00\x00\n'
    # a torn line with no newline at all in the file, found by the first append (no read before it)
    only = RecordLog(tmp_path / "only.jsonl")
    only.path.write_bytes(b'{"id": "x"')
    only.append({"id": "x"})
    assert only.read() == [{"id": "x"}] and only.torn_path.read_bytes() == b'{"id": "x"\n'


def test_a_malformed_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "1"}\n{"id": "2"}\nnot json\n{"id": "4"}\n')
    with pytest.raises(PersonascopeError, match=rf"{path}, line 3: not a JSON record .* repair or delete that line"):
        RecordLog(path).read()
    assert path.read_text().count("\n") == 4 and not (tmp_path / "rows.jsonl.torn").exists()  # nothing touched


def test_finished_record_files_are_written_whole(tmp_path):
    path = write_records(tmp_path / "done.jsonl", ({"i": i} for i in range(3)))
    assert RecordLog(path).read() == [{"i": 0}, {"i": 1}, {"i": 2}]

    def failing():
        yield {"i": 9}
        raise OSError(27, "File too large")

    with pytest.raises(PersonascopeError, match=rf"cannot write {path}: File too large; what was finished before"):
        write_records(path, failing())
    assert RecordLog(path).read() == [{"i": 0}, {"i": 1}, {"i": 2}] and os.listdir(tmp_path) == ["done.jsonl"]


WRITER = """
import sys
from personascope.io.records import RecordLog
log = RecordLog(sys.argv[1])
start = len(log.read())
for i in range(start, 10**9):
    log.append({"id": str(i), "pad": "x" * (i % 5000)})
"""


def test_a_writer_killed_at_random_moments_keeps_every_finished_record(tmp_path):
    """SIGKILL a real appending process at seven seeded random moments; each rerun goes on from what is there."""
    path = tmp_path / "rows.jsonl"
    rng = random.Random(20)
    for _ in range(7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stderr=subprocess.DEVNULL)
        while not path.exists() or path.stat().st_size == 0:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    ids = [int(r["id"]) for r in RecordLog(path).read()]
    assert ids == list(range(len(ids))) and len(ids) > 7  # nothing lost, nothing written twice
    torn = RecordLog(path).torn_path
    for line in torn.read_text().splitlines() if torn.exists() else []:
        with pytest.raises(ValueError):
            json.loads(line)  # only cut lines were moved aside, each at most once per kill


def test_a_folder_of_files_is_saved_file_by_file_whole(tmp_path):
    from personascope.io.files import save_whole

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "kept.txt").write_text("other output")
    (folder / ".saving-stale").mkdir()  # left by a killed save
    save_whole(folder, lambda tmp: [(tmp / name).write_text(name) for name in ("a.json", "b.bin")])
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.bin", "kept.txt"]

    def failing(tmp):
        (tmp / "a.json").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(PersonascopeError, match=f"cannot write {folder}: No space left on device"):
        save_whole(folder, failing)
    assert (folder / "a.json").read_text() == "a.json" and sorted(p.name for p in folder.iterdir()) == [
        "a.json", "b.bin", "kept.txt"]
