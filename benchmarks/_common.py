"""Timing helpers shared by the benchmarks (not part of the package)."""

from __future__ import annotations

import json
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hooked_attnres.runtime import (
    cpu_allocator_settings,
    cpu_allocator_tuned,
    tune_from_environment,
)

tune_from_environment()  # the benchmarks measure the tuned allocator, as the CLI runs

RESULTS_DIR = Path(__file__).parent / "results"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    warmup: int = 2,
    clock: str = "wall",
    settle: int = 0,
) -> dict[str, float]:
    """Median seconds per call of `interleaved_times` (the candidates round-robin, so that
    drift in machine speed, thermal or other processes, affects all of them alike)."""
    times = interleaved_times(fns, repeats, warmup=warmup, settle=settle, clock=clock)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    settle: int = 0,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds of every timed call, ``times[name][round]``, the candidates run round-robin
    after ``warmup`` calls each (kept per round, so that ratios can be paired within a
    round: `paired_ratio`).

    ``settle``: untimed calls of the same candidate right before each timed call, so that
    every timed call follows a call of itself and none inherits the allocator and page
    state that another candidate left behind (at the 0.6B shape that state alone moves a
    forward / HF ratio by up to 3 %; see ``docs/benchmarks.md``).

    ``clock="cpu"`` measures this process's CPU time instead of wall time: on a busy
    machine it leaves out the time the process waits for a core (but not the slowdown
    from shared caches); single-threaded runs only, since threads add up."""
    if settle < 0:
        raise ValueError(f"settle must be 0 or more, got {settle}")
    if rounds < 1:
        raise ValueError(f"rounds must be 1 or more, got {rounds}")
    timer = CLOCKS[clock]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            start = timer()
            fn()
            times[name].append(timer() - start)
    return times


def paired_ratio(
    numerator: list[float], denominator: list[float], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """The median of the per-round ratios ``numerator[i] / denominator[i]`` and its 95 %
    percentile bootstrap interval (``resamples`` resamples of the rounds, ``seed``):
    ``{"median", "low", "high", "rounds"}``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"need two equally long, non-empty lists, got {len(numerator)} and {len(denominator)}"
        )
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)
    )
    return {
        "median": statistics.median(ratios),
        "low": medians[int(0.025 * (resamples - 1))],
        "high": medians[int(round(0.975 * (resamples - 1)))],
        "rounds": float(len(ratios)),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(tensors) -> tuple[int, int]:
    """(sum of tensor sizes, size of the distinct storages) in bytes."""
    total, storages = 0, {}
    for tensor in tensors:
        total += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return total, sum(storages.values())


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "malloc_tuned": cpu_allocator_tuned(),  # hooked_attnres.runtime (tune_from_environment)
        "malloc_settings": cpu_allocator_settings(),
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
