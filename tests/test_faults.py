"""Faults injected into real runs: SIGKILL at seeded random points of `extract`, `screen` and Ray screening, torn
and damaged record files, a judge that fails 30% of its calls, a full disk and a read-only output folder.

Each kill test kills one run directory five times in a row, each time after a seeded random number of new records
has reached the file, then lets a last run finish. Every record written before a kill must still be there at the
end, unchanged, and the run's records must number exactly the planned items (nothing lost, nothing made twice); the
outputs must equal those of an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from personascope.apply.screen import screen_dataset
from personascope.errors import PersonascopeError
from personascope.extract import extract
from personascope.inference.generate import SamplingConfig
from personascope.model import load_model
from personascope.vector import PersonaVector
from tests.loopback import Loopback, Reply, openai_reply
from tests.test_extract import POSITIONS, tiny_config, write_trait
from tests.test_screen import read_jsonl, tiny, write_jsonl  # noqa: F401  (tiny is a fixture)

ROOT = Path(__file__).parents[1]
KILLS = int(os.environ.get("PERSONASCOPE_KILLS", "5"))  # benchmarks/crash.py asks for more
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: one thread each is ~10x faster
FIGURES: dict[str, dict[str, object]] = {}  # what each test measured, for benchmarks/crash.py


@pytest.fixture(autouse=True, scope="module")
def figures():
    """Write FIGURES as JSON to $PERSONASCOPE_FAULT_FIGURES (when set) once the module's tests ran."""
    yield
    if os.environ.get("PERSONASCOPE_FAULT_FIGURES"):
        Path(os.environ["PERSONASCOPE_FAULT_FIGURES"]).write_text(json.dumps(FIGURES, indent=2))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs in this process on one thread too, as in the child processes (same numbers, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def complete_lines(*paths: Path) -> list[str]:
    """The newline-ended lines of the files (a line cut by a kill is not one)."""
    lines: list[str] = []
    for path in paths:
        if path.exists():
            lines += path.read_bytes().decode("utf-8", "replace").split("\n")[:-1]
    return lines


def kill_after(command: list[str], count, new: int, *, group: bool = False, timeout: float = 300) -> None:
    """Start `command` and SIGKILL it once `count()` has grown by `new`; fail if it ends on its own first."""
    start = count()
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=devnull, stderr=subprocess.PIPE,
                                start_new_session=group)
    deadline = time.monotonic() + timeout
    try:
        while count() < start + new:
            assert proc.poll() is None, f"the run ended before its kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
    finally:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        else:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def killed_repeatedly(command: list[str], files, seed: int, budget: int, *, group: bool = False) -> list[list[str]]:
    """Kill `command` KILLS times, each after a seeded 1..`budget / KILLS` new lines in `files()`; returns the
    lines after each kill."""
    rng, most = random.Random(seed), max(1, budget // KILLS)
    seen = []
    for _ in range(KILLS):
        kill_after(command, lambda: len(complete_lines(*files())), rng.randint(1, most), group=group)
        seen.append(complete_lines(*files()))
    return seen


def assert_kept(seen: list[list[str]], final: list[str]) -> None:
    """Every record present after each kill is in the final files, unchanged."""
    for lines in seen:
        missing = set(lines) - set(final)
        assert not missing, f"{len(missing)} records written before a kill were lost or changed"


def measure(stage: str, seen: list[list[str]], final: list[str], ids: list, planned: int, torn: list[Path]) -> None:
    """Keep a kill test's figures: kills, items planned, lost (planned without a record), recorded twice, and the
    torn lines moved aside (each one item made again)."""
    FIGURES[stage] = {"kills": len(seen), "planned": planned, "lost": planned - len(set(ids)),
                      "recorded_twice": len(ids) - len(set(ids)),
                      "lost_before_kill": len(set().union(*map(set, seen)) - set(final)),
                      "torn_redone": sum(len(complete_lines(path)) for path in torn)}


# -- extract ----------------------------------------------------------------------------------------------------

SETTINGS = dict(samples=2, max_new_tokens=24, eval_layers=(2,), max_batch=1)  # 30 rows, one a batch
EXTRACT = ("import sys; from pathlib import Path; from personascope.extract import extract; "
           "from tests.test_extract import tiny_config; from tests.test_faults import SETTINGS; "
           "extract(tiny_config(Path(sys.argv[1]), model=sys.argv[3], **SETTINGS), sys.argv[2], progress=False)")


@pytest.fixture(scope="module")
def trait(tmp_path_factory) -> Path:
    return write_trait(tmp_path_factory.mktemp("trait") / "tiny.json")


@pytest.fixture(scope="module")
def reference(trait, tiny_chat, tmp_path_factory):
    """An uninterrupted run on the tiny chat model, and its config and model."""
    config = tiny_config(trait, model=str(tiny_chat), **SETTINGS)
    handle = load_model(str(tiny_chat))
    return config, handle, extract(config, tmp_path_factory.mktemp("reference") / "run", handle=handle,
                                   progress=False)


def test_extract_killed_five_times_loses_and_redoes_nothing(trait, tiny_chat, reference, tmp_path):
    config, handle, uninterrupted = reference
    out, log = tmp_path / "killed", tmp_path / "killed" / "responses.jsonl"
    seen = killed_repeatedly([sys.executable, "-c", EXTRACT, str(trait), str(out), str(tiny_chat)],
                             lambda: [log], seed=20, budget=15)
    resumed = extract(config, out, handle=handle, progress=False)
    final = complete_lines(log)
    measure("extract", seen, final, [json.loads(line)["id"] for line in final], 30, [out / "responses.jsonl.torn"])
    assert_kept(seen, final)
    assert len(final) == 30 and len({json.loads(line)["id"] for line in final}) == 30  # each item made once
    assert resumed.summary["generated"] == 30 - len(seen[-1])

    assert sorted(final) == sorted(complete_lines(uninterrupted.run_dir / "responses.jsonl"))  # the same text
    for position in POSITIONS:  # the same vectors, bit for bit
        mine = PersonaVector.load(out / "vectors" / f"{position}.safetensors").directions
        assert torch.equal(mine, PersonaVector.load(uninterrupted.vectors[position]).directions)
    assert (resumed.evaluation.best_layer, resumed.evaluation.best_coef) == (
        uninterrupted.evaluation.best_layer, uninterrupted.evaluation.best_coef)


def test_a_torn_last_line_is_redone_and_a_damaged_middle_line_named(reference, tmp_path, caplog):
    config, handle, uninterrupted = reference
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir, out)
    log = out / "responses.jsonl"
    lines = log.read_bytes().split(b"\n")[:-1]
    log.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:25])  # the last record torn by a kill
    again = extract(config, out, handle=handle, progress=False)
    assert again.summary["generated"] == 1  # the torn item, and only it, is made again
    assert log.read_bytes().split(b"\n")[:-1] == lines  # the same record as before
    assert (out / "responses.jsonl.torn").read_bytes() == lines[-1][:25] + b"\n"
    assert sum("torn last line" in r.getMessage() for r in caplog.records) == 1
    for position in POSITIONS:  # outputs derived from the redone row are made again, and the same
        mine = PersonaVector.load(out / "vectors" / f"{position}.safetensors").directions
        assert torch.equal(mine, PersonaVector.load(uninterrupted.vectors[position]).directions)

    damaged = lines[:3] + [b'{"id": "extract/pos/p0/q0'] + lines[3:]
    log.write_bytes(b"\n".join(damaged) + b"\n")
    with pytest.raises(PersonascopeError, match=rf"{log}, line 4: not a JSON record"):
        extract(config, out, handle=handle, progress=False)
    assert log.read_bytes() == b"\n".join(damaged) + b"\n"  # left for the user to repair
    FIGURES.setdefault("bad inputs", {}).update({"torn last line": "moved aside, redone",
                                                "damaged middle line": "error naming file and line"})


