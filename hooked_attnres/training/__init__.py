"""Training: the trainer for any `HookedAttnRes` or Hugging Face Qwen3 on probe tasks.

The study's conditions (``build_model``, ``study_task``, ``train_condition``, ...) live in
`hooked_attnres.study`; importing them from here still works for one release, with a
``DeprecationWarning``.
"""

import warnings

from hooked_attnres.training.trainer import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    model_logits,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "evaluate",
    "model_logits",
    "train",
]

_MOVED = (
    "CONDITIONS",
    "STUDY_BLOCKS",
    "STUDY_SHAPE",
    "build_model",
    "study_task",
    "study_train_config",
    "train_condition",
)


def __getattr__(name: str):
    if name == "STUDY_SEEDS":  # unused since 0.1; the study finds the seeds it is given
        warnings.warn(
            "hooked_attnres.training.STUDY_SEEDS is deprecated and will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return (0, 1, 2)
    if name in _MOVED:
        warnings.warn(
            f"hooked_attnres.training.{name} is deprecated; import it from hooked_attnres.study",
            DeprecationWarning,
            stacklevel=2,
        )
        from hooked_attnres.study import conditions  # the application above the library

        return getattr(conditions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
