"""Data shipped with the package: the study's trained checkpoints (``data/study``).

Deprecated entry points: use `hooked_attnres.study.checkpoint_dir` and
`hooked_attnres.study.metrics_path`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

STUDY_DIR = Path(__file__).parent / "study"


def study_checkpoint(condition: str, seed: int = 0) -> Path:
    """Deprecated: ``hooked_attnres.study.checkpoint_dir(condition, seed)``."""
    from hooked_attnres.study.checkpoints import checkpoint_dir

    warnings.warn(
        "hooked_attnres.data.study_checkpoint is deprecated; use "
        "hooked_attnres.study.checkpoint_dir",
        DeprecationWarning,
        stacklevel=2,
    )
    return checkpoint_dir(condition, seed)


def study_metrics(condition: str, seed: int = 0) -> Path:
    """Deprecated: ``hooked_attnres.study.metrics_path(condition, seed)``."""
    from hooked_attnres.study.checkpoints import metrics_path

    warnings.warn(
        "hooked_attnres.data.study_metrics is deprecated; use hooked_attnres.study.metrics_path",
        DeprecationWarning,
        stacklevel=2,
    )
    return metrics_path(condition, seed)