# -- screen -----------------------------------------------------------------------------------------------------


def screen_command(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "personascope.cli", "screen", str(data), "-v",
            str(model_dir.parent / "tiny.safetensors"), "--out", str(out), "--model", str(model_dir),
            "--max-new-tokens", "24", "--batch-size", "1", *extra]


def screen_rows(count: int) -> list[dict]:
    return [{"id": f"r{i:02d}", "prompt": f"Question number {i}: " + "why? " * (i % 5),
             "response": f"Answer {i}, because."} for i in range(count)]


def test_screen_killed_five_times_loses_and_redoes_nothing(tiny, tmp_path):
    handle, vector, model_dir = tiny
    data = write_jsonl(tmp_path / "data.jsonl", screen_rows(24))
    out = tmp_path / "scored.jsonl"
    cache = tmp_path / "scored.work" / "base_responses.jsonl"
    seen = killed_repeatedly(screen_command(model_dir, data, out), lambda: [cache], seed=21, budget=12)
    assert not out.exists()
    sampling = SamplingConfig(24, 0.0)
    screen_dataset(handle, data, vector, out, sampling=sampling, max_batch=1, progress=False)
    final = complete_lines(cache)
    ids = [json.loads(line)["id"] for line in final]
    measure("screen", seen, final, ids, 24, [cache.parent / f"{cache.name}.torn"])
    assert_kept(seen, final)
    assert len(final) == 24 and len({json.loads(line)["id"] for line in final}) == 24  # each answer made once

    reference = screen_dataset(handle, data, vector, tmp_path / "reference.jsonl", sampling=sampling, max_batch=1,
                               progress=False)
    assert sorted(final) == sorted(complete_lines(tmp_path / "reference.work" / "base_responses.jsonl"))
    assert out.read_bytes() == reference.scored.read_bytes()  # the scored rows, bit for bit
    # the cached answers also serve as a base-responses file
    from_file = screen_dataset(handle, data, vector, tmp_path / "from_file.jsonl", base=cache, progress=False)
    assert [r["base_projection"] for r in read_jsonl(from_file.scored)] == pytest.approx(
        [r["base_projection"] for r in read_jsonl(out)], abs=1e-4)


