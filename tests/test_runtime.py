"""The opt-in CPU allocator tuning (`hooked_attnres.runtime`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from hooked_attnres import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import importlib, os, pkgutil, resource, torch
torch.set_num_threads(3)
environment = dict(os.environ)
import hooked_attnres
for module in pkgutil.walk_packages(hooked_attnres.__path__, "hooked_attnres."):
    importlib.import_module(module.name)  # every module, the command line's too
untouched = dict(os.environ) == environment and torch.get_num_threads() == 3
torch.set_num_threads(1)
import hooked_attnres.runtime as runtime
from hooked_attnres import HookedAttnRes, HookedAttnResConfig
cfg = HookedAttnResConfig(d_model=128, n_layers=4, n_heads=4, n_key_value_heads=2, d_mlp=256,
                          d_vocab=50, n_ctx=16, attnres_layout="cumulative", attnres_num_blocks=2)
model = HookedAttnRes(cfg).eval()
tokens = torch.randint(0, 50, (256, 15), generator=torch.Generator().manual_seed(0))

def faults():
    with torch.no_grad():
        model.run_with_cache(tokens)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            model.run_with_cache(tokens)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

after_import = runtime.cpu_allocator_tuned(), faults()
os.environ["HOOKED_ATTNRES_TUNE_MALLOC"] = "off"
refused = runtime.tune_from_environment()
os.environ["HOOKED_ATTNRES_TUNE_MALLOC"] = "1"
applied = runtime.tune_from_environment()
print(untouched, *after_import, refused, applied, runtime.cpu_allocator_tuned(), faults())
"""


@pytest.mark.skipif(
    not GLIBC, reason="the tuning applies to glibc only (a no-op elsewhere, tested below)"
)
def test_import_leaves_the_allocator_alone_and_tuning_is_opt_in():
    env = {k: v for k, v in os.environ.items() if k != "HOOKED_ATTNRES_TUNE_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    untouched, tuned_on_import, untuned_faults, refused, applied, tuned, faults = out.stdout.split()
    # importing every module leaves the environment, torch's threads and the allocator alone
    assert (untouched, tuned_on_import) == ("True", "False")
    assert (refused, applied, tuned) == ("False", "True", "True")
    # untuned, glibc hands activations of ~2 MiB back to the system and faults them in again;
    # tuned, it reuses them. Ten cached passes, each allocating every hook's tensor afresh
    # (measured, six runs: 75,000-157,000 page faults untuned, 0-2,900 tuned). A plain
    # forward allocates less since it works in place (14,000-172,000 untuned against
    # 1-1,800 tuned in five runs), too close for a 10x test.
    assert int(untuned_faults) > 10_000 and int(faults) < int(untuned_faults) / 10


def test_tuning_arguments_and_platforms(monkeypatch):
    with pytest.raises(ValueError, match="threshold must be an integer >= 1, got 0"):
        runtime.tune_cpu_allocator(0)
    with pytest.raises(ValueError, match="threshold must be an integer >= 1, got 1.5"):
        runtime.tune_cpu_allocator(1.5)
    with pytest.raises(ValueError, match="trim_threshold must be an integer >= 1, got 1.5"):
        runtime.tune_cpu_allocator(trim_threshold=1.5)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.tune_cpu_allocator() is False
    assert runtime.release_cpu_memory() is False


TRIM_PROBE = """
import resource, sys, torch
import hooked_attnres.runtime as runtime
mode = sys.argv[1]
assert runtime.tune_cpu_allocator()

def faults_of_300_mib():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(6 * 2**20, dtype=torch.uint8) for _ in range(50)]  # what a cache does
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_300_mib()
released = runtime.release_cpu_memory() if mode == "released" else None
print(released, faults_of_300_mib())
"""


@pytest.mark.skipif(not GLIBC, reason="trimming is glibc's (a no-op elsewhere, tested below)")
@pytest.mark.parametrize("mode", ["kept", "released"])
def test_freed_memory_is_kept_for_reuse_until_released(mode):
    """By default the freed 300 MiB (76,800 pages of 4 KiB) stays in the process and is
    reused: 7,680-10,753 page faults in 8 probes (a 256 MiB trim threshold, the earlier
    default: 67,553-76,770 in 7 of 8, 10,752 in the 8th); after `release_cpu_memory` it is
    faulted in again (76,803 in 8 of 8). Raw: benchmarks/results/allocator_trim_s11.txt."""
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, check=True
    )
    released, faults = out.stdout.split()
    pages = 300 * 2**20 // 4096
    if mode == "kept":
        assert (released, int(faults) < pages / 5) == ("None", True), out.stdout
    else:
        assert (released, int(faults) > pages / 2) == ("True", True), out.stdout


def test_the_thresholds_reach_mallopt(monkeypatch):
    """What glibc is asked for (a fake C library records it): the mmap threshold, then the
    trim threshold, -1 (never trim) unless one is given."""

    class FakeLibc:
        def __init__(self):
            self.calls = []

        def mallopt(self, parameter, value):
            self.calls.append((parameter, value))
            return 1

    fake = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    monkeypatch.setattr(runtime, "_state", dict(runtime._state))
    assert runtime.tune_cpu_allocator() is True
    assert runtime.cpu_allocator_settings() == {
        "tuned": True,
        "threshold": 256 * 2**20,
        "trim_threshold": None,
    }
    assert runtime.tune_cpu_allocator(2**20, trim_threshold=2**24) is True
    assert fake.calls == [(-3, 256 * 2**20), (-1, -1), (-3, 2**20), (-1, 2**24)]
    assert runtime.cpu_allocator_settings()["trim_threshold"] == 2**24


def test_byte_counts_beyond_a_c_int_are_refused_not_wrapped():
    # mallopt takes a C int: ctypes would pass 2**32 + 5 as 5
    for bad in (2**31, 2**32 + 5):
        with pytest.raises(ValueError, match=r"threshold must be at most 2\*\*31 - 1 bytes"):
            runtime.tune_cpu_allocator(bad)
        with pytest.raises(ValueError, match=r"trim_threshold must be at most .*takes a C int"):
            runtime.tune_cpu_allocator(trim_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold must be an integer >= 1, got 0"):
        runtime.tune_cpu_allocator(trim_threshold=0)


def test_a_refused_or_missing_mallopt_leaves_the_allocator_untuned(monkeypatch):
    class RefusesTrim:
        def mallopt(self, parameter, value):
            return int(parameter != -1)  # sets the mmap threshold, refuses the trim one

    glibc = runtime._glibc
    monkeypatch.setattr(runtime, "_state", dict(runtime._state, tuned=False))
    monkeypatch.setattr(runtime, "_glibc", RefusesTrim)
    assert runtime.tune_cpu_allocator() is False and runtime.cpu_allocator_tuned() is False
    monkeypatch.setattr(runtime, "_glibc", object)  # a C library without mallopt/malloc_trim
    assert runtime.tune_cpu_allocator() is False and runtime.release_cpu_memory() is False
    assert runtime.cpu_allocator_settings()["tuned"] is False

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(runtime, "_glibc", glibc)
    monkeypatch.setattr(runtime.ctypes, "CDLL", no_library)
    assert runtime._glibc() is None and runtime.tune_cpu_allocator() is False
