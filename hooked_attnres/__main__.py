"""The command line's entry point: the ``hooked-attnres`` console script (`run`) and
``python -m hooked_attnres``. It imports `hooked_attnres.cli` inside Ctrl-C's handling, so
that Ctrl-C while Python still imports the command line prints the command's one line and
exits with 130, as at every later moment (`interrupted`); until audit 229 it ended in a
``KeyboardInterrupt`` traceback (exit code 1, or -2). This module imports nothing of the
package, so that as little as possible runs before that handling; it holds what that
handling and the command line's own say (`PROG`, `Terminated`, `interrupted`)."""

from __future__ import annotations

import signal
import sys

PROG = "hooked-attnres"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, docker stop, SLURM preemption) while a command runs, raised
    by the command's handler where Ctrl-C raises `KeyboardInterrupt`: the trainer writes
    its checkpoint (and holds it back inside an optimizer update) and the command says how
    to resume, as on Ctrl-C, then exits with 143 (128 + 15). Before audit 188 SIGTERM
    ended the process at once: the steps since the last checkpoint were lost."""


def interrupted(error: KeyboardInterrupt) -> int:
    """Print Ctrl-C's line on stderr and return its exit code, 130 (128 + SIGINT), or
    SIGTERM's and 143 (128 + SIGTERM) for `Terminated`."""
    if isinstance(error, Terminated):
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def run() -> int:
    """Import the command line and run the command of ``sys.argv`` (`hooked_attnres.cli.main`);
    its exit code, 130 for Ctrl-C during the import too (143 for SIGTERM raised where
    `main` no longer handles it: until review 230 it said "interrupted", with 130)."""
    try:
        from hooked_attnres.cli import main

        return main()
    except KeyboardInterrupt as error:  # where main does not handle it: during the import
        return interrupted(error)


if __name__ == "__main__":
    # python -m hooked_attnres: this module, run as __main__, is also the one the command
    # line imports (one `Terminated` class, which `interrupted` recognises), unless that
    # one was imported already
    sys.exit(sys.modules.setdefault("hooked_attnres.__main__", sys.modules[__name__]).run())