def ray_counts(shards: Path) -> list[Path]:
    return [*shards.glob("shard-*.jsonl"), *shards.glob(".shard-*.partial")]


def test_ray_screen_killed_five_times_loses_and_redoes_nothing(tiny, tmp_path):
    pytest.importorskip("ray")
    handle, vector, model_dir = tiny
    rows = 600  # far more than the five runs reach before their kills
    data = write_jsonl(tmp_path / "data.jsonl", screen_rows(rows))
    out, shards = tmp_path / "scored.jsonl", tmp_path / "scored.work" / "ray"
    command = screen_command(model_dir, data, out, "--base", "prompt-last", "--ray", "local", "--workers", "2",
                             "--shard-rows", "7")
    seen = killed_repeatedly(command, lambda: ray_counts(shards), seed=22, budget=200, group=True)
    rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = complete_lines(*ray_counts(shards))
    assert_kept(seen, final)
    indices = [json.loads(line)[0] for line in final if json.loads(line)[1] in ("scored", "skipped")]
    measure("screen --ray", seen, final, indices, rows, list(shards.glob("*.torn")))
    assert sorted(indices) == list(range(rows))  # one record per row: none lost, none written twice
    assert not list(shards.glob(".shard-*"))

    single = screen_dataset(handle, data, vector, tmp_path / "single.jsonl", base="prompt-last", progress=False)
    ours, theirs = read_jsonl(out), read_jsonl(single.scored)
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    assert [r["delta_p"] for r in ours] == pytest.approx([r["delta_p"] for r in theirs], abs=1e-4)


# -- a failing judge --------------------------------------------------------------------------------------------

NEVER = "extract/pos/p1/q02/s0"  # the row whose judging fails on every attempt


def answer_of(prompt: str) -> str:
    """The answer a judge prompt asks about (the tiny trait's rubric, or the coherence rubric)."""
    if prompt.startswith("How optimistic"):
        return prompt.split("\nANSWER: ", 1)[1].rsplit("\nEND OF ANSWER", 1)[0]
    return prompt.split("[ANSWER START]\n", 1)[1].rsplit("\n[ANSWER END]", 1)[0]


def faulty_judge(run: Path, seed: int = 23):
    """Fail 30% of calls, chosen by a seeded hash of (prompt, attempt): a 500, a 429 with Retry-After: 0.2, or an
    answer slower than the client's timeout. Score pos rows 90 and neg 10 for the trait, 80 for coherence; always
    answer 500 for the row NEVER. Returns the handler and the log of (prompt, arrival time, fault or None)."""
    calls: list[tuple[str, float, str | None]] = []

    def handle(request):
        prompt = request.prompt
        attempt = 1 + sum(1 for p, _, _ in calls if p == prompt)
        records = map(json.loads, complete_lines(run / "responses.jsonl"))
        row = {r["response"]: r["id"] for r in records}.get(answer_of(prompt))
        draw = hashlib.sha256(f"{seed}:{prompt}:{attempt}".encode()).digest()[0] % 10
        fault = {0: "500", 1: "429", 2: "timeout"}.get(draw)
        calls.append((prompt, time.monotonic(), "never" if row == NEVER else fault))
        if row == NEVER or fault == "500":
            return Reply({"error": "internal"}, status=500)
        if fault == "429":
            return Reply({"error": "slow down"}, status=429, headers={"retry-after": "0.2"})
        score = 80 if not prompt.startswith("How optimistic") else 90 if row and "/pos/" in row else 10
        return Reply(openai_reply(str(score), {str(score): -0.01, "x": -5.0}), delay=1.0 if fault == "timeout" else 0)

    return handle, calls


