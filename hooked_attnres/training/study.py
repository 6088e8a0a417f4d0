"""Deprecated: the study's conditions moved to `hooked_attnres.study.conditions`."""

import warnings

from hooked_attnres.study.conditions import (  # noqa: F401
    CONDITIONS,
    STUDY_BLOCKS,
    STUDY_SHAPE,
    build_model,
    study_task,
    study_train_config,
    train_condition,
)

warnings.warn(
    "hooked_attnres.training.study is deprecated; import from hooked_attnres.study",
    DeprecationWarning,
    stacklevel=2,
)
