"""Names moved or retired by the router-site redesign keep working for one release, with a
``DeprecationWarning`` that says where the name went."""

from __future__ import annotations

import importlib
import sys

import pytest
from helpers import tiny_model

from hooked_attnres import study


@pytest.mark.parametrize(
    "module,name,replacement",
    [
        ("hooked_attnres.training", "build_model", study.build_model),
        ("hooked_attnres.training", "study_task", study.study_task),
        ("hooked_attnres.training", "study_train_config", study.study_train_config),
        ("hooked_attnres.training", "train_condition", study.train_condition),
        ("hooked_attnres.training", "CONDITIONS", study.CONDITIONS),
        ("hooked_attnres.training", "STUDY_SHAPE", study.STUDY_SHAPE),
        ("hooked_attnres.training", "STUDY_BLOCKS", study.STUDY_BLOCKS),
        ("hooked_attnres.training", "STUDY_SEEDS", (0, 1, 2)),
    ],
)
def test_moved_training_names_warn_and_work(module, name, replacement):
    with pytest.warns(DeprecationWarning, match=name):
        value = getattr(importlib.import_module(module), name)
    assert value == replacement


def test_retired_names_warn_and_give_the_same_answers():
    from hooked_attnres.analysis import PlannedAblation
    from hooked_attnres.data import study_checkpoint, study_metrics
    from hooked_attnres.model.depth import router_hook_prefix

    with pytest.warns(DeprecationWarning, match="study.checkpoint_dir"):
        assert study_checkpoint("attnres") == study.checkpoint_dir("attnres")
    with pytest.warns(DeprecationWarning, match="study.metrics_path"):
        assert study_metrics("vanilla") == study.metrics_path("vanilla")
    model = tiny_model(attnres_layout="kimi")
    with pytest.warns(DeprecationWarning, match="prefix"):
        assert router_hook_prefix(2, "mlp_res") == model.site(2, "mlp_res").prefix
    with pytest.warns(DeprecationWarning, match="routing_layout.has_final_router"):
        assert model.cfg.has_final_router is model.routing_layout.has_final_router is True
    with pytest.warns(DeprecationWarning, match="routing_layout.has_routers"):
        assert model.cfg.has_routers is True
    with pytest.warns(DeprecationWarning, match="PlannedAblation"):
        from hooked_attnres.analysis import Ablation
    assert Ablation is PlannedAblation
    sys.modules.pop("hooked_attnres.training.study", None)  # the warning fires on import
    with pytest.warns(DeprecationWarning, match="hooked_attnres.study"):
        old = importlib.import_module("hooked_attnres.training.study")
    assert old.build_model is study.build_model
