"""Mass, effects (fast sweep == naive sweep), bootstrap coverage, dissociation, patching, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from conftest import hf_qwen3, randomize_routing
from hooked_attnres import HookedAttnRes, HookedAttnResConfig
from hooked_attnres import plotting
from hooked_attnres.analysis import (
    ablation_effects,
    bootstrap_ci,
    bootstrap_ci_rows,
    dissociation_report,
    plan_ablations,
    recency_schedule,
    routing_mass,
    run_ablations,
    schedule_comparison,
    summarize_mass,
)
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.patching import (
    get_act_patch_committed_blocks_by_pos,
    get_act_patch_routing_weights,
    get_act_patch_routing_weights_by_pos,
)
from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

TASK = KeyValueRetrieval(n_pairs=4, n_keys=8, n_values=8)


@pytest.fixture(scope="module")
def setup():
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(d_model=32, n_layers=6, n_heads=4, n_key_value_heads=2, d_mlp=48,
                              d_vocab=len(tokenizer), n_ctx=32, attnres_layout="cumulative",
                              attnres_num_blocks=3, attnres_recency_bias=0.5, seed=0)
    model = randomize_routing(HookedAttnRes(cfg, tokenizer=tokenizer)).eval()
    batch = TASK.sample(24, seed=3, split="test", vocab=tokenizer.get_vocab())
    return model, batch


def test_bootstrap_intervals_cover_the_true_mean():
    rng = np.random.default_rng(0)
    covered = 0
    for repetition in range(200):
        sample = rng.normal(2.0, 3.0, size=100)
        _, low, high = bootstrap_ci(sample, n_resamples=400, seed=repetition)
        covered += low <= 2.0 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_rows_are_paired_and_checked():
    values = np.random.default_rng(1).normal(size=(1, 50))
    mean, low, high = bootstrap_ci_rows(np.vstack([values, values + 5.0]), 300, seed=0)
    assert mean[1] - mean[0] == pytest.approx(5.0)
    assert high[1] - high[0] == pytest.approx(5.0) and low[1] - low[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match=r"\[rows, n\]"):
        bootstrap_ci_rows(np.zeros(5))


def test_routing_mass_is_the_cache_summed_by_family(setup):
    model, batch = setup
    mass = routing_mass(model, batch, positions="answer")
    assert (mass.groupby(["prompt", "router", "layer"]).mass.sum() - 1).abs().max() < 1e-6
    _, cache = model.run_with_cache(batch.tokens)
    rows = torch.arange(len(batch))
    for layer, router in model.routers():
        weights = cache[f"blocks.{layer}.{router}.hook_weights"][rows, batch.answer_pos]
        for family, indices in model.source_families(layer, router).items():
            expected = weights[:, indices].sum(-1) if indices else torch.zeros(len(batch))
            got = mass[(mass.router == router) & (mass.layer == layer) & (mass.family == family)]
            np.testing.assert_allclose(got.sort_values("prompt").mass.to_numpy(), expected.double().numpy(),
                                       atol=1e-6)
    summary = summarize_mass(mass, by=("router", "family"), n_bootstrap=50)
    assert set(summary.columns) >= {"router", "family", "mass", "ci_low", "ci_high", "n_prompts"}
    assert (summary.ci_low <= summary.mass + 1e-12).all() and (summary.mass <= summary.ci_high + 1e-12).all()


def test_recency_wrapped_mass_equals_the_analytic_schedule():
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(num_hidden_layers=6), wrap="recency", num_blocks=3,
                                        recency_bias=3.0)
    tokens = torch.randint(0, 61, (16, 11), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model, tokens, positions="all")
    table = schedule_comparison(mass, recency_schedule(6, 3, 3.0))
    assert len(table) == 6 * 2 * len(FAMILIES)
    assert table.max_abs_deviation.max() <= 1e-6
    with pytest.raises(ValueError, match="different shape"):
        schedule_comparison(mass, recency_schedule(4, 2, 3.0))


def test_fast_sweep_equals_naive_sweep(setup):
    model, batch = setup
    plan = plan_ablations(model, groups="layers")
    assert len(plan) == 4 * 2 * model.cfg.n_layers
    fast = run_ablations(model, batch, plan, metrics=("logit_diff", "logprob"), fast=True, chunk=10,
                         progress=False)
    naive = run_ablations(model, batch, plan, metrics=("logit_diff", "logprob"), fast=False, chunk=10,
                          progress=False)
    for metric in ("logit_diff", "logprob"):
        np.testing.assert_allclose(fast[0][metric], naive[0][metric], atol=1e-5)
        np.testing.assert_allclose(fast[1][metric], naive[1][metric], atol=1e-5)
    noops = [i for i, a in enumerate(plan) if a.is_noop]
    assert noops  # e.g. "older" at the first layers
    for i in noops:  # the naive loop ran them: masking nothing leaves the metric unchanged
        np.testing.assert_allclose(naive[1]["logit_diff"][i], naive[0]["logit_diff"], atol=1e-6)
    changed = [i for i, a in enumerate(plan) if not a.is_noop]
    assert max(np.abs(fast[1]["logit_diff"][i] - fast[0]["logit_diff"]).max() for i in changed) > 1e-3


def test_ablation_effects_table(setup):
    model, batch = setup
    effects = ablation_effects(model, batch, groups={"early": [0, 1], "late": [4, 5], "all": range(6)},
                               n_bootstrap=50, progress=False)
    assert list(effects.columns) == ["router", "group", "layers", "family", "metric", "clean", "ablated",
                                     "effect", "ci_low", "ci_high", "n_masked_routers", "skipped", "n_prompts"]
    assert len(effects) == 2 * 3 * 4 * 3
    absent = effects[effects.n_masked_routers == 0]
    assert (absent.effect == 0).all()
    np.testing.assert_allclose(effects.effect, effects.ablated - effects.clean, atol=1e-9)
    with pytest.raises(ValueError, match="unknown metric"):
        ablation_effects(model, batch, metrics=("bleu",), progress=False)
    with pytest.raises(ValueError, match="unknown depth band|groups must be"):
        ablation_effects(model, batch, groups="thirds", progress=False)


def test_dissociation_report_on_a_handmade_table():
    mass = pd.DataFrame({"router": ["mlp_res"] * 4, "family": list(FAMILIES),
                         "mass": [0.2, 0.1, 0.15, 0.55], "ci_low": 0.0, "ci_high": 1.0})
    effects = pd.DataFrame({"router": ["mlp_res"] * 4, "group": "all", "metric": "logit_diff",
                            "family": list(FAMILIES), "effect": [-2.0, -0.5, 0.01, -0.4],
                            "ci_low": [-2.5, -0.7, -0.1, -0.6], "ci_high": [-1.5, -0.3, 0.1, -0.2],
                            "n_masked_routers": 3})
    report = dissociation_report(mass, effects).iloc[0]
    assert report.mass_ranking == ["current", "embedding", "prev_completed", "older"]
    assert report.effect_ranking == ["embedding", "older", "current", "prev_completed"]
    assert report.top_mass == "current" and report.top_effect == "embedding"
    assert not report.top_mass_is_top_effect
    assert report.appreciable_mass_no_effect == ["prev_completed"]
    assert report.spearman == pytest.approx(0.0, abs=1e-12)  # ranks (3,1,2,4) vs (4,3,1,2): sum d^2 = 10
    with pytest.raises(ValueError, match="no effects"):
        dissociation_report(mass, effects, metric="accuracy")


def test_patching_shapes_self_patching_and_an_independent_cell(setup):
    model, batch = setup
    tokens = batch.tokens[:6]
    _, cache = model.run_with_cache(tokens)
    clean_metric = batch[:6].logit_diff(model(tokens)).mean()

    def metric(logits):
        return batch[:6].logit_diff(logits).mean()

    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    by_layer = get_act_patch_routing_weights(model, tokens, cache, metric)
    by_pos = get_act_patch_routing_weights_by_pos(model, tokens, cache, metric)
    blocks = get_act_patch_committed_blocks_by_pos(model, tokens, cache, metric)
    assert by_layer.shape == (2, n_layers) and by_pos.shape == (2, n_layers, n_pos)
    assert blocks.shape == (n_layers, n_pos)
    for result in (by_layer, by_pos):
        torch.testing.assert_close(result, torch.full_like(result, clean_metric.item()), atol=1e-5, rtol=0)
    commits = [l for l in range(n_layers) if f"blocks.{l}.hook_committed_block" in model.hook_dict]
    assert torch.isnan(blocks[[l for l in range(n_layers) if l not in commits]]).all()
    torch.testing.assert_close(blocks[commits], torch.full((len(commits), n_pos), clean_metric.item()),
                               atol=1e-5, rtol=0)

    # a real patch: clean weights into corrupted prompts, checked against a full forward
    corrupted = batch.corrupted_tokens[:6]
    patched = get_act_patch_routing_weights(model, corrupted, cache, metric)
    name = "blocks.3.mlp_res.hook_weights"
    full = model.run_with_hooks(corrupted, fwd_hooks=[(name, lambda w, hook: cache[name])])
    assert patched[1, 3].item() == pytest.approx(metric(full).item(), abs=1e-5)
    assert not torch.allclose(patched, torch.full_like(patched, clean_metric.item()))

    with pytest.raises(ValueError, match="batch"):
        get_act_patch_routing_weights(model, batch.tokens[:5], cache, metric)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            get_act_patch_routing_weights(model, tokens, cache, metric)
    finally:
        model.eval()


def test_plots_are_figures_and_self_contained_html(setup, tmp_path):
    model, batch = setup
    mass = routing_mass(model, batch)
    summary = summarize_mass(mass, n_bootstrap=20)
    effects = ablation_effects(model, batch, groups={"early": [0, 1], "all": range(6)}, n_bootstrap=20,
                               progress=False)
    _, cache = model.run_with_cache(batch.tokens)
    figures = {
        "heatmap": plotting.routing_heatmap(mass),
        "sources": plotting.source_heatmap(model, cache, "mlp_res"),
        "bars": plotting.mass_effect_bars(summary, effects),
        "scatter": plotting.mass_effect_scatter(summary, effects),
        "bands": plotting.effect_bands(effects),
    }
    assert all(isinstance(f, go.Figure) for f in figures.values())
    assert len(figures["heatmap"].data) == 2 and len(figures["bars"].data) == 4
    assert len(figures["bands"].data) == 2 * len(FAMILIES)
    path = plotting.save_html(figures["bars"], tmp_path / "bars.html")
    html = path.read_text()
    assert "plotly" in html and 'src="https://cdn' not in html and len(html) > 1_000_000
