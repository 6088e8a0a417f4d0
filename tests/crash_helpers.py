"""Run code in a forked child that may be killed with SIGKILL (the crash tests).

A fork starts in milliseconds (torch and the package are already imported), so every
crash scenario costs a fraction of a second. The child never returns into pytest: it
leaves with ``os._exit``. Nothing here sleeps; a child is killed either by fault
injection (``HOOKED_ATTNRES_CRASH_AT``) or by the parent right after the child reports
progress through a pipe.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from typing import Optional

import torch

from hooked_attnres._atomic import CRASH_ENV

KILLED = "killed"
EXITED = "exited"


def _child(fn: Callable[..., None], crash_at: Optional[str], args: tuple) -> None:
    code = 0
    try:
        # The parent's OpenMP thread pool does not survive ``fork``: a child that enters a
        # parallel region waits forever on threads that do not exist (libgomp has no fork
        # handler). One thread keeps every op inline in the child.
        torch.set_num_threads(1)
        # (Ctrl-C reaches the child as in a terminal: conftest.py installs Python's SIGINT
        # handler where the suite was started with SIGINT ignored, and a fork inherits it)
        if crash_at is None:
            os.environ.pop(CRASH_ENV, None)
        else:
            os.environ[CRASH_ENV] = crash_at
        fn(*args)
    except BaseException:
        traceback.print_exc()
        code = 3
    finally:
        os._exit(code)


def _outcome(status: int) -> str:
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"child died of signal {os.WTERMSIG(status)}"
        return KILLED
    assert os.WEXITSTATUS(status) == 0, f"child failed with exit code {os.WEXITSTATUS(status)}"
    return EXITED


def run_forked(fn: Callable[..., None], *args, crash_at: Optional[str] = None) -> str:
    """Run ``fn(*args)`` in a forked child with ``HOOKED_ATTNRES_CRASH_AT=crash_at``;
    returns ``"killed"`` (SIGKILL) or ``"exited"`` (finished; any exception fails)."""
    return _outcome(fork_and_wait(fn, *args, crash_at=crash_at))


def fork_and_wait(fn: Callable[..., None], *args, crash_at: Optional[str] = None) -> int:
    """Run ``fn(*args)`` in a forked child (one torch thread); the raw ``waitpid`` status."""
    pid = os.fork()
    if pid == 0:
        _child(fn, crash_at, args)
    return _wait(pid)


def _wait(pid: int) -> int:
    """``waitpid``; if the wait is interrupted (pytest-timeout, Ctrl-C), the child is killed
    first, so a hung child never outlives its test holding pytest's output open."""
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return status


class Reporter:
    """A child that reports progress on a pipe, so the parent can kill it at a random
    moment without sleeping."""

    def __init__(self, fn: Callable[..., None], *args):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            report = os.fdopen(write, "w", buffering=1)
            _child(fn, None, (report, *args))
        os.close(write)
        self.lines = os.fdopen(read)

    def wait_for(self, n: int) -> list[str]:
        """The next ``n`` progress lines (fewer if the child ends first)."""
        out = []
        for _ in range(n):
            line = self.lines.readline()
            if not line:
                break
            out.append(line.strip())
        return out

    def kill(self) -> str:
        os.kill(self.pid, signal.SIGKILL)
        return self.join()

    def join(self) -> str:
        status = _wait(self.pid)
        self.lines.close()
        return _outcome(status)
