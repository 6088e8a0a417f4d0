"""What moves the numbers of a deterministic computation besides its code and its inputs
(a leaf module): the thread count (1 and 2 threads give study effects that differ by about
1e-8, as float sums are split differently) and the versions of the numerical libraries.

One definition for the two places that resume work and must not mix numbers computed
under two of them: the study's key of a kept run (`hooked_attnres.study.run`; a
mismatch recomputes the run) and a training run's resume identity
(`hooked_attnres.training.trainer`; a mismatch is refused, as every other difference of
the identity is, since continuing would not equal an uninterrupted run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

import numpy as np
import torch


def numerics_environment(*also: ModuleType) -> dict[str, Any]:
    """``{"threads": torch.get_num_threads(), "versions": [torch.__version__,
    np.__version__, *(module.__version__ for module in also)]}`` (JSON-ready: the
    study passes ``pandas``, whose tables it keeps)."""
    versions = [torch.__version__, np.__version__, *(module.__version__ for module in also)]
    return {"threads": torch.get_num_threads(), "versions": [str(v) for v in versions]}


@contextmanager
def thread_count(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the caller's count after it
    (``None``: nothing is touched). The trainer (`TrainConfig.threads`) and the command
    line (``--threads``) set the count this way."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
