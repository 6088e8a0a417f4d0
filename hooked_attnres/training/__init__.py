"""Training on probe tasks, and the study's two conditions."""

from hooked_attnres.training.study import (
    CONDITIONS,
    STUDY_BLOCKS,
    STUDY_SEEDS,
    STUDY_SHAPE,
    build_model,
    study_task,
    study_train_config,
    train_condition,
)
from hooked_attnres.training.trainer import TrainConfig, TrainResult, evaluate, model_logits, train

__all__ = ["CONDITIONS", "STUDY_BLOCKS", "STUDY_SEEDS", "STUDY_SHAPE", "TrainConfig", "TrainResult",
           "build_model", "evaluate", "model_logits", "study_task", "study_train_config", "train",
           "train_condition"]
