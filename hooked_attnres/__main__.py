"""The command line's entry point: the ``hooked-attnres`` console script (`run`) and
``python -m hooked_attnres``. It imports `hooked_attnres.cli` inside Ctrl-C's handling, so
that Ctrl-C while Python still imports the command line prints the command's one line and
exits with 130, as at every later moment (`interrupted`); until audit 229 it ended in a
``KeyboardInterrupt`` traceback (exit code 1, or -2). This module imports nothing of the
package, so that as little as possible runs before that handling."""

from __future__ import annotations

import signal
import sys

PROG = "hooked-attnres"


def interrupted() -> int:
    """Print Ctrl-C's line on stderr; its exit code, 130 (128 + SIGINT)."""
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def run() -> int:
    """Import the command line and run the command of ``sys.argv`` (`hooked_attnres.cli.main`);
    its exit code, 130 for Ctrl-C during the import too."""
    try:
        from hooked_attnres.cli import main

        return main()
    except KeyboardInterrupt:  # before main handles it: while the command line is imported
        return interrupted()


if __name__ == "__main__":
    sys.exit(run())
