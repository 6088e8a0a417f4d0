"""Shared fixtures (the helpers they use are in ``helpers.py``), all offline."""

from __future__ import annotations

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from helpers import LAYOUTS, build_word_tokenizer
from transformers import PreTrainedTokenizerFast

# Ctrl-C as in a terminal: a suite started in the background of a non-interactive shell
# (`pytest &`, nohup) inherits SIGINT ignored (POSIX), and Python then installs no handler;
# xdist's workers inherit that too. The Ctrl-C tests (in process, and in the forked
# children of crash_helpers) need Python's handler: three of test_training failed there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each (a second thread on a busy core is slow)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    """Every test starts from the same global random state, so that a model built with
    the default initialisation is the same whichever tests ran before (a failure
    reproduces when the test runs alone)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test leaves torch's thread count as it found it: a count left behind (3 by a
    command-line test, until audit 214) stays for every later test of the worker,
    oversubscribing the two cores the two workers share. Put back, and the test fails."""
    threads = torch.get_num_threads()
    yield
    left = torch.get_num_threads()
    if left != threads:
        torch.set_num_threads(threads)
        pytest.fail(f"the test left torch with {left} threads, found {threads}")


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture(params=LAYOUTS[:3])
def routed_layout(request) -> str:
    """The layouts that have routers."""
    return request.param


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer([f"w{i}" for i in range(40)])
