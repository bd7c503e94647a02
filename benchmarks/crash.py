"""Crash safety: kill `extract`, `screen` and Ray screening many times, inject a failing judge, a full disk and a
read-only folder, and print what was survived, lost and made again.

It runs the fault-injection tests (`tests/test_faults.py`, real processes and files) with more kills than the
suite's five (`--kills`, each at a seeded random point) and prints the figures they measured:

* kills: SIGKILLs of the command, each followed by a rerun that resumes;
* lost: planned items without a record at the end (must be 0); lost before kill: records present after a kill
  but missing or changed at the end (must be 0);
* recorded twice: items with more than one record (must be 0: no finished item is made again);
* torn redone: torn last lines moved to `.torn` files, each the one item made again;
* judge: calls of `extract`'s judge stage to a judge failing 30% of them at random (500, 429 with Retry-After,
  timeouts) and always for one planted row, the retries, and the items never scored (named in the manifest with
  their reason).

    python benchmarks/crash.py --kills 10 --json crash.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import console, print_table, save

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--kills", type=int, default=10, help="SIGKILLs per command (the tests use 5)")
    args.add_argument("--no-ray", action="store_true", help="leave out Ray screening (slow to start)")
    args.add_argument("--json", help="write the figures here")
    return args


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.json"
        env = {**os.environ, "PERSONASCOPE_KILLS": str(args.kills), "PERSONASCOPE_FAULT_FIGURES": str(figures_path)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py"]
        if args.no_ray:
            command += ["-k", "not ray"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            console.print(done.stdout[-4000:])
            raise SystemExit(f"the fault-injection tests failed (exit {done.returncode})")
        figures = json.loads(figures_path.read_text())
    stages = [s for s in ("extract", "screen", "screen --ray") if s in figures]
    print_table("Kills and resumes", ["command", "kills", "items", "lost", "lost before kill", "recorded twice",
                                      "torn lines redone"],
                [[s, *(figures[s][k] for k in ("kills", "planned", "lost", "lost_before_kill", "recorded_twice",
                                               "torn_redone"))] for s in stages])
    judge = figures["judge"]
    print_table("A judge failing 30% of calls (extract's judge stage)",
                ["calls", "failed calls", "of them at random", "retries", "items", "items never scored"],
                [[judge[k] for k in ("calls", "failed_calls", "failed_at_random", "retries", "items", "items_failed")]])
    print_table("Bad run inputs", ["input", "outcome"], list(figures["bad inputs"].items()))
    result = {"kills_per_command": args.kills, **figures}
    save(args.json, result)
    return result


if __name__ == "__main__":
    run(parser().parse_args())
