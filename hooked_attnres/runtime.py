"""CPU memory-allocator tuning, on request (the CLI and the benchmarks ask for it).

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block
above its mmap threshold (128 KiB at start, adapting up to 32 MiB) with a fresh ``mmap``
and returns it to the system on ``free``, so each new activation of a few MiB is paid
for again in page faults: a forward pass of the study model on 256 prompts took about
33,000 of them, and prefix-reusing partial passes (``forward_from``) relatively more.
Raising the mmap threshold lets freed blocks be reused instead: on the machines of
``docs/benchmarks.md``, raising it and the trim threshold to 256 MiB made a forward pass
about 1.4x faster (page faults per pass: 33,000 -> under 100) and the per-layer ablation
sweep about 1.8x faster.

glibc also hands the free memory at the top of its heap back to the system once it
exceeds the trim threshold (128 KiB at start). A cache of every hook frees gigabytes at
once at real shapes, and a 256 MiB trim threshold gave most of it back, so the next
cache faulted it in again: at the Qwen3-0.6B shape (8 x 128, bfloat16) an
every-hook cache took 1.45x its forward pass with a 256 MiB trim threshold (196,000-
395,000 page faults per call) and 1.19x with trimming off (76,000). So by default the
tuning turns trimming off: freed heap memory stays in the process for reuse, as in
PyTorch's CUDA caching allocator, and `release_cpu_memory` gives it back (like
``torch.cuda.empty_cache``). Pass ``trim_threshold`` to cap it instead. The price, besides
the memory: at the 0.6B shape (1 x 256, bfloat16) the routed forward pass read about
0.5-1.5 % more of Hugging Face's time with trimming off than with 256 MiB, for a reason
not found (``docs/benchmarks.md``, session 11).

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

from hooked_attnres._validation import require_integer

DEFAULT_THRESHOLD = 256 * 2**20  # bytes
_MALLOPT_MAX = 2**31 - 1  # mallopt takes a C int; ctypes would silently wrap a larger one
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = -1  # M_TRIM_THRESHOLD = -1 turns trimming off (mallopt(3))

_state: dict[str, Any] = {"tuned": False, "threshold": None, "trim_threshold": None}


def _checked_bytes(value: Any, name: str) -> int:
    value = require_integer(name, value, minimum=1)
    if value > _MALLOPT_MAX:
        raise ValueError(
            f"{name} must be at most 2**31 - 1 bytes (mallopt takes a C int; a larger "
            f"value would wrap around), got {value!r}"
        )
    return value


def _glibc() -> Any:
    """The C library, or ``None`` off glibc (where the tuning is a no-op)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator(
    threshold: int = DEFAULT_THRESHOLD, *, trim_threshold: int | None = None
) -> bool:
    """Let glibc reuse freed memory instead of handing it back to the system.

    Args:
        threshold: blocks of fewer bytes come from the heap, where freed blocks are reused
            (glibc's mmap threshold; larger ones are mapped and unmapped each time).
        trim_threshold: free memory at the heap's top beyond this many bytes goes back to
            the system. ``None`` (the default): never; the process keeps its peak heap
            for reuse until `release_cpu_memory`.

    Returns:
        Whether the allocator was tuned: ``False`` off glibc, or if ``mallopt`` refused
        one of the two settings (the mmap threshold may then be set, the trim one not).

    Raises:
        ValueError: a byte count that is not an integer in ``[1, 2**31 - 1]``.
    """
    threshold = _checked_bytes(threshold, "threshold")
    trim = _NEVER_TRIM
    if trim_threshold is not None:
        trim = _checked_bytes(trim_threshold, "trim_threshold")
    libc = _glibc()
    if libc is None:
        return False
    try:
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim)
        )
    except AttributeError:
        return False
    if applied:
        _state.update(tuned=True, threshold=threshold, trim_threshold=trim_threshold)
    return applied


def release_cpu_memory() -> bool:
    """Give the heap's free memory back to the system (glibc ``malloc_trim(0)``), e.g.
    after dropping a large cache in a process tuned by `tune_cpu_allocator`.

    Returns:
        Whether any memory was given back (``False`` off glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has been applied in this process."""
    return bool(_state["tuned"])


def cpu_allocator_settings() -> dict[str, Any]:
    """What the last successful `tune_cpu_allocator` set: ``{"tuned": bool, "threshold":
    bytes or None, "trim_threshold": bytes or None}`` (``trim_threshold`` ``None`` while
    tuned: trimming off). The benchmarks record it with their results."""
    return dict(_state)


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
