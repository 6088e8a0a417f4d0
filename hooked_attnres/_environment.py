"""What moves the numbers of a deterministic computation besides its code and its inputs
(a leaf module): the thread count (1 and 2 threads give study effects that differ by about
1e-8, as float sums are split differently) and the versions of the numerical libraries.

One definition for the two places that resume work and must not mix numbers computed
under two of them: the study's key of a kept run (`hooked_attnres.study.run`; a
mismatch recomputes the run) and a training run's resume identity
(`hooked_attnres.training.trainer`; a mismatch is refused, as every other difference of
the identity is, since continuing would not equal an uninterrupted run)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch


def numerics_environment(*also: ModuleType) -> dict[str, Any]:
    """``{"threads": torch.get_num_threads(), "versions": [torch.__version__,
    np.__version__, *(module.__version__ for module in also)]}`` (JSON-ready: the
    study passes ``pandas``, whose tables it keeps)."""
    versions = [torch.__version__, np.__version__, *(module.__version__ for module in also)]
    return {"threads": torch.get_num_threads(), "versions": [str(v) for v in versions]}
