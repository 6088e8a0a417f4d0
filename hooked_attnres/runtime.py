"""CPU memory-allocator tuning, on request (the CLI and the benchmarks ask for it).

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block
above its mmap threshold (128 KiB at start, adapting up to 32 MiB) with a fresh ``mmap``
and returns it to the system on ``free``, so each new activation of a few MiB is paid
for again in page faults: a forward pass of the study model on 256 prompts took about
33,000 of them, and prefix-reusing partial passes (``forward_from``) relatively more.
Raising the mmap and trim thresholds lets freed blocks be reused instead: on the machines
of ``docs/benchmarks.md`` that made a forward pass about 1.4x faster (page faults per
pass: 33,000 -> under 100) and the per-layer ablation sweep about 1.8x faster.

The cost: up to ``threshold`` bytes of freed memory stay in the process for reuse
instead of going back to the system, as with PyTorch's own caching allocators.

Importing ``hooked_attnres`` changes nothing process-wide. Call `tune_cpu_allocator` in a
script or notebook to opt in; the ``hooked-attnres`` command and the benchmarks do
(`tune_from_environment`), unless ``HOOKED_ATTNRES_TUNE_MALLOC=0``. The tuning is
process-wide (it also speeds up other PyTorch code run in the same process, e.g. a
Hugging Face reference model) and applies to glibc only; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

from hooked_attnres._validation import is_integer

DEFAULT_THRESHOLD = 256 * 2**20  # bytes
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_state: dict[str, Any] = {"tuned": False, "threshold": None}


def tune_cpu_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Let glibc reuse freed blocks below ``threshold`` bytes instead of unmapping them.

    Returns:
        Whether the allocator was tuned (``False`` off glibc or if ``mallopt`` refused).
    """
    if not is_integer(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold)
        )
    except (OSError, AttributeError):
        return False
    if applied:
        _state.update(tuned=True, threshold=threshold)
    return applied


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has been applied in this process."""
    return bool(_state["tuned"])


def tune_from_environment() -> bool:
    """`tune_cpu_allocator` unless ``HOOKED_ATTNRES_TUNE_MALLOC`` is ``0`` / ``false`` /
    ``no`` / ``off`` (what the command line and the benchmarks call at start)."""
    if os.environ.get("HOOKED_ATTNRES_TUNE_MALLOC", "1").strip().lower() in (
        "0",
        "false",
        "no",
        "off",
    ):
        return False
    return tune_cpu_allocator()
