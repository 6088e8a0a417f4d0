"""The study end to end on the shipped checkpoints, and the shipped checkpoints themselves."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import recency_schedule
from hooked_attnres.study import (
    STUDY_BLOCKS,
    STUDY_SHAPE,
    load_condition,
    probe_prompts,
    run_study,
    study_task,
)
from hooked_attnres.study import checkpoint_dir as study_checkpoint
from hooked_attnres.study import metrics_path as study_metrics


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_shipped_checkpoints_solve_the_probe(condition):
    model = load_condition(condition)
    assert (
        model.cfg.n_layers == STUDY_SHAPE["n_layers"]
        and model.cfg.d_model == STUDY_SHAPE["d_model"]
    )
    assert model.cfg.attnres_layout == "cumulative" and model.cfg.attnres_num_blocks == STUDY_BLOCKS
    batch = study_task().sample(512, seed=7, split="test", vocab=model.tokenizer.get_vocab())
    with torch.no_grad():
        accuracy = batch.accuracy(model(batch.tokens))
    assert accuracy >= 0.95
    metrics = json.loads(study_metrics(condition).read_text())
    assert metrics["final_accuracy"]["retrieval"] >= 0.95
    assert metrics["description"]["condition"] == condition


def test_the_vanilla_checkpoint_is_a_plain_hugging_face_directory():
    from transformers import Qwen3ForCausalLM

    path = study_checkpoint("vanilla")
    hf = Qwen3ForCausalLM.from_pretrained(path).eval()
    plain = HookedAttnRes.from_hf_qwen3(path, wrap="none")
    tokens = probe_prompts(plain, 16).tokens
    with torch.no_grad():
        assert (hf(tokens).logits - plain(tokens)).abs().max() <= 1e-4


def test_missing_shipped_seed_says_how_to_train_it():
    with pytest.raises(
        FileNotFoundError, match="hooked-attnres train --condition attnres --seeds 5"
    ):
        study_checkpoint("attnres", seed=5)
    with pytest.raises(ValueError, match="condition must be"):
        study_checkpoint("bogus")


def test_run_study_writes_every_table_and_the_wrapped_model_follows_the_schedule(tmp_path):
    out = tmp_path / "study"
    result = run_study(out, n_prompts=48, n_bootstrap=100, progress=False)
    for name in (
        "accuracy.csv",
        "mass.csv",
        "mass_summary.csv",
        "effects.csv",
        "schedule.csv",
        "dissociation.json",
        "report.md",
        "plots/mass_effect_attnres_seed0.html",
    ):
        assert (out / name).exists(), name
    assert set(result.accuracy.condition) == {"attnres", "vanilla"}
    assert (result.accuracy.accuracy >= 0.95).all()
    # the recency-wrapped baseline: content-independent, equal to the analytic schedule
    assert result.schedule.max_abs_deviation.max() <= 1e-6
    predicted = recency_schedule(STUDY_SHAPE["n_layers"], STUDY_BLOCKS, 3.0).families
    current = predicted[predicted.family == "current"].weight.mean()
    measured = result.mass_summary
    measured = measured[
        (measured.condition == "vanilla")
        & (measured.band == "all")
        & (measured.family == "current")
    ]
    assert measured.mass.mean() == pytest.approx(current, abs=1e-6)
    # one dissociation row per condition and router type; mass shares are a distribution
    assert len(result.dissociation) == 4
    for shares in result.dissociation.shares:
        assert sum(s["mass"] for s in shares.values()) == pytest.approx(1.0, abs=1e-6)
    report = (out / "report.md").read_text()
    assert "attnres, seed 0" in report and "analytic schedule" in report


def test_a_failed_study_leaves_the_previous_results(tmp_path, monkeypatch):
    out = tmp_path / "study"
    run_study(
        out, conditions=("vanilla",), n_prompts=16, n_bootstrap=20, progress=False, plots=False
    )
    before = (out / "report.md").read_text()
    import hooked_attnres.study.run as study_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(study_module, "study_report", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_study(
            out, conditions=("vanilla",), n_prompts=24, n_bootstrap=20, progress=False, plots=False
        )
    assert (out / "report.md").read_text() == before


def test_run_study_refuses_unknown_conditions_and_missing_runs(tmp_path):
    with pytest.raises(ValueError, match="condition must be one of"):
        run_study(tmp_path / "x", conditions=("attnres", "baseline"), progress=False)
    with pytest.raises(FileNotFoundError, match="holds no"):
        run_study(tmp_path / "x", checkpoints=tmp_path / "nothing", progress=False)