def test_a_judge_failing_30_percent_of_calls_is_absorbed_and_its_failures_named(trait, tiny_chat, tmp_path):
    out = tmp_path / "judged"
    handler, calls = faulty_judge(out)
    with Loopback(handler) as server:
        config = tiny_config(trait, model=str(tiny_chat), eval_layers=(2,), judge="openai:judge",
                             judge_base_url=server.url + "/v1", judge_timeout=0.5, judge_retries=3)
        result = extract(config, out, handle=load_model(str(tiny_chat)), progress=False)
    faults = [fault for _, _, fault in calls if fault != "never"]
    assert 0.2 < sum(f is not None for f in faults) / len(faults) < 0.4, faults  # about 30% of calls failed
    assert {"500", "429", "timeout"} <= set(faults)

    scores = {row["id"]: row for row in map(json.loads, complete_lines(out / "scores.jsonl"))}
    assert len(scores) == 18 and {rid for rid, row in scores.items() if row["error"]} == {NEVER}
    assert "failed after 4 attempts; last: HTTP 500" in scores[NEVER]["error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["judge"]["failed"] == {NEVER: scores[NEVER]["error"]} == result.judge_failed
    assert result.summary["judge_failures"] == 1 and result.summary["kept_pairs"] == 5

    answers = {json.loads(line)["response"] for line in complete_lines(out / "responses.jsonl")}
    stage = [p for p, _, _ in calls if answer_of(p) in answers]  # the judge stage's calls
    # every re-sent request the server saw was counted (a loaded machine may add retries of requests that never
    # reached the handler: a connection dropped or timed out before it)
    assert manifest["judge"]["retries"] == result.summary["judge_retries"] >= len(stage) - len(set(stage)) > 0
    assert manifest["judge"]["retries"] <= len(set(stage)) * config.judge_retries
    faulted = [f for p, _, f in calls if answer_of(p) in answers]
    FIGURES["judge"] = {"calls": len(stage), "failed_calls": sum(f is not None for f in faulted),
                        "failed_at_random": sum(f not in (None, "never") for f in faulted),
                        "retries": manifest["judge"]["retries"], "items": len(set(stage)),
                        "items_failed": len(result.judge_failed)}
    for index, (prompt, when, fault) in enumerate(calls):
        if fault == "429":  # the client waited the server's Retry-After before asking again
            again = next(t for p, t, _ in calls[index + 1:] if p == prompt)
            assert again - when >= 0.2


# -- a full disk and a read-only output folder --------------------------------------------------------------------


def limited(max_bytes: int):
    """preexec_fn: cap file sizes at `max_bytes` (writes beyond fail with EFBIG instead of killing the process)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def without_root_overrides() -> None:
    """preexec_fn: drop the capabilities that let root write into read-only folders (kept by nothing it execs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]  # not progress bars
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_full_disk_is_one_error_and_a_rerun_with_space_completes(tiny, tmp_path):
    handle, vector, model_dir = tiny
    data = write_jsonl(tmp_path / "data.jsonl", screen_rows(24))
    out, cache = tmp_path / "scored.jsonl", tmp_path / "scored.work" / "base_responses.jsonl"
    full = subprocess.run(screen_command(model_dir, data, out), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=limited(1500))
    one_error_line(full, f"cannot write {cache}: File too large", "rerun to resume")
    kept = complete_lines(cache)
    assert 0 < len(kept) < 24 and not out.exists()
    screen_dataset(handle, data, vector, out, sampling=SamplingConfig(24, 0.0), max_batch=1, progress=False)
    assert_kept([kept], complete_lines(cache))
    assert len(complete_lines(cache)) == 24 and len(read_jsonl(out)) == 24
    FIGURES.setdefault("bad inputs", {})["disk full"] = "one error line, rerun completes"


def test_a_read_only_output_folder_is_one_error_and_changes_nothing(tiny, tmp_path):
    handle, vector, model_dir = tiny
    data = write_jsonl(tmp_path / "data.jsonl", screen_rows(6))
    folder = tmp_path / "outputs"
    out = folder / "scored.jsonl"
    sampling = SamplingConfig(24, 0.0)
    screen_dataset(handle, data, vector, out, sampling=sampling, max_batch=1, progress=False)
    (folder / "scored.summary.json").unlink()  # a run to finish, in a folder that turns read-only
    before = snapshot(folder)
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        refused = subprocess.run(screen_command(model_dir, data, out), cwd=ROOT, env=ENV, capture_output=True,
                                 text=True, timeout=300, preexec_fn=without_root_overrides)
    finally:
        for path in (folder, *folder.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
    one_error_line(refused, "cannot write", "Permission denied")
    assert snapshot(folder) == before
    screen_dataset(handle, data, vector, out, sampling=sampling, max_batch=1, progress=False)
    assert (folder / "scored.summary.json").exists() and len(read_jsonl(out)) == 6
    FIGURES.setdefault("bad inputs", {})["read-only folder"] = "one error line, nothing changed, rerun completes"
