"""Run the crash tests of the reliability catalogue many times (not part of CI).

    python benchmarks/crash_loop.py [--runs 50]

Each run is one pytest process over the crash scenarios of ``tests/test_catalogue.py``
(kill -9 at every step of a save and of recovery, at random moments, two concurrent
writers and a reader, the trainer killed and resumed). The random-moment scenarios draw
new seeds every run (``CRASH_LOOP_SEED``). Prints ``k of N runs passed``; the result is
recorded in ``docs/loading.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRASH_TESTS = "kill or concurrent or trainer_killed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    # torch's default threads, as in CI (one thread hid a fork deadlock that CI met at two)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    passed, failures, started = 0, [], time.perf_counter()
    for run in range(args.runs):
        env["CRASH_LOOP_SEED"] = str(1000 + run)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:warnings",
                "-p",
                "no:cacheprovider",
                "tests/test_catalogue.py",
                "-k",
                CRASH_TESTS,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        if out.returncode == 0:
            passed += 1
        else:
            failures.append((run, summary))
        print(
            f"run {run + 1:3d}: {'ok  ' if out.returncode == 0 else 'FAIL'} {summary}", flush=True
        )
    print(f"{passed} of {args.runs} runs passed in {time.perf_counter() - started:.0f} s")
    for run, summary in failures:
        print(f"  failed run {run + 1}: {summary}")
    sys.exit(0 if passed == args.runs else 1)


if __name__ == "__main__":
    main()
