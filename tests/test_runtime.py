"""The CPU allocator tuning applied on import (`hooked_attnres.runtime`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from hooked_attnres import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import resource, torch
import hooked_attnres.runtime as runtime
from hooked_attnres import HookedAttnRes, HookedAttnResConfig
cfg = HookedAttnResConfig(d_model=128, n_layers=4, n_heads=4, n_key_value_heads=2, d_mlp=256,
                          d_vocab=50, n_ctx=16, attnres_layout="cumulative", attnres_num_blocks=2)
model = HookedAttnRes(cfg).eval()
tokens = torch.randint(0, 50, (256, 15), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(tokens)
print(runtime.cpu_allocator_tuned(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value):
    env = dict(os.environ)
    env.pop("HOOKED_ATTNRES_TUNE_MALLOC", None)
    if env_value is not None:
        env["HOOKED_ATTNRES_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only (a no-op elsewhere, tested below)")
def test_import_tunes_the_allocator_and_the_environment_can_refuse():
    tuned, faults = probe(None)
    untuned, untuned_faults = probe("0")
    assert tuned and not untuned
    # untuned, glibc hands activations of ~2 MiB back to the system and faults them in again
    # (measured: ~40,000 page faults in three forward passes); tuned, it reuses them (~500)
    assert untuned_faults > 10_000 and faults < untuned_faults / 10


def test_tuning_arguments_and_platforms(monkeypatch):
    with pytest.raises(ValueError, match="positive number of bytes"):
        runtime.tune_cpu_allocator(0)
    with pytest.raises(ValueError, match="positive number of bytes"):
        runtime.tune_cpu_allocator(1.5)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.tune_cpu_allocator() is False
