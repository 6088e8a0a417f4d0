"""Mass, effects (fast sweep == naive sweep), bootstrap coverage, dissociation, plots
(activation patching is in test_patching.py)."""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from helpers import hf_qwen3, randomize_routing, tiny_model, title_of
from torch import Tensor

from hooked_attnres import HookedAttnRes, HookedAttnResConfig, plotting
from hooked_attnres._tl import Slice
from hooked_attnres.analysis import (
    ablation_effects,
    bootstrap_ci,
    bootstrap_ci_rows,
    dissociation_report,
    metric_values,
    plan_ablations,
    recency_schedule,
    routing_lens,
    routing_mass,
    run_ablations,
    schedule_comparison,
    summarize_mass,
)
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
from hooked_attnres.tasks.base import TaskBatch

TASK = KeyValueRetrieval(n_pairs=4, n_keys=8, n_values=8)


@pytest.fixture(scope="module")
def setup():
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(
        d_model=32,
        n_layers=6,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=len(tokenizer),
        n_ctx=32,
        attnres_layout="cumulative",
        attnres_num_blocks=3,
        attnres_recency_bias=0.5,
        seed=0,
    )
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
            np.testing.assert_allclose(
                got.sort_values("prompt").mass.to_numpy(), expected.double().numpy(), atol=1e-6
            )
    summary = summarize_mass(mass, by=("router", "family"), n_bootstrap=50)
    assert set(summary.columns) >= {"router", "family", "mass", "ci_low", "ci_high", "n_prompts"}
    assert (summary.ci_low <= summary.mass + 1e-12).all() and (
        summary.mass <= summary.ci_high + 1e-12
    ).all()


def test_recency_wrapped_mass_equals_the_analytic_schedule():
    model = HookedAttnRes.from_hf_qwen3(
        hf_qwen3(num_hidden_layers=6), wrap="recency", num_blocks=3, recency_bias=3.0
    )
    tokens = torch.randint(0, 61, (16, 11), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model, tokens, positions="all")
    table = schedule_comparison(mass, recency_schedule(6, 3, 3.0))
    assert len(table) == 6 * 2 * len(FAMILIES)
    assert table.max_abs_deviation.max() <= 1e-6
    with pytest.raises(ValueError, match="different shape"):
        schedule_comparison(mass, recency_schedule(4, 2, 3.0))


def test_schedule_comparison_of_a_mass_table_without_sublayer_rows_says_so():
    """Audit 147: an empty mass table (or one holding no sublayer router's rows, e.g. the
    final router's only) was told "the schedule is for a different shape than the measured
    model", true of no schedule. It says the table is empty, or which routers it holds,
    and what to pass; the control: the whole table of the same model compares."""
    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model.eval(), tokens, positions="all")
    schedule = recency_schedule(4, 2, 3.0)
    with pytest.raises(
        ValueError,
        match=r"the mass table is empty: no rows of the sublayer .*"
        r"nothing to compare; pass the whole routing_mass\(model, batch\)",
    ):
        schedule_comparison(mass.iloc[:0], schedule)
    final_only = mass.assign(router="final_res")
    with pytest.raises(ValueError, match=r"has only the routers \['final_res'\]: no rows of"):
        schedule_comparison(final_only, schedule)
    assert len(schedule_comparison(mass, schedule)) == 4 * 2 * len(FAMILIES)


def test_fast_sweep_equals_naive_sweep(setup):
    model, batch = setup
    plan = plan_ablations(model, groups="layers")
    assert len(plan) == 4 * 2 * model.cfg.n_layers
    fast = run_ablations(
        model, batch, plan, metrics=("logit_diff", "logprob"), fast=True, chunk=10, progress=False
    )
    naive = run_ablations(
        model, batch, plan, metrics=("logit_diff", "logprob"), fast=False, chunk=10, progress=False
    )
    for metric in ("logit_diff", "logprob"):
        np.testing.assert_allclose(fast[0][metric], naive[0][metric], atol=1e-5)
        np.testing.assert_allclose(fast[1][metric], naive[1][metric], atol=1e-5)
    noops = [i for i, a in enumerate(plan) if a.is_noop]
    assert noops  # e.g. "older" at the first layers
    for i in noops:  # the naive loop ran them: masking nothing leaves the metric unchanged
        np.testing.assert_allclose(naive[1]["logit_diff"][i], naive[0]["logit_diff"], atol=1e-6)
    changed = [i for i, a in enumerate(plan) if not a.is_noop]
    assert (
        max(np.abs(fast[1]["logit_diff"][i] - fast[0]["logit_diff"]).max() for i in changed) > 1e-3
    )


def test_ablation_effects_table(setup):
    model, batch = setup
    effects = ablation_effects(
        model,
        batch,
        groups={"early": [0, 1], "late": [4, 5], "all": range(6)},
        n_bootstrap=50,
        progress=False,
    )
    assert list(effects.columns) == [
        "router",
        "group",
        "layers",
        "family",
        "metric",
        "clean",
        "ablated",
        "effect",
        "ci_low",
        "ci_high",
        "n_masked_routers",
        "skipped",
        "n_prompts",
        "confidence",
    ]
    assert len(effects) == 2 * 3 * 4 * 3
    absent = effects[effects.n_masked_routers == 0]
    assert (absent.effect == 0).all()
    np.testing.assert_allclose(effects.effect, effects.ablated - effects.clean, atol=1e-9)
    with pytest.raises(ValueError, match="unknown metric"):
        ablation_effects(model, batch, metrics=("bleu",), progress=False)
    with pytest.raises(ValueError, match="unknown depth band|groups must be"):
        ablation_effects(model, batch, groups="thirds", progress=False)


# the layers of each group or band (as ablation_effects and summarize_mass write them) of a
# 6-layer model, for hand-made tables
BAND_LAYERS = {"early": "0,1", "middle": "2,3", "late": "4,5", "all": "0,1,2,3,4,5"}


def _handmade_dissociation_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(mass, effects)`` of one MLP router type: ``current`` has the most mass (0.55),
    ``embedding`` the largest harm (-2.0)."""
    mass = pd.DataFrame(
        {
            "router": ["mlp_res"] * 4,
            "family": list(FAMILIES),
            "mass": [0.2, 0.1, 0.15, 0.55],
            "ci_low": 0.0,
            "ci_high": 1.0,
            "family_read": True,
            "layers": BAND_LAYERS["all"],
        }
    )
    effects = pd.DataFrame(
        {
            "router": ["mlp_res"] * 4,
            "group": "all",
            "layers": BAND_LAYERS["all"],
            "metric": "logit_diff",
            "family": list(FAMILIES),
            "effect": [-2.0, -0.5, 0.01, -0.4],
            "ci_low": [-2.5, -0.7, -0.1, -0.6],
            "ci_high": [-1.5, -0.3, 0.1, -0.2],
            "n_masked_routers": 3,
        }
    )
    return mass, effects


def test_dissociation_report_on_a_handmade_table():
    mass, effects = _handmade_dissociation_tables()
    report = dissociation_report(mass, effects).iloc[0]
    assert report.mass_ranking == ["current", "embedding", "prev_completed", "older"]
    assert report.abs_effect_ranking == ["embedding", "older", "current", "prev_completed"]
    assert report.top_mass == "current" and report.top_abs_effect == "embedding"
    assert not report.top_mass_is_top_abs_effect
    assert report.appreciable_mass_no_effect == ["prev_completed"]
    assert report.spearman == pytest.approx(
        0.0, abs=1e-12
    )  # ranks (3,1,2,4) vs (4,3,1,2): sum d^2 = 10
    with pytest.raises(ValueError, match="no effects"):
        dissociation_report(mass, effects, metric="accuracy")


def test_plots_are_figures_and_self_contained_html(setup, tmp_path):
    model, batch = setup
    mass = routing_mass(model, batch)
    summary = summarize_mass(mass, n_bootstrap=20)
    effects = ablation_effects(
        model, batch, groups={"early": [0, 1], "all": range(6)}, n_bootstrap=20, progress=False
    )
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
    assert len(figures["sources"].data) == 1
    merged = summary.merge(
        effects[(effects.metric == "logit_diff") & (effects.group == "all")],
        on=["router", "family"],
    )
    assert len(figures["scatter"].data) == len(merged) == 2 * len(FAMILIES)
    # the heatmap cells are the mean mass per layer and family (computed here from the table),
    # blank where the router reads no source of the family
    attn = figures["heatmap"].data[0]
    for i, layer in enumerate(sorted(set(mass.layer))):
        for j, family in enumerate(FAMILIES):
            rows = mass[
                (mass.router == "attn_res") & (mass.layer == layer) & (mass.family == family)
            ]
            if model.routing_layout.families(model.site(layer, "attn_res"))[family]:
                assert attn.z[i][j] == pytest.approx(rows.mass.mean(), abs=1e-12)
            else:
                assert attn.z[i][j] is None or np.isnan(attn.z[i][j])
    # a table of two models would be averaged across them: refused
    two_seeds = pd.concat([mass.assign(seed=0), mass.assign(seed=1, mass=1 - mass.mass)])
    with pytest.raises(ValueError, match=r"mass has 2 values of 'seed' \(\[0, 1\]\)"):
        plotting.routing_heatmap(two_seeds)
    # the source heatmap: one row per layer, one column per label, blank where a layer lacks it
    z = np.asarray(figures["sources"].data[0].z, dtype=float)
    columns = list(figures["sources"].data[0].x)
    assert z.shape == (model.cfg.n_layers, len(columns)) and columns[-1] == "current"
    for layer in range(model.cfg.n_layers):
        labels = model.source_labels(layer, "mlp_res")
        weights = cache[f"blocks.{layer}.mlp_res.hook_weights"].mean(dim=(0, 1))
        for j, column in enumerate(columns):
            if column in labels:
                assert z[layer, j] == pytest.approx(weights[labels.index(column)].item(), abs=1e-6)
            else:
                assert np.isnan(z[layer, j])
    # one position: the cells are that position's weights averaged over prompts, as titled
    last = plotting.source_heatmap(model, cache, "mlp_res", positions=-1)
    assert "position -1, mean over prompts" in title_of(last)
    weights = cache["blocks.0.mlp_res.hook_weights"][:, -1].mean(0)
    assert np.asarray(last.data[0].z, dtype=float)[0, 0] == pytest.approx(weights[0].item())
    # bar heights and whisker ends are the summary's and the effect table's numbers
    bars = figures["bars"].data  # [attn mass, attn effect, mlp mass, mlp effect]
    for k, router in enumerate(("attn_res", "mlp_res")):
        mass_bar, effect_bar = bars[2 * k], bars[2 * k + 1]
        for j, family in enumerate(mass_bar.x):
            row = merged[(merged.router == router) & (merged.family == family)].iloc[0]
            assert mass_bar.y[j] == pytest.approx(row.mass)
            assert mass_bar.y[j] + mass_bar.error_y.array[j] == pytest.approx(row.ci_high_x)
            assert mass_bar.y[j] - mass_bar.error_y.arrayminus[j] == pytest.approx(row.ci_low_x)
            # effects in % of the clean logit difference (the default, relative=True)
            scale = 100 / row.clean
            assert effect_bar.y[j] == pytest.approx(row.effect * scale)
            assert effect_bar.y[j] + effect_bar.error_y.array[j] == pytest.approx(
                row.ci_high_y * scale
            )
            assert effect_bar.y[j] - effect_bar.error_y.arrayminus[j] == pytest.approx(
                row.ci_low_y * scale
            )
    absolute = plotting.mass_effect_bars(summary, effects, relative=False).data
    assert list(absolute[1].y) == pytest.approx(
        list(
            merged[merged.router == "attn_res"].set_index("family").reindex(list(bars[1].x)).effect
        )
    )
    # colour scales from the data; missing sources blank (not "NaN"); titles and axis labels
    assert figures["heatmap"].data[0].zmax == pytest.approx(
        mass.groupby(["router", "layer", "family"]).mass.mean().max()
    )
    text = figures["sources"].data[0].text
    assert all(
        (cell == "") == np.isnan(v)
        for row_t, row_z in zip(text, z, strict=True)
        for cell, v in zip(row_t, row_z, strict=True)
    )
    for name, figure in figures.items():
        assert title_of(figure), name
        assert figure.layout.autosize and figure.layout.width is None, name
        assert any(axis.title.text for axis in (figure.layout.xaxis, figure.layout.yaxis)), name
    for name, figure in figures.items():
        path = plotting.save_html(figure, tmp_path / "out" / f"{name}.html")
        html = path.read_text()
        assert path.exists() and "plotly" in html and "Plotly.newPlot" in html
        assert len(html) > 1_000_000  # plotly.js is inlined
        assert not re.search(r"<script[^>]*\bsrc=", html), (
            "an external script would need the network"
        )


def test_source_heatmap_of_a_model_without_routers_says_why():
    model = tiny_model(attnres_layout="none")
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="attnres_layout=.none. and therefore no routers"):
        plotting.source_heatmap(model, cache)


def _plot_tables(seeds=(0,), bands=("all",)):
    """Mass summary and effects tables shaped like the study's, with distinct numbers."""
    rng = np.random.default_rng(0)
    mass, effects = [], []
    for seed in seeds:
        for router in ("attn_res", "mlp_res"):
            for family in FAMILIES:
                for band in bands:
                    m = float(rng.uniform())
                    mass.append(
                        dict(
                            seed=seed,
                            router=router,
                            band=band,
                            family=family,
                            mass=m,
                            ci_low=m - 0.01,
                            ci_high=m + 0.02,
                            family_read=True,
                            layers=BAND_LAYERS[band],
                        )
                    )
                for group in ("early", "all"):
                    e = float(rng.normal())
                    effects.append(
                        dict(
                            seed=seed,
                            router=router,
                            group=group,
                            layers=BAND_LAYERS[group],
                            family=family,
                            metric="logit_diff",
                            clean=4.0,
                            effect=e,
                            ci_low=e - 0.1,
                            ci_high=e + 0.2,
                            n_masked_routers=1,
                        )
                    )
    return pd.DataFrame(mass), pd.DataFrame(effects)


def test_mass_effect_plots_refuse_tables_of_several_models_or_bands():
    # one model: one point / bar per router and family, at the table's numbers
    mass, effects = _plot_tables()
    scatter = plotting.mass_effect_scatter(mass, effects)
    assert len(scatter.data) == 2 * len(FAMILIES)
    for trace in scatter.data:
        family, router = trace.name.split(" (")[0], trace.marker.symbol
        router = {"circle": "attn_res", "square": "mlp_res"}[router]
        row = effects[
            (effects.router == router) & (effects.family == family) & (effects.group == "all")
        ].iloc[0]
        assert trace.x[0] == mass[(mass.router == router) & (mass.family == family)].mass.item()
        assert trace.y[0] == pytest.approx(abs(row.effect))
    # a mass summary per depth band paired every band's mass with the overall effect (32
    # points instead of 8); then it was refused; since audit 114 its band "all" (the
    # effects' group) is drawn, and two seeds would pair seed 0's mass with seed 1's effect
    banded, _ = _plot_tables(bands=("early", "middle", "late", "all"))
    points = plotting.mass_effect_scatter(banded, effects).data
    assert len(points) == 2 * len(FAMILIES)
    for trace in points:
        family, router = trace.name.split(" (")[0], trace.marker.symbol
        router = {"circle": "attn_res", "square": "mlp_res"}[router]
        row = banded[(banded.router == router) & (banded.family == family)]
        assert trace.x[0] == row[row.band == "all"].mass.item()
    with pytest.raises(
        ValueError,
        match=r"mass_summary has several rows for router='attn_res'"
        r", family='embedding' \(they differ in \['seed'\]\)",
    ):
        plotting.mass_effect_scatter(_plot_tables(seeds=(0, 1), bands=("all",))[0], effects)
    two_mass, two_effects = _plot_tables(seeds=(0, 1))
    for plot in (plotting.mass_effect_scatter, plotting.mass_effect_bars):
        with pytest.raises(ValueError, match="several rows .* use mass_effect_by_seed"):
            plot(two_mass, two_effects)
        with pytest.raises(ValueError, match="effects has several rows for router='attn_res'"):
            plot(mass, two_effects)
    with pytest.raises(
        ValueError, match="several rows for router='attn_res', group='early'.*use effects_by_seed"
    ):
        plotting.effect_bands(two_effects)


# --- further checks -------------------------------------------------------------------------------


def test_bootstrap_rows_share_their_resamples():
    rng = np.random.default_rng(2)
    rows = np.vstack([rng.exponential(size=40), rng.normal(size=40), 2 * rng.normal(size=40)])
    mean, low, high = bootstrap_ci_rows(rows, n_resamples=300, confidence=0.9, seed=4)
    np.testing.assert_allclose(mean, rows.mean(axis=1), atol=1e-12)
    for i, row in enumerate(rows):  # the resampled prompts depend on n and the seed only
        assert bootstrap_ci(row, n_resamples=300, confidence=0.9, seed=4) == pytest.approx(
            (mean[i], low[i], high[i]), abs=1e-12
        )
    # linearity in the paired rows: the interval of 3x is 3 times the interval of x
    scaled = bootstrap_ci_rows(np.vstack([rows[0], 3 * rows[0]]), 300, seed=1)
    assert scaled[1][1] == pytest.approx(3 * scaled[1][0]) and scaled[2][1] == pytest.approx(
        3 * scaled[2][0]
    )
    # the interval is made of resampled means: around the mean, inside [min, max] of the data
    assert (low <= mean).all() and (mean <= high).all()
    assert (low >= rows.min(axis=1)).all() and (high <= rows.max(axis=1)).all()


def test_bootstrap_properties_and_bad_inputs():
    values = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values.numpy(), seed=3)  # tensors accepted
    assert bootstrap_ci([2.5] * 10) == (2.5, 2.5, 2.5)
    narrow = bootstrap_ci(values, confidence=0.5, seed=0)
    wide = bootstrap_ci(values, confidence=0.99, seed=0)
    assert (
        wide[1] <= narrow[1] <= narrow[2] <= wide[2] and wide[2] - wide[1] > narrow[2] - narrow[1]
    )
    with pytest.warns(RuntimeWarning, match=r"row\(s\) \[0\]"):
        mean, low, high = bootstrap_ci_rows(np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]]), 100)
    assert (
        np.isnan([mean[0], low[0], high[0]]).all()
        and not np.isnan([mean[1], low[1], high[1]]).any()
    )
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_ci_rows(np.zeros((2, 0)))


def test_routing_mass_other_positions_and_chunks(setup):
    model, batch = setup
    small = batch[:10]
    _, cache = model.run_with_cache(small.tokens)
    for positions in ("all", [0, 3, 5]):
        mass = routing_mass(model, small, positions=positions, chunk=4)  # chunks of 4, 4, 2 prompts
        assert len(mass) == len(small) * len(model.routers()) * len(FAMILIES)
        for layer, router in model.routers():
            w = cache[f"blocks.{layer}.{router}.hook_weights"]
            w = w.mean(1) if positions == "all" else w[:, positions].mean(1)
            for family, indices in model.source_families(layer, router).items():
                expected = w[:, indices].sum(-1) if indices else torch.zeros(len(small))
                got = mass[
                    (mass.router == router) & (mass.layer == layer) & (mass.family == family)
                ]
                np.testing.assert_allclose(
                    got.sort_values("prompt").mass, expected.double(), atol=1e-6
                )
    # token input with explicit answer positions equals the TaskBatch input
    pd.testing.assert_frame_equal(
        routing_mass(model, small.tokens, answer_pos=small.answer_pos), routing_mass(model, small)
    )
    bands = routing_mass(model, small).drop_duplicates("layer").set_index("layer").band
    assert bands.to_dict() == {
        0: "early",
        1: "early",
        2: "middle",
        3: "middle",
        4: "late",
        5: "late",
    }
    with pytest.raises(ValueError, match="answer_pos"):
        routing_mass(model, small.tokens, positions="answer")
    with pytest.raises(ValueError, match="positions must be"):
        routing_mass(model, small, positions="last")
    with pytest.raises(ValueError, match="no routers"):
        routing_mass(tiny_model(attnres_layout="none"), small.tokens, positions="all")


def test_routing_mass_with_a_final_router():
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=len(tokenizer),
        n_ctx=32,
        attnres_layout="kimi",
        attnres_num_blocks=2,
        seed=0,
    )
    model = randomize_routing(HookedAttnRes(cfg, tokenizer=tokenizer)).eval()
    batch = TASK.sample(5, seed=1, split="test", vocab=tokenizer.get_vocab())
    mass = routing_mass(model, batch)
    assert (mass.groupby(["prompt", "router", "layer"]).mass.sum() - 1).abs().max() < 1e-6
    final = mass[mass.router == "final_res"]
    assert set(final.layer) == {-1} and set(final.band) == {"final"}
    _, cache = model.run_with_cache(batch.tokens)
    w = cache["final_res.hook_weights"][:, -1]  # the answer is read at the last position
    labels = model.source_labels(None, "final_res")
    got = final[final.family == "current"].sort_values("prompt").mass.to_numpy()
    np.testing.assert_allclose(got, w[:, labels.index("current")].double(), atol=1e-6)
    # layer 0 attention reads only the embedding: all of its mass is there
    first = mass[(mass.router == "attn_res") & (mass.layer == 0)]
    assert (first[first.family == "embedding"].mass == 1).all()
    assert (first[first.family != "embedding"].mass == 0).all()


@pytest.mark.parametrize("n_layers,num_blocks,bias", [(4, 2, 1.0), (5, 5, 0.0)])
def test_recency_wrapped_mass_matches_the_schedule_for_other_shapes(n_layers, num_blocks, bias):
    hf = hf_qwen3(num_hidden_layers=n_layers, hidden_size=16, head_dim=4, intermediate_size=16)
    model = HookedAttnRes.from_hf_qwen3(
        hf, wrap="recency", num_blocks=num_blocks, recency_bias=bias
    )
    tokens = torch.randint(0, 61, (6, 7), generator=torch.Generator().manual_seed(3))
    for positions in ("all", [1, 6]):
        table = schedule_comparison(
            routing_mass(model, tokens, positions=positions),
            recency_schedule(n_layers, num_blocks, bias),
        )
        assert table.max_abs_deviation.max() <= 1e-6
        assert (table.measured - table.predicted).abs().max() <= 1e-6
        # the prediction is not trivially uniform: e^b / (e^b + n) on the current source
        current = table[(table.family == "current") & (table.layer == n_layers - 1)]
        n_other = len(model.source_labels(n_layers - 1, "attn_res")) - 1
        assert current.predicted.iloc[0] == pytest.approx(np.exp(bias) / (np.exp(bias) + n_other))
    # a model with content-dependent routing deviates
    routed_model = randomize_routing(model)
    table = schedule_comparison(
        routing_mass(routed_model, tokens, positions="all"),
        recency_schedule(n_layers, num_blocks, bias),
    )
    assert table.max_abs_deviation.max() > 1e-3


def test_fast_sweep_equals_naive_sweep_with_a_final_router_and_skipped_routers():
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=len(tokenizer),
        n_ctx=32,
        attnres_layout="kimi",
        attnres_num_blocks=2,
        attnres_recency_bias=0.5,
        seed=0,
    )
    model = randomize_routing(HookedAttnRes(cfg, tokenizer=tokenizer), seed=2).eval()
    batch = TASK.sample(7, seed=2, split="test", vocab=tokenizer.get_vocab())
    plan = plan_ablations(model, routers=("attn_res", "mlp_res", "final_res"), groups="layers")
    assert len(plan) == 4 * (2 * 4 + 1)
    metrics = ("logit_diff", "logprob", "accuracy")
    # max_rows=14 batches two copies of the 7 prompts per pass; chunk=4 splits the prompts
    fast = run_ablations(
        model, batch, plan, metrics=metrics, fast=True, chunk=4, max_rows=14, progress=False
    )
    naive = run_ablations(model, batch, plan, metrics=metrics, fast=False, chunk=4, progress=False)
    for metric in metrics:
        np.testing.assert_allclose(fast[0][metric], naive[0][metric], atol=1e-5)
        np.testing.assert_allclose(fast[1][metric], naive[1][metric], atol=1e-5)
    # the clean metric is the model's own, computed here from a plain forward pass
    with torch.no_grad():
        np.testing.assert_allclose(
            fast[0]["logit_diff"], batch.logit_diff(model(batch.tokens)).numpy(), atol=1e-5
        )
    # kimi layer-0 attention reads only the embedding: masking it there is skipped, not NaN
    skipped = [a for a in plan if a.skipped]
    assert [(a.router, a.group, a.family) for a in skipped] == [
        ("attn_res", "layer 0", "embedding")
    ]
    assert skipped[0].is_noop
    for i, ablation in enumerate(plan):
        if ablation.is_noop:
            assert np.array_equal(fast[1]["logit_diff"][i], fast[0]["logit_diff"])
    final = [i for i, a in enumerate(plan) if a.router == "final_res" and a.family == "current"]
    name = "final_res.hook_logits"
    assert plan[final[0]].masks[0][0] == name
    with torch.no_grad():  # one ablation checked against the public intervention API
        from hooked_attnres.interventions import mask_sources

        logits = model.run_with_hooks(
            batch.tokens, fwd_hooks=mask_sources(model, "current", routers="final_res")
        )
    np.testing.assert_allclose(
        fast[1]["logit_diff"][final[0]], batch.logit_diff(logits).numpy(), atol=1e-5
    )
    effects = ablation_effects(
        model,
        batch,
        routers=("attn_res", "final_res"),
        groups="all",
        metrics=("logit_diff",),
        n_bootstrap=20,
        progress=False,
    )
    row = effects[(effects.router == "attn_res") & (effects.family == "embedding")].iloc[0]
    assert row.skipped == "attn_res layer 0" and row.n_masked_routers == 3
    assert list(effects[effects.router == "final_res"].group.unique()) == ["final"]
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            run_ablations(model, batch, plan[:1], progress=False)
        # audit 147: ablation_effects's refusal named run_ablations, which it calls
        with pytest.raises(ValueError, match="^ablation_effects needs the model in eval mode"):
            ablation_effects(model, batch, progress=False)
    finally:
        model.eval()


def test_summarize_mass_records_the_layers_of_each_group():
    """Audit 129: the summary's ``layers`` (as ablation_effects writes a group's): the
    layers of the group's rows, computed here from the table (the final router, layer -1,
    adds none, as its effects' group "final"); the other columns are those of before, with
    ``confidence`` (the intervals' level, session 22) after ``n_prompts``."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=6, attnres_num_blocks=3))
    mass = routing_mass(model.eval(), random_batch(4, 5, model.cfg.d_vocab))
    for by in (("router", "family"), ("router", "band", "family"), ("band",), ("layer",)):
        summary = summarize_mass(mass, by=by, n_bootstrap=40)
        assert list(summary.columns) == [
            *by,
            "mass",
            "ci_low",
            "ci_high",
            "n_prompts",
            "confidence",
            "family_read",
            "layers",
        ]
        for row in summary.itertuples(index=False):
            rows = mass[(mass[list(by)] == pd.Series(row._asdict())[list(by)]).all(axis=1)]
            held = sorted({int(layer) for layer in rows.layer if layer != -1})
            assert row.layers == ",".join(str(layer) for layer in held), (by, row)


def test_summarize_mass_takes_whole_float_layers_as_their_layers_and_refuses_others():
    """Audit 137: a mass table whose ``layer`` is float (``0.0, 1.0``: a CSV column with
    an empty cell reads back as float) was summarised with ``layers`` "0.0,1.0,2.0,3.0",
    which dissociation_report then refused as "not a list of layers", and a layer 1.5 was
    written "0.0,1.5,2.0,3.0" silently. One rule (`integer_layers`): a whole float is its
    layer, exactly (the summary and the report equal those of the integer table); a float
    that is no whole number, or NaN, is refused, never rounded."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=2)).eval()
    batch = random_batch(4, 5, model.cfg.d_vocab)
    mass = routing_mass(model, batch)
    as_float = mass.astype({"layer": float})
    effects = ablation_effects(
        model, batch, groups="all", metrics="logit_diff", n_bootstrap=20, progress=False
    )
    for by in (("router", "family"), ("layer", "family")):
        want = summarize_mass(mass, by=by, n_bootstrap=20)
        pd.testing.assert_frame_equal(summarize_mass(as_float, by=by, n_bootstrap=20), want)
    summary = summarize_mass(as_float, n_bootstrap=20)
    assert set(summary.layers) == {"0,1", ""}  # the final router's group: none
    want = dissociation_report(summarize_mass(mass, n_bootstrap=20), effects)
    pd.testing.assert_frame_equal(dissociation_report(summary, effects), want)
    for bad, shown in ((1.5, "1.5"), (float("nan"), "nan"), (float("inf"), "inf")):
        table = as_float.copy()
        table.loc[table.layer == 1, "layer"] = bad
        with pytest.raises(
            ValueError,
            match=rf"^the mass table's column 'layer' holds \d+ value\(s\) that are no layer "
            rf"\(a whole number\), e\.g\. {shown} in row \d+",
        ):
            summarize_mass(table, n_bootstrap=20)


def test_the_mass_readers_take_the_layers_by_summarize_mass_rule(setup):
    """Audit 144: summarize_mass read a float ``layer`` column by `integer_layers` (audit
    137: 0.0 is layer 0, 1.5 refused), but its siblings did not: routing_heatmap drew rows
    "layer 0.0" and a row "layer 1.5", silently, and schedule_comparison returned float
    layers and refused 1.5 as "a different shape". Both now read the layers by the one
    rule: the float table gives what the integer table gives, and 1.5 is refused by name."""
    model, batch = setup
    mass = routing_mass(model, batch)
    as_float = mass.astype({"layer": float})
    schedule = recency_schedule(6, 3, 0.5)
    pd.testing.assert_frame_equal(
        schedule_comparison(as_float, schedule), schedule_comparison(mass, schedule)
    )
    want = plotting.routing_heatmap(mass).to_dict()
    assert plotting.routing_heatmap(as_float).to_dict() == want
    assert list(want["data"][0]["y"][:2]) == ["layer 0", "layer 1"]
    bad = as_float.copy()
    bad.loc[bad.layer == 1, "layer"] = 1.5
    for call in (lambda: schedule_comparison(bad, schedule), lambda: plotting.routing_heatmap(bad)):
        with pytest.raises(
            ValueError,
            match=r"^the mass table's column 'layer' holds \d+ value\(s\) that are no layer "
            r"\(a whole number\), e\.g\. 1\.5 in row \d+",
        ):
            call()


def test_summarize_mass_reads_a_categorical_float_layer_column_as_the_plain_one():
    """Review 140: `integer_layers` read a categorical column's dtype (no float kind), so
    the float table made categorical (``astype("category")``, which summarize_mass takes
    since audit 120 with the numbers of the plain table) still wrote its layers
    "0.0,1.0"; a categorical column of other layers is refused as the plain one is."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=2)).eval()
    mass = routing_mass(model, random_batch(4, 5, model.cfg.d_vocab))
    as_float = mass.astype({"layer": float})
    for by in (("router", "family"), ("band", "family")):
        want = summarize_mass(mass, by=by, n_bootstrap=20)
        got = summarize_mass(as_float.astype({"layer": "category"}), by=by, n_bootstrap=20)
        pd.testing.assert_frame_equal(got, want)
    table = as_float.copy()
    table.loc[table.layer == 1, "layer"] = 1.5
    with pytest.raises(ValueError, match=r"^the mass table's column 'layer' holds .* e\.g\. 1\.5"):
        summarize_mass(table.astype({"layer": "category"}), n_bootstrap=20)


def test_summarize_mass_takes_text_layers_as_their_layers():
    """Audit 142: a mass table whose ``layer`` column is text (``astype(str)``, or a CSV
    read with ``dtype=str``) was summarised with
    ``layers`` in text order, "0,1,10,11,2,...,9" for 12 layers, and the final router's
    "-1" (``-1`` is no ``"-1"``), so its pairing with the effects of group "final" was
    refused as "of layers [-1] but the effects ... masked layers []", a false reason. By the
    one rule (`integer_layers`) the text of a whole number is that layer: the summary equals
    the integer table's (by router or by layer), the final router's pairing is made, and a
    text that is no layer ("a", "1.5") is refused naming it."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=12, attnres_num_blocks=3))
    model.eval()
    batch = random_batch(4, 6, model.cfg.d_vocab)
    mass = routing_mass(model, batch)
    as_text = mass.astype({"layer": str})
    for table in (as_text, as_text.astype({"layer": "category"})):
        for by in (("router", "family"), ("layer", "family")):
            want = summarize_mass(mass, by=by, n_bootstrap=40)
            pd.testing.assert_frame_equal(summarize_mass(table, by=by, n_bootstrap=40), want)
    summary = summarize_mass(as_text, n_bootstrap=40)
    assert set(summary.layers) == {",".join(map(str, range(12))), ""}
    effects = ablation_effects(
        model,
        batch,
        routers=("attn_res", "final_res"),
        groups="all",
        metrics="logit_diff",
        n_bootstrap=40,
        progress=False,
    )
    want = dissociation_report(summarize_mass(mass, n_bootstrap=40), effects, group="final")
    pd.testing.assert_frame_equal(dissociation_report(summary, effects, group="final"), want)
    for bad in ("a", "1.5", " "):
        table = as_text.copy()
        table.loc[table.layer == "1", "layer"] = bad
        with pytest.raises(
            ValueError,
            match=rf"^the mass table's column 'layer' holds \d+ value\(s\) that are no layer "
            rf"\(a whole number\), e\.g\. '{re.escape(bad)}' in row \d+",
        ):
            summarize_mass(table, n_bootstrap=40)


def _old_layer_text(text: str):
    """The rule both twin parsers of mass.py wrote before audit 147 (`_layer_number`: a
    stripped label, `layer_tuple`: each stripped part): digits after leading minus signs,
    then ``int``, which raised for what it does not take; ``None``: not an integer."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def test_layer_label_and_layers_cell_share_one_integer_parser_unchanged():
    """Audit 147: `_layer_number` (a ``layer`` label) and `layer_tuple` (a ``layers``
    cell's parts) each parsed the text of an integer; one parser now (`_integer_text`).
    Every string of up to 3 characters over an alphabet of digits, signs, spaces, commas
    and digits ``int`` refuses (``"\u00b2"``) is read as before: the same number or
    tuple, or refused as before (NaN, "not a list of layers"); where the old rule raised
    ``int``'s bare "invalid literal" (``"--1"``, ``"\u00b2"``), both refuse with the
    table's message now, naming it."""
    import itertools

    from hooked_attnres.analysis.mass import _layer_number, integer_layers, layer_tuple

    alphabet = ["-", "0", "1", "9", " ", "+", ".", "_", "a", ",", "\u00b2", "\u0663"]
    texts = ["".join(t) for n in range(4) for t in itertools.product(alphabet, repeat=n)]
    crashed = 0
    for text in texts:
        try:
            old = _old_layer_text(text)
        except ValueError:
            crashed += 1
            assert math.isnan(_layer_number(text))  # refused by integer_layers, by name
        else:
            new = _layer_number(text)
            assert (math.isnan(new) and old is None) or new == old, text
        # a layers cell: its comma-separated parts, each by the old rule
        try:
            parts = [_old_layer_text(p) for p in text.split(",")] if text.strip() else []
        except ValueError:
            parts = [None]
        if None in parts:
            with pytest.raises(ValueError, match=r"^tbl's 'layers' holds .*not a list of layers"):
                layer_tuple(text, "tbl")
        else:
            assert layer_tuple(text, "tbl") == tuple(sorted(set(parts))), text
    assert crashed > 0  # the alphabet reaches the old rule's crash
    table = pd.DataFrame({"layer": ["--1", "0"]})
    with pytest.raises(ValueError, match=r"^the table's column 'layer' holds 1 value.*'--1'"):
        integer_layers(table, "the table")


def test_summarize_mass_refuses_a_missing_layer_of_a_nullable_integer_column():
    """Audit 142: a CSV read with pandas' nullable dtypes (``dtype_backend=
    "numpy_nullable"`` or ``"pyarrow"``) gives ``layer`` an integer dtype whose empty cell
    is ``<NA>``; `integer_layers` returned any integer column as it was, so the missing
    layer was summarised by router (its row averaged in, its layer left out of
    ``layers``), where the same CSV read with NumPy dtypes (the cell NaN) is refused. Both
    are refused now, naming the rows; without a missing cell the summary equals the plain
    table's."""
    model = randomize_routing(tiny_model(attnres_layout="kimi")).eval()
    mass = routing_mass(model, random_batch(4, 6, model.cfg.d_vocab))
    want = summarize_mass(mass, n_bootstrap=40)
    for dtype in ("Int64", "int64[pyarrow]"):
        table = mass.astype({"layer": dtype})
        pd.testing.assert_frame_equal(summarize_mass(table, n_bootstrap=40), want)
        table.loc[(table.layer == 1) & (table.prompt == 0), "layer"] = None
        with pytest.raises(
            ValueError,
            match=r"^the mass table's column 'layer' holds 8 value\(s\) that are no layer "
            r"\(a whole number\), e\.g\. <NA> in row \d+",
        ):
            summarize_mass(table, n_bootstrap=40)


def _kimi_six_layer_mass_and_effects(groups: str):
    """``(mass, effects)`` of a 6-layer, 3-block kimi model with random routing on 6 random
    prompts of 7 tokens: `routing_mass`, and `ablation_effects` by ``groups`` (the logit
    difference, 40 resamples)."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=6, attnres_num_blocks=3))
    model.eval()
    batch = random_batch(6, 7, model.cfg.d_vocab)
    effects = ablation_effects(
        model, batch, groups=groups, metrics="logit_diff", n_bootstrap=40, progress=False
    )
    return routing_mass(model, batch), effects


def test_dissociation_report_refuses_effects_of_other_layers_than_the_mass():
    """Audit 129: dissociation_report paired the summary's mass with the effects of any
    ``group`` by router type alone: the every-layer summary beside the early band's
    effects (kimi, 6 layers) ranked older and prev_completed (all-layer mass 0.04 and 0.22
    with this batch; 0.06 and 0.20 with test_plotting's, the numbers of docs/analysis.md),
    which no early router reads, and embedding at 0.49 where the early routers give it
    0.79 (0.73). It now refuses mass of other layers than the group's (the summary's ``layers``),
    and ranks a summary of the group's own layers by its mass."""
    mass, effects = _kimi_six_layer_mass_and_effects("bands")
    overall = summarize_mass(mass, n_bootstrap=40)
    with pytest.raises(
        ValueError,
        match=r"^at router='attn_res', the mass summary's rows paired with group 'early' are "
        r"of layers \[0, 1, 2, 3, 4, 5\] but the effects of group 'early' masked layers "
        r"\[0, 1\]: dissociation_report would",
    ):
        dissociation_report(overall, effects, group="early")
    early = summarize_mass(mass[mass.band == "early"], n_bootstrap=40)
    report = dissociation_report(early, effects, group="early").set_index("router")
    for router in ("attn_res", "mlp_res"):
        rows = mass[(mass.router == router) & (mass.band == "early")]
        read = rows.groupby("family").n_sources.max() > 0
        by_hand = rows.groupby(["family", "prompt"]).mass.mean().groupby("family").mean()
        ranked = sorted(read.index[read], key=lambda f: (-by_hand[f], f))
        assert report.loc[router, "mass_ranking"] == ranked


def test_the_layer_check_reads_a_seed_of_another_kind_in_one_table():
    """Audit 144: require_same_layers keyed the layers by the model columns both tables
    have, so a seed 0 in the summary beside '0' in the effects (one table read back as
    text) matched no key and the layers went unchecked: dissociation_report(every-layer
    summary, group='early') ranked older and prev_completed, which no early router reads,
    as audit 129 refused without seeds. Such a column is now read as one the tables do not
    share: the same refusal, and the early summary's report equals the one without seeds."""
    mass, effects = _kimi_six_layer_mass_and_effects("bands")
    overall = summarize_mass(mass, n_bootstrap=40)
    for key, number, text in (("seed", 0, "0"), ("condition", 1, "1"), ("model", 2, "2")):
        with pytest.raises(
            ValueError,
            match=r"^at router='attn_res', the mass summary's rows paired with group 'early' "
            r"are of layers \[0, 1, 2, 3, 4, 5\] but the effects of group 'early' masked",
        ):
            dissociation_report(
                overall.assign(**{key: number}), effects.assign(**{key: text}), group="early"
            )
    early = summarize_mass(mass[mass.band == "early"], n_bootstrap=40)
    want = dissociation_report(early, effects, group="early")
    got = dissociation_report(early.assign(seed=0), effects.assign(seed="0"), group="early")
    pd.testing.assert_frame_equal(got, want)


def test_dissociation_report_refuses_the_mass_and_effects_of_other_models():
    """Audit 148: dissociation_report paired the rows of the two tables by router and family
    alone, so seed 0's mass beside seed 1's effects (two kimi 6-layer models routed by
    seeds 0 and 1) ranked the MLP routers with spearman 1.0, where seed 0's own effects
    give 0.8. Tables whose model labels (condition / seed / model, where both have the
    column) differ are refused; of one label they give the report without labels."""
    mass, effects = _kimi_six_layer_mass_and_effects("all")
    overall = summarize_mass(mass, n_bootstrap=40)
    for key, mine, other in (("seed", 0, 1), ("condition", "a", "b"), ("model", "x", "y")):
        with pytest.raises(
            ValueError,
            match=rf"^dissociation_report: the rows of mass_summary and effects are paired by "
            rf"model, but mass_summary holds models that effects lacks: "
            rf"\[\{{'{key}': {mine!r}\}}\]",
        ):
            dissociation_report(overall.assign(**{key: mine}), effects.assign(**{key: other}))
        pd.testing.assert_frame_equal(
            dissociation_report(overall.assign(**{key: mine}), effects.assign(**{key: mine})),
            dissociation_report(overall, effects),
        )


def test_dissociation_report_when_mass_and_effect_agree():
    mass = pd.DataFrame(
        {
            "router": ["attn_res"] * 4 + ["mlp_res"] * 4,
            "family": list(FAMILIES) * 2,
            "mass": [0.1, 0.0, 0.3, 0.6, 0.04, 0.5, 0.2, 0.26],
            "ci_low": 0.0,
            "ci_high": 1.0,
            # attn: no router reads "older" (mass 0, no masked routers)
            "family_read": [True, False, True, True] + [True] * 4,
            "layers": BAND_LAYERS["all"],
        }
    )
    effects = pd.DataFrame(
        {
            "router": ["attn_res"] * 4 + ["mlp_res"] * 4,
            "group": "all",
            "layers": BAND_LAYERS["all"],
            "metric": "logit_diff",
            "family": list(FAMILIES) * 2,
            "effect": [-0.1, 0.0, 0.5, -3.0, 0.02, -1.0, 0.3, -0.2],
            "ci_low": [-0.2, 0.0, 0.1, -3.5, -0.01, -1.5, 0.2, -0.3],
            "ci_high": [0.05, 0.0, 0.9, -2.5, 0.05, -0.5, 0.4, 0.1],
            "n_masked_routers": [3, 0, 3, 3, 3, 3, 3, 3],
        }
    )
    report = dissociation_report(mass, effects).set_index("router")
    attn, mlp = report.loc["attn_res"], report.loc["mlp_res"]
    # attn: "older" has neither mass nor masked routers, so it is left out of the ranking
    assert attn.mass_ranking == ["current", "prev_completed", "embedding"]
    assert attn.abs_effect_ranking == ["current", "prev_completed", "embedding"]
    assert attn.top_mass_is_top_abs_effect and attn.spearman == pytest.approx(1.0)
    assert attn.appreciable_mass_no_effect == ["embedding"]  # mass 0.1, interval [-0.2, 0.05]
    assert sum(v["mass"] for v in attn.shares.values()) == pytest.approx(1.0)
    assert sum(v["effect"] for v in attn.shares.values()) == pytest.approx(1.0)
    assert attn.shares["current"]["effect"] == pytest.approx(3.0 / 3.6)
    # mlp: embedding (mass 0.04 < 0.05) has no effect but is not "appreciable"
    assert mlp.mass_ranking == ["older", "current", "prev_completed", "embedding"]
    assert mlp.abs_effect_ranking == ["older", "prev_completed", "current", "embedding"]
    assert mlp.top_mass_is_top_abs_effect
    assert mlp.appreciable_mass_no_effect == ["current"]
    assert mlp.spearman == pytest.approx(0.8)  # ranks (1,4,2,3) vs (1,4,3,2): 1 - 6*2/60


def test_sweep_plan_start_sublayers_and_the_repeated_ablation(setup):
    """Each ablation starts at its first masked sublayer (2 * layer for attention, + 1 for the
    MLP); at the first attention router of a cumulative model ``current`` is still a copy of
    the embedding, so masking either routes the same tensor and the fast sweep runs it once."""
    from hooked_attnres.analysis.effects import _same_routed_source

    model, batch = setup
    plan = plan_ablations(model, groups="layers")
    for ablation in plan:
        if ablation.is_noop:
            assert ablation.start_sublayer is None and ablation.start_layer is None
            continue
        layer = int(ablation.group.split()[1])
        assert ablation.start_layer == layer
        assert ablation.start_sublayer == 2 * layer + (ablation.router == "mlp_res")
    states = model.depth_states(batch.tokens[:6], sublayers=True)
    for sublayer in (0, 1, 2):
        indices = [i for i, a in enumerate(plan) if a.start_sublayer == sublayer]
        same = _same_routed_source(plan, indices, states[sublayer])
        if sublayer == 0:  # [embedding, current] with current == embedding
            names = {(plan[i].family, plan[j].family) for i, j in same.items()}
            assert names == {("current", "embedding")}
        else:  # the MLP router of layer 0 reads embedding + attn_0: different sources
            assert same == {}
    # the repeated ablation's results are the naive loop's
    first = [i for i, a in enumerate(plan) if a.start_sublayer == 0]
    fast = run_ablations(model, batch[:6], [plan[i] for i in first], fast=True, progress=False)
    naive = run_ablations(model, batch[:6], [plan[i] for i in first], fast=False, progress=False)
    np.testing.assert_allclose(fast[1]["logit_diff"], naive[1]["logit_diff"], atol=1e-5)
    np.testing.assert_array_equal(fast[1]["logit_diff"][0], fast[1]["logit_diff"][1])


def test_no_ablation_is_assumed_repeated_under_a_users_hooks(setup):
    """A hook that edits what layer 0's attention router reads makes masking `embedding`
    and masking `current` differ; the fast sweep must then run both."""
    model, batch = setup
    plan = [a for a in plan_ablations(model, groups="layers") if a.start_sublayer == 0]
    assert [a.family for a in plan] == ["embedding", "current"]

    def perturb_current(sources, hook):
        sources = sources.clone()
        sources[..., -1, :] += torch.linspace(-1.0, 1.0, sources.shape[-1])  # not undone by RMSNorm
        return sources

    with model.hooks(fwd_hooks=[("blocks.0.attn_res.hook_sources", perturb_current)]):
        fast = run_ablations(model, batch[:6], plan, fast=True, progress=False)
        naive = run_ablations(model, batch[:6], plan, fast=False, progress=False)
    np.testing.assert_allclose(fast[1]["logit_diff"], naive[1]["logit_diff"], atol=1e-5)
    assert np.abs(naive[1]["logit_diff"][0] - naive[1]["logit_diff"][1]).max() > 1e-3


def test_effects_match_an_independent_mask_sources_run_and_lie_inside_their_interval(setup):
    """effect/ci of one row recomputed from mask_sources + run_with_hooks and numpy."""
    from hooked_attnres.interventions import mask_sources

    model, batch = setup
    effects = ablation_effects(
        model,
        batch,
        families=["embedding", "current"],
        routers="mlp_res",
        groups={"early": [1, 2]},
        metrics=("logit_diff",),
        n_bootstrap=400,
        progress=False,
    )
    assert set(effects.router) == {"mlp_res"} and set(effects.family) == {"embedding", "current"}
    with torch.no_grad():
        clean = batch.logit_diff(model(batch.tokens)).numpy()
        for family in ("embedding", "current"):
            hooks = mask_sources(model, family, routers="mlp_res", layers=[1, 2])
            ablated = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=hooks)).numpy()
            row = effects[effects.family == family].iloc[0]
            assert row.effect == pytest.approx(float(np.mean(ablated - clean)), abs=1e-5)
            assert row.clean == pytest.approx(float(clean.mean()), abs=1e-5)
            assert row.ci_low <= row.effect <= row.ci_high
            # a percentile bootstrap interval of a mean is about +-1.96 standard errors wide
            standard_error = np.std(ablated - clean, ddof=1) / np.sqrt(len(clean))
            assert (row.ci_high - row.ci_low) == pytest.approx(2 * 1.96 * standard_error, rel=0.3)


def test_fast_sweep_equals_naive_sweep_in_the_full_layout():
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=len(tokenizer),
        n_ctx=32,
        attnres_layout="full",
        attnres_recency_bias=0.5,
        seed=0,
    )
    model = randomize_routing(HookedAttnRes(cfg, tokenizer=tokenizer), seed=3).eval()
    batch = TASK.sample(6, seed=4, split="test", vocab=tokenizer.get_vocab())
    plan = plan_ablations(model, routers=("attn_res", "mlp_res", "final_res"), groups="layers")
    fast = run_ablations(model, batch, plan, metrics=("logit_diff",), fast=True, progress=False)
    naive = run_ablations(model, batch, plan, metrics=("logit_diff",), fast=False, progress=False)
    np.testing.assert_allclose(fast[1]["logit_diff"], naive[1]["logit_diff"], atol=1e-5)
    assert np.abs(naive[1]["logit_diff"] - naive[0]["logit_diff"][None]).max() > 1e-3


def test_single_router_and_family_may_be_bare_and_bad_ones_are_named(setup):
    model, batch = setup
    bare = plan_ablations(model, families="embedding", routers="mlp_res", groups="all")
    listed = plan_ablations(model, families=["embedding"], routers=["mlp_res"], groups="all")
    assert bare == listed and len(bare) == 1
    with pytest.raises(ValueError, match=r"router must be one of \(.*\), got 'attn'"):
        plan_ablations(model, routers=["attn"])
    with pytest.raises(ValueError, match="unknown source 'embeddings'"):
        plan_ablations(model, families="embeddings")


def test_a_sweep_without_cells_or_with_ignored_bands_is_refused(setup):
    """An empty selection gave an empty table (ablation_effects) or a misleading error
    (attribute_routing), and bands= with groups other than 'bands' was ignored silently."""
    from hooked_attnres.analysis import attribute_routing

    model, batch = setup
    empty = [
        (dict(groups={}), "groups={} names no layer group"),
        (dict(bands={}), "bands={} names no band"),
        (dict(families=[]), "families is empty"),
        (dict(routers=[]), "routers is empty"),
        (dict(metrics=[]), "metrics is empty"),
        (dict(groups="layers", bands={"a": [0]}), "bands= applies to groups='bands' only"),
        (dict(groups={"x": [1]}, bands={"a": [0]}), "bands= applies to groups='bands' only"),
    ]
    for kwargs, message in empty:
        with pytest.raises(ValueError, match=re.escape(message)):
            ablation_effects(model, batch, progress=False, **kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            attribute_routing(model, batch, progress=False, **kwargs)
    plan = plan_ablations(model, families="current", groups="bands", bands={"a": [0, 1]})
    assert {cell.group for cell in plan} == {"a"}


def test_a_repeated_family_router_metric_or_method_is_refused(setup):
    """``families=["embedding", "embedding"]`` (or a router, metric or method given twice)
    gave every cell twice, silently (the table had twice the rows, and verify_top exact
    rows twice). Refused by the one selection check, also in the patching sweeps, whose
    result had a repeated router row."""
    from hooked_attnres.analysis import attribute_routing, attribution_patch_routing_weights
    from hooked_attnres.interventions import set_weights
    from hooked_attnres.patching import get_act_patch_routing_weights

    model, batch = setup
    repeated = [
        (dict(families=["embedding", "current", "embedding"]), r"families repeats \['embedding'\]"),
        (dict(routers=["mlp_res", "mlp_res"]), r"routers repeats \['mlp_res'\]"),
        (dict(metrics=["logprob", "logprob"]), r"metrics repeats \['logprob'\]"),
    ]
    for kwargs, message in repeated:
        with pytest.raises(ValueError, match=message):
            ablation_effects(model, batch, progress=False, **kwargs)
        with pytest.raises(ValueError, match=message):
            attribute_routing(model, batch, progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"families repeats \[0\]"):
        plan_ablations(model, families=[0, 0])
    with pytest.raises(ValueError, match=r"method repeats \['linear'\]"):
        attribute_routing(model, batch, method=["linear", "norm", "linear"], progress=False)
    tokens = batch.tokens[:2]
    _, cache = model.run_with_cache(tokens)

    def metric(logits):
        return logits[:, -1, 0].sum()

    for sweep in (get_act_patch_routing_weights, attribution_patch_routing_weights):
        with pytest.raises(ValueError, match=r"routers repeats \['attn_res'\]"):
            sweep(model, tokens, cache, metric, routers=["attn_res", "attn_res"])
        with pytest.raises(ValueError, match="routers is empty"):  # an empty result before
            sweep(model, tokens, cache, metric, routers=[])
    with pytest.raises(ValueError, match="routers is empty: it selects no router"):
        set_weights(model, "uniform", routers=[])  # no hook at all before
    # given once each, the same calls run
    table = ablation_effects(
        model,
        batch,
        families=["embedding", "current"],
        routers="mlp_res",
        groups="all",
        metrics=["logprob"],
        n_bootstrap=10,
        progress=False,
    )
    assert list(table.family) == ["embedding", "current"]


def test_fast_sweep_refuses_to_mask_everything_together_with_user_hooks(setup):
    from hooked_attnres.interventions import mask_sources

    model, batch = setup
    plan = plan_ablations(model, families="current", routers="attn_res", groups={"l3": [3]})
    user = mask_sources(
        model, ["embedding", "older", "prev_completed"], routers="attn_res", layers=3
    )
    with model.hooks(fwd_hooks=user):
        with pytest.raises(
            ValueError,
            match="blocks.3.attn_res.hook_logits: together with earlier hooks on this router",
        ):
            run_ablations(model, batch, plan, progress=False)


def test_mass_positions_out_of_range_are_named(setup):
    model, batch = setup
    n_pos = batch.tokens.shape[1]
    with pytest.raises(
        ValueError, match=rf"positions \[0, {n_pos}\] must be integers in \[-{n_pos}, {n_pos}\)"
    ):
        routing_mass(model, batch, positions=[0, n_pos])
    with pytest.raises(ValueError, match="positions is empty"):
        routing_mass(model, batch, positions=[])
    table = routing_mass(model, batch, positions=[-1])
    np.testing.assert_allclose(
        table.groupby(["prompt", "router", "layer"]).mass.sum(), 1.0, atol=1e-5
    )
    # a position twice (also as p and p - n_pos) counted twice in the mean (0.17 mass off
    # for [1, 1, 2], kimi): refused, showing the positions as written (the message showed
    # [1, 1, 2] for [1, 1 - n_pos, 2]); the mean over distinct positions is the cache's
    for repeated in ([1, 1, 2], [1, 1 - n_pos, 2]):
        read = [p % n_pos for p in repeated]
        shown = re.escape(str(repeated) + ("" if read == repeated else f", read as {read}"))
        with pytest.raises(ValueError, match=rf"positions repeats \[1\] \(got {shown}\):"):
            routing_mass(model, batch, positions=repeated)
    _, cache = model.run_with_cache(batch.tokens)
    site = model.site(2, "attn_res")
    weights = cache[site.hook("weights")][:, [1, 2]].mean(dim=1)  # [batch, n_sources]
    families = model.routing_layout.families(site)
    table = routing_mass(model, batch, positions=[1, 2])
    rows = table[(table.router == "attn_res") & (table.layer == 2)]
    for family in FAMILIES:
        expected = weights[:, families[family]].sum(-1).numpy() if families[family] else 0.0
        got = rows[rows.family == family].sort_values("prompt").mass.to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_dissociation_report_refuses_ambiguous_tables():
    mass = pd.DataFrame(
        {
            "router": ["mlp_res"] * 8,
            "band": ["early"] * 4 + ["late"] * 4,
            "family": list(FAMILIES) * 2,
            "mass": 0.25,
            "ci_low": 0.0,
            "ci_high": 1.0,
        }
    )
    effects = pd.DataFrame(
        {
            "router": ["mlp_res"] * 4,
            "group": "all",
            "metric": "logit_diff",
            "family": list(FAMILIES),
            "effect": -1.0,
            "ci_low": -2.0,
            "ci_high": -0.5,
            "n_masked_routers": 2,
        }
    )
    with pytest.raises(
        ValueError, match="mass_summary has several rows for router='mlp_res', family='embedding'"
    ):
        dissociation_report(mass, effects)


def test_dissociation_report_refuses_effects_without_a_family():
    """Audit finding: a family missing from the effects (e.g. ``ablation_effects(...,
    families=(...))`` without ``current``) dropped out of the rankings silently: the top-mass
    family read ``embedding`` (mass 0.2) though ``current`` has 0.55, and "one family is on
    top of both" flipped to True (Spearman 0.0 -> 0.5)."""
    mass, effects = _handmade_dissociation_tables()  # current has the most mass
    report = dissociation_report(mass, effects).iloc[0]
    assert report.top_mass == "current" and not report.top_mass_is_top_abs_effect
    with pytest.raises(
        ValueError,
        match=re.escape("effects lacks the (router, family) rows [('mlp_res', 'current')]"),
    ):
        dissociation_report(mass, effects[effects.family != "current"])


def test_dissociation_report_refuses_effects_of_a_router_type_the_mass_lacks():
    """Audit 196: the report ranked the router types both tables have, so the effects of a
    router type the mass summary lacks (attention here, beside the MLP mass only) dropped
    out of it without a word: one row, mlp_res, where the effects measured two router
    types. Refused naming the router type and the table that lacks it, as the figures
    refuse an effect without a mass row; the mass of a router type without effects (the
    final router's beside group ``all``, which never masks it) is not compared: the
    effects choose the router types, one row each."""
    mass, effects = _handmade_dissociation_tables()
    attention = effects.assign(router="attn_res", effect=effects.effect[::-1].to_numpy())
    both = pd.concat([effects, attention], ignore_index=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "dissociation_report: the effects hold the router type(s) ['attn_res'], which "
            "mass_summary lacks"
        ),
    ):
        dissociation_report(mass, both)
    # with the attention mass too, one row per router type of the effects
    attention_mass = mass.assign(router="attn_res")
    report = dissociation_report(pd.concat([mass, attention_mass]), both)
    assert list(report.router) == ["attn_res", "mlp_res"]
    # mass of a router type the effects lack: the effects' router types, one row each
    final = mass.assign(router="final_res")
    report = dissociation_report(pd.concat([mass, final]), effects)
    assert list(report.router) == ["mlp_res"]
    mine = dissociation_report(mass, effects)
    pd.testing.assert_frame_equal(report, mine)


def test_dissociation_report_refuses_an_appreciable_mass_that_is_no_number():
    """Audit finding: ``appreciable_mass=nan`` (or ``True``, read as 1) compared false with
    every mass, so no family was listed as carrying appreciable mass without effect."""
    mass = pd.DataFrame(
        {"router": "mlp_res", "family": list(FAMILIES), "mass": 0.25, "ci_low": 0.0}
    ).assign(ci_high=1.0, family_read=True, layers=BAND_LAYERS["all"])
    effects = pd.DataFrame(
        {
            "router": "mlp_res",
            "group": "all",
            "layers": BAND_LAYERS["all"],
            "metric": "logit_diff",
            "family": list(FAMILIES),
            "effect": 0.0,
            "ci_low": -0.1,
            "ci_high": 0.1,
            "n_masked_routers": 2,
        }
    )
    row = dissociation_report(mass, effects, appreciable_mass=0.05).iloc[0]
    assert row.appreciable_mass_no_effect == list(FAMILIES)  # 0.25 >= 0.05, 0 in [-0.1, 0.1]
    # every effect 0: no total |effect| to share, and a constant ranking has no correlation
    assert all(math.isnan(share["effect"]) for share in row.shares.values())
    assert all(share["mass"] == 0.25 for share in row.shares.values())
    assert math.isnan(row.spearman)
    for bad in (float("nan"), True, None):
        with pytest.raises(ValueError, match="appreciable_mass must be a finite number"):
            dissociation_report(mass, effects, appreciable_mass=bad)


def test_seed_and_patching_figures_show_the_tables_numbers():
    import pandas as pd

    rows = []
    for condition, clean in (("a", 10.0), ("b", 4.0)):
        for seed in (0, 1):
            for group in ("early", "middle", "late", "all"):
                for family in FAMILIES:
                    effect = -(seed + 1) * (FAMILIES.index(family) + 1) / 10
                    rows.append(
                        dict(
                            condition=condition,
                            seed=seed,
                            router="mlp_res",
                            group=group,
                            layers=BAND_LAYERS[group],
                            family=family,
                            metric="logit_diff",
                            clean=clean,
                            effect=effect,
                            ci_low=effect - 0.05,
                            ci_high=effect + 0.05,
                            n_masked_routers=1,
                        )
                    )
    effects = pd.DataFrame(rows)
    fig = plotting.effects_by_seed(effects, "older", ["mlp_res"])
    assert len(fig.data) == 4  # 2 conditions x 2 seeds
    for trace in fig.data:
        condition = trace.hovertemplate.split("<extra>")[1].removesuffix("</extra>")
        seed = int(trace.name.split()[1])
        clean = 10.0 if condition == "a" else 4.0
        assert list(trace.y) == pytest.approx([100 * -(seed + 1) * 2 / 10 / clean] * 3)
    assert fig.layout.yaxis2.matches == "y"  # one y-axis for every panel
    mass = pd.DataFrame(
        [
            dict(
                condition=c,
                seed=s,
                router="mlp_res",
                band="all",
                family=f,
                mass=0.25,
                ci_low=0.2,
                ci_high=0.3,
                family_read=True,
                layers=BAND_LAYERS["all"],
            )
            for c in ("a", "b")
            for s in (0, 1)
            for f in FAMILIES
        ]
    )
    fig = plotting.mass_effect_by_seed(mass, effects, "mlp_res")
    assert len(fig.data) == 8 and list(fig.data[0].y) == pytest.approx([0.25] * 4)
    assert list(fig.data[1].y) == pytest.approx([100 * -k / 10 / 10.0 for k in (1, 2, 3, 4)])
    tiny = np.array([[1e-4, -3e-4], [np.nan, 2e-4]])
    heat = plotting.patching_heatmap(tiny, ["l0", "l1"], ["p0", "p1"], title="patching")
    assert (heat.data[0].zmin, heat.data[0].zmax) == pytest.approx((-3e-4, 3e-4))
    assert heat.data[0].text[1][0] == ""  # missing: blank
    with pytest.raises(ValueError, match=r"values must be \[rows, columns\] = \[2, 3\]"):
        plotting.patching_heatmap(tiny, ["l0", "l1"], ["p0", "p1", "p2"], title="x")


def test_a_users_position_hook_after_the_last_attention_sees_every_position(setup):
    """A surrounding hook that edits position 0 of the last layer's MLP output: the sweep
    must give what plain hooked forward passes give (the fast path would show that hook
    the answer position alone, as its position 0), so with hooks attached it runs the
    reference loop; checked against mask_sources + run_with_hooks, computed here."""
    from hooked_attnres.interventions import mask_sources

    model, batch = setup
    batch = batch[:6]
    last = model.cfg.n_layers - 1

    def zero_position_0(x, hook):
        x = x.clone()
        x[:, 0] = 0.0
        return x

    user = [(f"blocks.{last}.hook_mlp_out", zero_position_0)]
    families = ["embedding", "current"]
    with model.hooks(fwd_hooks=user):
        effects = ablation_effects(
            model,
            batch,
            families=families,
            groups="all",
            metrics=("logit_diff",),
            n_bootstrap=20,
            progress=False,
        ).set_index(["router", "family"])
    with torch.no_grad():
        clean = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=user)).numpy()
        # the hook edits a position the metric does not read; at the answer position
        # (what the fast path's logit_positions would show it as position 0) it matters
        answer_pos = batch.answer_pos

        def zero_answer(x, hook):
            x = x.clone()
            x[torch.arange(len(x)), answer_pos] = 0.0
            return x

        at_answer = [(f"blocks.{last}.hook_mlp_out", zero_answer)]
        moved = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=at_answer))
        assert np.abs(moved.numpy() - clean).max() > 1e-3
        for router in ("attn_res", "mlp_res"):
            for family in families:
                hooks = user + mask_sources(model, family, routers=router)
                ablated = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=hooks))
                row = effects.loc[(router, family)]
                assert row.clean == pytest.approx(float(clean.mean()), abs=1e-5)
                assert row.effect == pytest.approx(
                    float(np.mean(ablated.numpy() - clean)), abs=1e-5
                )


def test_a_callable_metric_that_reads_other_positions_gets_full_passes(setup, monkeypatch):
    """The fast sweep computes logits at the answer positions only; a callable metric that
    reads another position (the one before the answer, or the last one of right-padded
    prompts) used to read the answer position there instead, silently (0.37 off on a
    kimi model). It now runs full passes: checked against a hand-written -inf hook on
    hook_logits and the metric on whole-sequence logits."""
    model, batch = setup
    n_pos = batch.tokens.shape[1]
    batch = batch[:6]
    batch.answer_pos = torch.tensor([n_pos - 1, n_pos - 2, n_pos - 3, n_pos - 1, 3, n_pos - 2])

    def before_answer(b, logits):
        return logits[torch.arange(len(b)), b.answer_pos - 1, b.answer]

    def at_last(b, logits):
        return logits[torch.arange(len(b)), -1, b.answer]

    def at_answer(b, logits):
        return logits[torch.arange(len(b)), b.answer_pos, b.answer]

    layout = model.routing_layout
    plan = plan_ablations(model, families=["embedding", "current"], groups="layers")
    checked = [i for i, cell in enumerate(plan) if not cell.is_noop][::3]
    for metric in (before_answer, at_last, at_answer):
        clean, ablated = run_ablations(model, batch, plan, [metric], progress=False)
        with torch.no_grad():
            assert clean[metric] == pytest.approx(metric(batch, model(batch.tokens)).numpy())
            for i in checked:
                cell, hooks = plan[i], []
                for site in model.sites(cell.router):
                    indices = layout.families(site)[cell.family]
                    if site.layer in cell.layers and 0 < len(indices) < layout.n_sources(site):

                        def mask(logits, hook, indices=indices):
                            return logits.index_fill(-1, torch.tensor(indices), float("-inf"))

                        hooks.append((site.hook("logits"), mask))
                expected = metric(batch, model.run_with_hooks(batch.tokens, fwd_hooks=hooks))
                assert ablated[metric][i] == pytest.approx(expected.numpy(), abs=1e-5)
    # a metric that reads the answer position keeps the fast path
    calls = []
    original = model.forward_from
    monkeypatch.setattr(model, "forward_from", lambda *a, **k: calls.append(1) or original(*a, **k))
    run_ablations(model, batch, plan, [at_answer], progress=False)
    assert calls
    calls.clear()
    run_ablations(model, batch, plan, [at_answer, at_last], progress=False)
    assert not calls


def test_the_metric_probe_sees_every_answer_position(setup):
    """The prompts that answer before the end come after the first eight: the probe of a
    callable metric still tries one of them (a metric reading the last position reads
    the answer position for the first ten prompts only)."""
    model, batch = setup
    n_pos = batch.tokens.shape[1]
    batch = batch[:12]
    batch.answer_pos = torch.tensor([n_pos - 1] * 10 + [n_pos - 3, n_pos - 2])

    def at_last(b, logits):
        return logits[torch.arange(len(b)), -1, b.answer]

    plan = plan_ablations(model, families=["current"], routers="mlp_res", groups="all")
    fast = run_ablations(model, batch, plan, [at_last], progress=False)
    full = run_ablations(model, batch, plan, [at_last], fast=False, progress=False)
    with torch.no_grad():
        np.testing.assert_allclose(fast[0][at_last], at_last(batch, model(batch.tokens)), atol=1e-6)
    np.testing.assert_allclose(fast[1][at_last], full[1][at_last], atol=1e-6)


def _padding_test_model(name: str, dtype: torch.dtype = torch.float32) -> HookedAttnRes:
    if name in ("recency", "exact"):
        hf = hf_qwen3(num_hidden_layers=4)
        model = HookedAttnRes.from_hf_qwen3(hf, wrap=name, num_blocks=2, dtype=dtype)
    else:
        model = tiny_model(attnres_layout=name, dtype=dtype)
    return randomize_routing(model, seed=1).eval()  # routing that depends on the content


@pytest.mark.parametrize("name", ["kimi", "cumulative", "full", "recency", "exact"])
def test_routing_mass_of_a_right_padded_task_batch_reads_real_positions_only(name):
    """A TaskBatch's answer_pos is each prompt's last real position (right padding after
    it). positions="all" averages each prompt's real positions (independent: each prompt
    run alone, unpadded); before, it averaged the padding in as well. A position list
    reaching past a prompt's answer_pos reads padding and is refused. Every routed layout
    and wrap (layout "none" has no routers and is refused, below)."""
    model = _padding_test_model(name)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 8), generator=generator)
    lengths = torch.tensor([8, 5, 3, 8])
    tokens[torch.arange(8) >= lengths[:, None]] = 1  # right padding
    zeros = torch.zeros(4, dtype=torch.long)
    batch = TaskBatch(
        tokens=tokens,
        answer_pos=lengths - 1,
        answer=zeros,
        contrast=zeros,
        corrupted_tokens=tokens.clone(),
        targets=torch.full_like(tokens, -100),
    )
    mass = routing_mass(model, batch, positions="all", chunk=3)
    for row, length in enumerate(lengths.tolist()):
        _, cache = model.run_with_cache(tokens[row : row + 1, :length])
        for site in model.sites():
            w = cache[site.hook("weights")][0].mean(0)
            for family, indices in model.routing_layout.families(site).items():
                expected = float(w[indices].sum()) if indices else 0.0
                got = mass[
                    (mass.prompt == row)
                    & (mass.router == site.kind)
                    & (mass.layer == site.table_layer)
                    & (mass.family == family)
                ].mass
                assert float(got.iloc[0]) == pytest.approx(expected, abs=1e-6), (row, site)
    # the token input has no padding information: a plain mean over every position
    plain = routing_mass(model, tokens, positions="all")
    assert not np.allclose(plain.mass, mass.mass, atol=1e-3)
    # positions inside every prompt are read as given; past an answer_pos they are refused
    routing_mass(model, batch, positions=[0, 2])
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1, 2\] .*right padding"):
        routing_mass(model, batch, positions=[-1])
    with pytest.raises(ValueError, match="routers"):
        routing_mass(tiny_model(attnres_layout="none"), batch, positions="all")


def _mass_alone(model: HookedAttnRes, tokens: torch.Tensor, at) -> dict:
    """The family masses of one unpadded prompt ``tokens`` ``[pos]``, by hand from its own
    cache: ``{(router, layer, family): mass}`` at position ``at`` (an index of its tokens)
    or, for ``"all"``, averaged over its positions."""
    _, cache = model.run_with_cache(tokens[None])
    out = {}
    for site in model.sites():
        w = cache[site.hook("weights")][0]  # [pos, n_sources]
        w = w.mean(0) if at == "all" else w[at]
        for family, indices in model.routing_layout.families(site).items():
            out[(site.kind, site.table_layer, family)] = float(w[indices].sum()) if indices else 0.0
    return out


@pytest.mark.parametrize("name", ["kimi", "cumulative", "full", "recency", "exact"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_routing_mass_of_padded_tokens_with_an_attention_mask_is_each_prompt_alone(name, side):
    """Audit 96: routing_mass took no attention_mask, so padded token ids were run and
    averaged as real tokens, silently (a warning only for a model with a left-padding
    tokenizer): left padding was attended and shifted the rotary positions, 1.00 mass off
    each prompt alone at its last real token (kimi, full; 0.56 cumulative, 0.78 / 1.00
    the recency / exact wraps, float64), and "all" averaged the padding in (0.60-1.00;
    0.26-0.71 with right padding).
    With attention_mask= the prompts are run with it and the padding is never read: every
    prompt's masses equal those of the prompt run alone, unpadded (by hand from its
    cache), position by position ("answer" at a column of the padded tokens, a position
    list) and over its real positions ("all"), in float64; positions reading padding are
    refused, and summarize_mass of the table is the mean of the prompts' own masses."""
    model = _padding_test_model(name, torch.float64)
    n_pos, lengths = 7, [7, 4, 2]
    prompts = torch.randint(3, 40, (3, n_pos), generator=torch.Generator().manual_seed(0))
    tokens, mask = torch.ones_like(prompts), torch.zeros_like(prompts)  # token 1 pads
    for row, length in enumerate(lengths):
        real = slice(n_pos - length, n_pos) if side == "left" else slice(0, length)
        tokens[row, real], mask[row, real] = prompts[row, :length], 1
    alone = [
        {at: _mass_alone(model, prompts[row, :length], at) for at in ("all", 0, length - 1)}
        for row, length in enumerate(lengths)
    ]
    first = torch.tensor([n_pos - n if side == "left" else 0 for n in lengths])  # columns
    last = torch.tensor([n_pos - 1 if side == "left" else n - 1 for n in lengths])
    tables = {
        "all": routing_mass(model, tokens, positions="all", attention_mask=mask, chunk=2),
        0: routing_mass(model, tokens, answer_pos=first, attention_mask=mask),
        "last": routing_mass(model, tokens, answer_pos=last, attention_mask=mask, chunk=2),
    }
    if side == "left":  # the last column is every prompt's last real token
        tables["[-1]"] = routing_mass(model, tokens, positions=[-1], attention_mask=mask)
    for key, table in tables.items():
        for row, length in enumerate(lengths):
            expected = alone[row]["all" if key == "all" else 0 if key == 0 else length - 1]
            got = table[table.prompt == row]
            assert len(got) == len(expected)
            for r in got.itertuples():
                assert r.mass == pytest.approx(expected[(r.router, r.layer, r.family)], abs=1e-12)
    # the mean over prompts of each prompt's mean over a router type's layers
    summary = summarize_mass(tables["all"], n_bootstrap=40).set_index(["router", "family"])
    for (router, family), row in summary.iterrows():
        means = [
            np.mean([v for (k, _, f), v in prompt["all"].items() if k == router and f == family])
            for prompt in alone
        ]
        assert row.mass == pytest.approx(np.mean(means), abs=1e-12)
        assert row.n_prompts == 3
    # a position list reading padding of some prompt, or an answer_pos at padding: refused
    padding_of_1 = 0 if side == "left" else n_pos - 1  # prompts 1 and 2 pad there
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1, 2\] at padding \(padding "):
        routing_mass(model, tokens, positions=[padding_of_1], attention_mask=mask)
    moved = last.clone()
    moved[2] = padding_of_1
    with pytest.raises(ValueError, match=r"prompt\(s\) \[2\], into their padding"):
        routing_mass(model, tokens, answer_pos=moved, attention_mask=mask)


def test_routing_mass_attention_mask_is_checked_and_refused_with_a_task_batch():
    """Audit 96: the mask is checked as the model checks it, and a TaskBatch (whose padding
    is the right padding after answer_pos) refuses one, saying what to pass instead; the
    padding's routing never enters "all", even when a hook wrote nan there."""
    from helpers import nan_at_padding

    model = _padding_test_model("kimi")
    tokens = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="shape of the tokens"):
        routing_mass(model, tokens, positions="all", attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] are all zero"):
        routing_mass(model, tokens, positions="all", attention_mask=mask * torch.tensor([[0], [1]]))
    zeros = torch.zeros(2, dtype=torch.long)
    batch = TaskBatch(
        tokens, zeros + 4, zeros, zeros, tokens.clone(), torch.full_like(tokens, -100)
    )
    with pytest.raises(ValueError, match=r"TaskBatch has none.*batch\.tokens, answer_pos="):
        routing_mass(model, batch, attention_mask=mask)
    with pytest.raises(ValueError, match="routers"):  # layout none: nothing to route
        routing_mass(tiny_model(attnres_layout="none"), tokens, "all", attention_mask=mask)
    clean = routing_mass(model, tokens, positions="all", attention_mask=mask)
    with model.hooks(fwd_hooks=[nan_at_padding(mask)]):
        edited = routing_mass(model, tokens, positions="all", attention_mask=mask)
    np.testing.assert_allclose(edited.mass, clean.mass, atol=1e-6)
    alone = _mass_alone(model, tokens[0, 2:], "all")
    for r in clean[clean.prompt == 0].itertuples():
        assert r.mass == pytest.approx(alone[(r.router, r.layer, r.family)], abs=1e-5)


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "exact"])
def test_routing_mass_of_an_eps_zero_zero_pad_batch_with_its_mask_is_finite(layout):
    """Audit 96: a right-padded batch whose pad token has a zero embedding, in an eps = 0
    model, is nan at every real position when run without a mask (docs/analysis.md); run
    through routing_mass with its attention_mask (the tokens of a TaskBatch, which takes
    none), its masses are finite and equal to the short prompt's alone, unpadded."""
    model = _eps_zero_padded_model(layout)
    generator = torch.Generator().manual_seed(1)
    long = torch.randint(1, model.cfg.d_vocab, (6,), generator=generator)
    short = torch.randint(1, model.cfg.d_vocab, (3,), generator=generator)
    tokens = torch.stack([long, torch.cat([short, torch.zeros(3, dtype=torch.long)])])
    mask = (torch.arange(6) < torch.tensor([6, 3])[:, None]).long()
    answer_pos = torch.tensor([5, 2])
    assert routing_mass(model, tokens, answer_pos=answer_pos).mass.isna().any()  # unmasked
    mass = routing_mass(model, tokens, answer_pos=answer_pos, attention_mask=mask)
    assert not mass.mass.isna().any()
    expected = _mass_alone(model, short, 2)
    for r in mass[mass.prompt == 1].itertuples():
        assert r.mass == pytest.approx(expected[(r.router, r.layer, r.family)], abs=1e-12)


def test_summarize_mass_refuses_the_nan_of_a_float16_overflow():
    """Audit finding (low precision): a float16 forward pass that overflows at one prompt
    gives NaN routing weights, and summarize_mass's pandas mean over the routers of a group
    skipped them: the router type's mass came out finite, averaged over the layers that
    happened not to overflow (here prompt 1's attn_res 'current' read 0.0 from layer 0
    alone, layers 1-3 NaN, and the summary over prompts 0.249)."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    model = model.to(torch.float16)
    with torch.no_grad():
        model.embed.W_E[7] *= 1e7  # past float16's 65504: an inf embedding
    tokens = torch.randint(8, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    tokens[1, 5] = 7
    mass = routing_mass(model, tokens, positions="all")
    nan_rows = mass[mass.mass.isna()]
    assert len(nan_rows) and set(nan_rows.prompt) == {1}  # only the overflowing prompt
    # a group with a NaN layer and a finite one: the mean over it has no value
    group = mass[(mass.router == "attn_res") & (mass.family == "current") & (mass.prompt == 1)]
    assert group.mass.isna().any() and group.mass.notna().any()
    found = rf"{len(nan_rows)} non-finite mass .*first: prompt=1, router='attn_res'"
    with pytest.raises(ValueError, match=found):
        summarize_mass(mass, n_bootstrap=20)
    # the other prompts summarise as before
    finite = summarize_mass(mass[mass.prompt != 1], n_bootstrap=20)
    assert np.isfinite(finite.mass).all()


def test_a_bootstrap_row_with_an_infinite_value_has_no_interval():
    """Audit finding: a row holding +inf gave ``(inf, -0.18, nan)``: the resamples that
    miss the infinite prompt (about (1 - 1/n)^n = 36 % of them) are finite, so the lower
    percentile was a finite number, an interval bound for an infinite mean."""
    rng = np.random.default_rng(1)
    finite = rng.normal(size=40)
    for bad in (np.inf, -np.inf, np.nan):
        row = finite.copy()
        row[3] = bad
        with pytest.warns(RuntimeWarning, match=r"row\(s\) \[0\] .*NaN or infinite"):
            mean, low, high = bootstrap_ci_rows(np.vstack([row, finite]), 300, seed=2)
        assert np.isnan(low[0]) and np.isnan(high[0])
        assert mean[0] == row.mean() or (np.isnan(mean[0]) and np.isnan(row.mean()))
        # the finite row keeps its interval: the resamples depend on n and the seed only
        assert (mean[1], low[1], high[1]) == pytest.approx(bootstrap_ci(finite, 300, seed=2))
    row = finite.copy()
    row[[3, 5]] = [np.inf, -np.inf]  # inf - inf: no mean either
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        assert np.isnan(bootstrap_ci(row)).all()


def test_patching_heatmap_keeps_repeated_labels_apart_and_refuses_infinite_or_empty():
    # a retrieval prompt repeats the queried key: plotly drew both columns in one category,
    # so the query position's column vanished and its values showed at the stored key's
    values = np.array([[1.0, -2.0, 3.0, -4.0], [0.5, 0.25, -0.5, 0.75]])
    tokens = ["<bos>", "k3", "v1", "k3"]
    heat = plotting.patching_heatmap(values, ["l0", "l0"], tokens, title="t").data[0]
    assert len(set(heat.x)) == len(tokens) and len(set(heat.y)) == 2  # one category each
    for j, label in enumerate(heat.x):
        assert label.startswith(tokens[j])
        assert list(np.asarray(heat.z)[:, j]) == list(values[:, j])
    assert list(heat.x) == ["<bos>", "k3 (1)", "v1", "k3 (3)"]
    with pytest.raises(ValueError, match=r"infinite value \(first at \(0, 1\)\)"):
        plotting.patching_heatmap([[0.0, np.inf]], ["l0"], ["a", "b"], title="t")
    with pytest.raises(ValueError, match="all NaN"):
        plotting.patching_heatmap([[np.nan, np.nan]], ["l0"], ["a", "b"], title="t")


def test_routing_heatmap_refuses_nan_and_missing_routers_and_labels_the_final_router():
    model = randomize_routing(tiny_model(attnres_layout="kimi"))
    mass = routing_mass(model, torch.randint(0, 50, (3, 7)), positions="all")
    fig = plotting.routing_heatmap(mass, routers=["attn_res", "final_res"])
    final = fig.data[1]
    assert list(final.y) == ["final"]  # was "layer -1"
    read = model.routing_layout.families(model.site(None, "final_res"))
    for j, family in enumerate(FAMILIES):
        expected = mass[(mass.router == "final_res") & (mass.family == family)].mass.mean()
        assert final.z[0][j] == pytest.approx(expected if read[family] else np.nan, nan_ok=True)
    # a NaN mass dropped out of the mean: the cell showed the other prompts' mean
    broken = mass.copy()
    broken.loc[broken.index[0], "mass"] = np.nan
    with pytest.raises(ValueError, match="1 non-finite mass value.*the routing heatmap"):
        plotting.routing_heatmap(broken)
    with pytest.raises(ValueError, match="mass has no rows"):
        plotting.routing_heatmap(mass.iloc[:0])
    with pytest.raises(ValueError, match=r"mass lacks the column\(s\) \['family'\]"):
        plotting.routing_heatmap(mass.drop(columns="family"))
    with pytest.raises(ValueError, match=r"no rows of router\(s\) \['attn'\]"):
        plotting.routing_heatmap(mass, routers=["attn"])
    with pytest.raises(ValueError, match="no sublayer router rows"):
        plotting.routing_heatmap(mass[mass.router == "final_res"])


def test_source_heatmap_refuses_non_finite_weights_and_other_positions():
    model = randomize_routing(tiny_model(attnres_layout="kimi"))
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match="positions must be 'all' or one position"):
        plotting.source_heatmap(model, cache, positions="answer")
    name = "blocks.1.attn_res.hook_weights"
    cache.cache_dict[name] = cache[name].clone()
    cache.cache_dict[name][0, 0, 0] = float("nan")  # drawn blank, as if the source were absent
    with pytest.raises(ValueError, match="attn_res layer 1 hold NaN or infinite"):
        plotting.source_heatmap(model, cache)


def _whiskers(fig) -> list[tuple[float, float]]:
    """Every drawn whisker's ``(bottom, top)``: plotly draws it from ``y - arrayminus`` to
    ``y + array`` whatever their signs."""
    out = []
    for trace in fig.data:
        error = trace.error_y
        if error is None or error.array is None:
            continue
        for y, up, down in zip(trace.y, error.array, error.arrayminus, strict=True):
            out.append((float(y) - float(down), float(y) + float(up)))
    return out


def test_an_estimate_outside_its_interval_is_drawn_with_the_interval():
    """A percentile bootstrap interval may exclude the mean (e.g. with few resamples):
    such rows were refused as if the bounds were swapped (a study with ``--bootstrap 10``
    failed in its figures after every model had run), and the scatter's |effect| whisker
    was clipped at the point (drawn from the estimate instead of the interval's bound).
    The whiskers now span exactly ``[ci_low, ci_high]`` (the plotted unit: percent of the
    clean logit difference in the bars and bands, |effect| in the scatter)."""
    mass, effects = _plot_tables(bands=("all",))
    mass = mass.drop(columns=["seed", "band"])
    effects = effects.drop(columns="seed")
    row = effects.index[(effects.group == "all") & (effects.effect > 0.3)][0]
    e = effects.loc[row, "effect"]
    effects.loc[row, ["ci_low", "ci_high"]] = [e + 0.1, e + 0.3]  # the mean below it
    percent = 100 / effects.loc[row, "clean"]
    expected = {
        "bars": ((e + 0.1) * percent, (e + 0.3) * percent),
        "scatter": (e + 0.1, e + 0.3),
    }
    figures = {
        "bars": plotting.mass_effect_bars(mass, effects),
        "scatter": plotting.mass_effect_scatter(mass, effects),
    }
    for name, fig in figures.items():
        low, high = expected[name]
        assert any(
            abs(a - low) <= 1e-9 * abs(low) and abs(b - high) <= 1e-9 * abs(high)
            for a, b in _whiskers(fig)
        ), name
    early = effects.index[(effects.group == "early") & (effects.effect > 0.3)][0]
    e = effects.loc[early, "effect"]
    effects.loc[early, ["ci_low", "ci_high"]] = [e - 0.3, e - 0.1]  # the mean above it
    percent = 100 / effects.loc[early, "clean"]
    bands = _whiskers(plotting.effect_bands(effects))
    assert any(
        abs(a - (e - 0.3) * percent) <= 1e-9 * abs(e * percent)
        and abs(b - (e - 0.1) * percent) <= 1e-9 * abs(e * percent)
        for a, b in bands
    )


def test_effect_figures_refuse_nan_missing_columns_and_inverted_intervals():
    mass, effects = _plot_tables(bands=("all",))
    mass = mass.drop(columns=["seed", "band"])
    effects = effects.drop(columns="seed")
    one_model = [
        lambda m, e: plotting.mass_effect_bars(m, e),
        lambda m, e: plotting.mass_effect_scatter(m, e),
        lambda m, e: plotting.effect_bands(e),
    ]
    first_all = effects.index[(effects.group == "all")][0]
    first_early = effects.index[(effects.group == "early")][0]
    for plot in one_model:
        for column in ("effect", "ci_low", "ci_high"):
            for row in (first_all, first_early):
                broken = effects.copy()
                broken.loc[row, column] = np.nan  # bar or whisker drawn as missing
                # bars and scatter show group "all"; the bands every other group
                if (broken.loc[row, "group"] == "all") != (plot is one_model[2]):
                    with pytest.raises(ValueError, match=f"1 non-finite '{column}' value"):
                        plot(mass, broken)
        swapped = effects.assign(ci_low=effects.ci_high, ci_high=effects.ci_low)
        with pytest.raises(ValueError, match="whose lower bound exceeds its upper"):
            plot(mass, swapped)
        with pytest.raises(ValueError, match=r"effects lacks the column\(s\) \['ci_high'\]"):
            plot(mass, effects.drop(columns="ci_high"))
    for plot in one_model[:2]:
        broken = mass.copy()
        broken.loc[0, "mass"] = np.nan  # the family vanished from both rows of the bars
        with pytest.raises(ValueError, match="1 non-finite 'mass' value"):
            plot(broken, effects)
    with pytest.raises(ValueError, match=r"group\(s\) \['late'\]"):
        plotting.effect_bands(effects, groups=["late"])
    # several models: one table per figure, seeds side by side
    seeds_mass, seeds = _plot_tables(seeds=(0, 1))
    seeds = seeds.assign(condition="a")
    seeds_mass = seeds_mass.assign(condition="a")
    by_seed = [
        lambda m, e, **kw: plotting.effects_by_seed(e, "older", ["mlp_res"], ["early"], **kw),
        lambda m, e, **kw: plotting.mass_effect_by_seed(m, e, "mlp_res", **kw),
    ]
    for plot in by_seed:
        broken = seeds.copy()
        broken.loc[(broken.router == "mlp_res") & (broken.family == "older"), "ci_low"] = np.nan
        with pytest.raises(ValueError, match="non-finite 'ci_low'"):
            plot(seeds_mass, broken)
        with pytest.raises(ValueError, match=r"columns \['b'\] have no rows"):
            plot(seeds_mass, seeds, columns=["b"])
        with pytest.raises(ValueError, match="effects has several rows for condition='a'"):
            plot(seeds_mass, pd.concat([seeds, seeds]))


def random_batch(n: int, n_pos: int, d_vocab: int, seed: int = 0) -> TaskBatch:
    """A `TaskBatch` of random prompts (answer at the last position)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(d_vocab, (n, n_pos), generator=generator)
    answer = torch.randint(d_vocab, (n,), generator=generator)
    targets = torch.full((n, n_pos), -100)
    targets[:, -1] = answer
    return TaskBatch(
        tokens, torch.full((n,), n_pos - 1), answer, (answer + 1) % d_vocab, tokens, targets
    )


def hand_logit_diff(batch: TaskBatch, logits: torch.Tensor) -> torch.Tensor:
    """A callable metric written on the logits as given: answer minus contrast logit."""
    at = batch.answer_logits(logits)
    rows = torch.arange(len(batch))
    return at[rows, batch.answer] - at[rows, batch.contrast]


@pytest.mark.parametrize("metric", ["logit_diff", hand_logit_diff])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logit_diff_effects_are_the_models_logits_subtracted_exactly(dtype, metric):
    """In a bfloat16 / float16 model ``logit_diff`` subtracted the two logits in the
    model's dtype, rounding every difference to 8 (11) bits before the effects subtracted
    two of them: here the mean effects (up to 0.05) were 3.8e-4 off in bfloat16 and 8.5e-5
    in float16 (in the audit's 4-layer cumulative model 1.2e-3 on effects of 1.6e-2, where
    the model's own rounding moves them by 1.5e-3). Now each effect is what the model's
    logits give, subtracted in float64 by hand from full ablated forward passes. The same
    held for a callable metric that subtracts the logits it is given (now float32)."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", d_model=48, d_vocab=61))
    with torch.no_grad():
        model.W_U.mul_(4.0)  # logits of a few units, as in a trained model
    model = model.to(dtype).eval()
    batch = random_batch(12, 10, 61)
    plan = plan_ablations(model, routers="mlp_res", groups="layers")
    effects = ablation_effects(
        model, batch, routers="mlp_res", groups="layers", metrics=metric, n_bootstrap=10,
        progress=False,
    )  # fmt: skip

    def exact(logits):
        at = logits[torch.arange(len(batch)), batch.answer_pos].double()
        rows = torch.arange(len(batch))
        return at[rows, batch.answer] - at[rows, batch.contrast]

    with torch.no_grad():
        clean = exact(model(batch.tokens))
        expected = [
            float((exact(model.run_with_hooks(batch.tokens, fwd_hooks=cell.ablation.hooks()))
                   - clean).mean())
            for cell in plan
        ]  # fmt: skip
    assert effects.effect.abs().max() > 0.02  # effects to measure
    np.testing.assert_allclose(effects.effect, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(effects.clean, float(clean.mean()), rtol=0, atol=1e-6)


def test_accuracy_of_logits_without_an_argmax_is_nan_not_a_guess():
    """Audit 81: ``accuracy`` took the argmax of the answer position's logits whatever
    they held. torch's argmax picks the first NaN, so a float16 forward pass that
    overflowed (NaN logits everywhere) scored every prompt 0 (1 where the answer is token
    0), and the sweep reported a clean accuracy of 0, effects of exactly 0 and intervals
    [0, 0] for a model that computed nothing, while ``logit_diff`` of the same run was NaN.
    Now a prompt whose argmax is undefined (a NaN logit, or +inf attained twice: an
    overflow tie) gets NaN, as the other metrics do; a single +inf is still the argmax."""
    batch = TaskBatch(
        tokens=torch.zeros(4, 2, dtype=torch.long),
        answer_pos=torch.tensor([1, 1, 1, 1]),
        answer=torch.tensor([0, 2, 0, 1]),
        contrast=torch.tensor([1, 1, 1, 0]),
        corrupted_tokens=torch.zeros(4, 2, dtype=torch.long),
        targets=torch.full((4, 2), -100),
    )
    logits = torch.zeros(4, 2, 3, dtype=torch.float16)
    logits[0, 1] = float("nan")  # argmax 0 = the answer: was scored correct
    logits[1, 1, 1] = float("nan")
    logits[2, 1, :2] = float("inf")  # a tie of overflows: argmax 0 = the answer
    logits[3, 1, 1] = float("inf")  # one overflow: the answer, well defined
    got = metric_values(batch, logits, "accuracy")
    assert torch.isnan(got[:3]).all() and got[3] == 1.0, got

    # end to end: a float16 model whose forward pass overflows (NaN logits)
    model = randomize_routing(tiny_model(attnres_layout="kimi", d_model=48)).double()
    with torch.no_grad():
        model.blocks[1].mlp.W_out.mul_(1e8)  # its output overflows float16
    model = model.to(torch.float16).eval()
    run = random_batch(6, 8, 50)
    with torch.no_grad():
        assert torch.isnan(model(run.tokens)[:, -1]).all()
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        effects = ablation_effects(
            model, run, families="embedding", groups="all", metrics=("accuracy",),
            n_bootstrap=10, progress=False,
        )  # fmt: skip
    assert effects.clean.isna().all() and effects.effect.isna().all(), effects


def test_accuracy_is_nan_only_where_an_infinite_tie_includes_the_answer():
    """Audit 86: ``TaskBatch.correct`` gave NaN for any +inf tie, also when the answer
    was finite below two +inf logits (then it is not the argmax: 0, as before audit 81),
    and missed a row of -inf (argmax token 0: the answer 0 scored 1). Expected values
    by construction: NaN only where the answer is among tied infinite maxima (or NaN)."""
    inf = float("inf")
    rows = [  # (answer, logits at the answer position, expected)
        (2, [inf, inf, 1.0], 0.0),  # two other tokens overflowed: not the argmax
        (0, [inf, inf, 1.0], math.nan),  # the answer ties another +inf
        (1, [2.0, inf, 1.0], 1.0),  # a single +inf is the argmax
        (0, [-inf, -inf, -inf], math.nan),  # every token ties at -inf
        (0, [-inf, -inf, 3.0], 0.0),  # a -inf answer below a finite logit
        (2, [-inf, -inf, 3.0], 1.0),
        (1, [0.0, 1.0, math.nan], math.nan),
    ]
    n = len(rows)
    batch, _ = _tie_batch([values for _, values, _ in rows], [answer for answer, _, _ in rows])
    for dtype in (torch.float16, torch.float32):
        logits = torch.zeros(n, 2, 3, dtype=dtype)
        logits[:, 1] = torch.tensor([values for _, values, _ in rows], dtype=dtype)
        got = batch.correct(logits).tolist()
        expected = [value for _, _, value in rows]
        np.testing.assert_array_equal(got, expected, err_msg=str(dtype))


def test_float16_logit_diff_does_not_overflow_where_float32_does_not():
    """Two float16 logits 8e4 apart: their difference overflowed float16 to inf."""
    batch = TaskBatch(
        tokens=torch.zeros(1, 2, dtype=torch.long),
        answer_pos=torch.tensor([1]),
        answer=torch.tensor([0]),
        contrast=torch.tensor([1]),
        corrupted_tokens=torch.zeros(1, 2, dtype=torch.long),
        targets=torch.full((1, 2), -100),
    )
    logits = torch.zeros(1, 2, 3, dtype=torch.float16)
    logits[0, 1, 0], logits[0, 1, 1] = 40000.0, -40000.0
    assert batch.logit_diff(logits).tolist() == [80000.0]
    assert batch.logit_diff(logits).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patching_heatmap_takes_half_precision_tensors(dtype):
    """NumPy has no bfloat16: a bfloat16 tensor (say a sweep of a bfloat16 model's own
    metric, or lens logits) crashed ``np.asarray`` ("unsupported ScalarType BFloat16")."""
    values = np.array([[1.0, -2.0], [0.5, 0.25]])  # exact in bfloat16 and float16
    heat = plotting.patching_heatmap(
        torch.tensor(values, dtype=dtype), ["l0", "l1"], ["a", "b"], title="t"
    ).data[0]
    assert np.asarray(heat.z).tolist() == values.tolist()


def test_mean_over_a_task_batchs_real_positions_selects_them():
    """Audit 30: ``routing_mass(positions="all")`` of a `TaskBatch` averaged each prompt's
    real positions by multiplying the weights by a 0 / 1 mask, so a nan weight in the
    right padding (a pad token with a zero embedding in a model with eps = 0: its routing
    is 0 / 0) made the prompt's mass nan. Now the mean selects the real positions: it
    equals the mean over them computed by hand."""
    from hooked_attnres.analysis.mass import _position_weights

    weights = torch.rand(2, 4, 3, dtype=torch.float64)
    weights[0, 3] = float("nan")  # prompt 0: answer at 2, position 3 is padding
    real = torch.arange(4) <= torch.tensor([2, 3])[:, None]  # [batch, pos]
    got = _position_weights(weights, "all", None, real)
    expected = torch.stack([weights[0, :3].mean(0), weights[1].mean(0)])
    assert (got - expected).abs().max().item() <= 1e-15


def _eps_zero_padded_model(layout: str) -> HookedAttnRes:
    """A float64 ``eps = 0`` model in ``layout`` (``"exact"``: the exact wrap of a Qwen3
    with ``rms_norm_eps = 0``) whose pad token 0 has a zero embedding (Hugging Face's
    ``padding_idx`` row): its padding rows are all zero at every norm of every layout."""
    from helpers import eps_zero_config

    if layout == "exact":
        qwen = hf_qwen3(rms_norm_eps=0.0)
        model = HookedAttnRes.from_hf_qwen3(qwen, wrap="exact", num_blocks=2, dtype=torch.float64)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # content-dependent routing
            for site in model.sites():
                model.router(site).query.normal_(generator=generator)
    else:
        model = HookedAttnRes(eps_zero_config(layout))
        if layout != "none":
            randomize_routing(model)
    with torch.no_grad():
        model.embed.W_E[0] = 0
    return model.eval()


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_norms_on_a_padded_eps_zero_cache_take_its_padding(layout, side):
    """Norms applied to a cache's tensors after its run (the routing lens, the final
    router's mixture of each depth state in `accumulated_resid`, `apply_ln_to_stack`'s
    recomputed ``ln_final``, `DepthRouter.mix`) did not know the run's padding: with
    eps 0 an all-zero padding row was ``0 / 0`` (before, every padding row of the
    lens was nan: 15 of 15 states x padding rows in every native layout, 21 of 21 in the
    exact wrap, where the run itself is finite). They now take the cache's padding (the
    run's rule, `norms.padding_eps`): finite everywhere, the real rows equal to each
    prompt's run alone, unpadded, and the lens's last entry, the final router's mixture
    and its weights equal to what the run computed (padding included)."""
    model = _eps_zero_padded_model(layout)
    vocab = model.cfg.d_vocab
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (6,), generator=generator)]
    prompts.append(torch.randint(1, vocab, (3,), generator=generator))
    pad = torch.zeros(3, dtype=torch.long)
    short = torch.cat([pad, prompts[1]] if side == "left" else [prompts[1], pad])
    tokens = torch.stack([prompts[0], short])
    mask = (torch.arange(6) >= 3) if side == "left" else (torch.arange(6) < 3)
    mask = torch.stack([torch.ones(6, dtype=torch.bool), mask]).long()
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    routed = model.routing_layout.has_final_router
    lens = routing_lens(model, cache, incl_mid=True)
    stack = cache.decompose_resid(routed=routed)
    normalized = cache.apply_ln_to_stack(stack, recompute_ln=True, routed=routed)
    for name, value in (
        ("lens", lens.logits),
        ("router lens", lens.router_logits),
        ("ln of decompose_resid", normalized),
    ):
        assert value.isfinite().all(), name
    for batch_slice, has_batch_dim, part in ((1, True, stack), (1, False, stack[:, 1])):
        one = cache.apply_ln_to_stack(
            part, batch_slice=batch_slice, has_batch_dim=has_batch_dim, recompute_ln=True
        )
        assert torch.equal(one, normalized[:, 1])
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-12, rtol=0)
    for row, prompt in enumerate(prompts):
        real = mask[row].bool()
        _, alone_cache = model.run_with_cache(prompt[None])
        alone = routing_lens(model, alone_cache, incl_mid=True)
        torch.testing.assert_close(lens.logits[:, row, real], alone.logits[:, 0])
        torch.testing.assert_close(lens.router_logits[:, row, real], alone.router_logits[:, 0])
        alone_stack = alone_cache.decompose_resid(routed=routed)
        torch.testing.assert_close(
            normalized[:, row, real],
            alone_cache.apply_ln_to_stack(alone_stack, recompute_ln=True, routed=routed)[:, 0],
        )
    if routed:
        final = model.router(None, "final_res")
        sources = list(cache[final.hook_sources.name].unbind(-2))
        out, weights = final.mix(sources, cache.attention_mask)
        torch.testing.assert_close(out, cache[final.hook_out.name], atol=1e-12, rtol=0)
        torch.testing.assert_close(weights, cache[final.hook_weights.name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
def test_a_pos_slice_cache_of_an_eps_zero_padded_run_takes_its_kept_positions_padding(layout):
    """Audit 57: a cache made with ``run_with_cache(..., pos_slice=...)`` recorded the
    pass's ``[batch, pos]`` mask, which its sliced tensors' rows do not match, so the norms
    its analyses apply after the run ignored it: with eps 0 every all-zero padding row was
    ``0 / 0`` (nan in ``accumulated_resid(apply_ln=True)``, ``apply_ln_to_stack(
    recompute_ln=True)``, ``logit_lens`` and the routing lens, in every layout, where the
    run is finite). The cache now records its ``pos_slice`` and ``real_rows`` is the kept
    positions' padding: the analyses equal the whole cache's cut by the same slice, and
    the real rows keep their bits."""
    model = _eps_zero_padded_model(layout)
    routed = model.routing_layout.has_final_router
    tokens = torch.tensor([[0, 0, 0, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, whole = model.run_with_cache(tokens, attention_mask=mask)
    kwargs = {"routed": True} if routed else {}
    for pos_slice in ((1, 4), [0, 4], 1):
        cut = Slice.unwrap(pos_slice)  # an int keeps its axis (TransformerLens)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, pos_slice=pos_slice)
        assert torch.equal(cache.real_rows(), cut.apply(mask.bool(), dim=-1))
        analyses = {
            "accumulated_resid": lambda c, s: c.accumulated_resid(
                apply_ln=True, incl_mid=True, pos_slice=s, **kwargs
            ),
            "apply_ln_to_stack": lambda c, s: c.apply_ln_to_stack(
                c.decompose_resid(pos_slice=s, routed=routed),
                pos_slice=s,
                recompute_ln=True,
                routed=routed,
            ),
            "routing_lens": lambda c, s: routing_lens(model, c, incl_mid=True, positions=s).logits,
        }
        if not routed:
            analyses["logit_lens"] = lambda c, s: c.logit_lens(positions=s, incl_mid=True).values
        real = cache.real_rows()
        for name, analysis in analyses.items():
            got = analysis(cache, None)
            assert got.isfinite().all(), (name, pos_slice)
            torch.testing.assert_close(got, analysis(whole, cut), atol=1e-12, rtol=0)
            plain = analysis(_unrecorded(cache), None)  # no padding: eps 0 everywhere
            assert torch.equal(got[:, real], plain[:, real]), (name, pos_slice)


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
def test_cache_analyses_refuse_hooks_an_earlier_pass_filled(layout):
    """Audit 60: caching hooks kept over two passes into one dict (``get_caching_hooks(
    cache=...)``), the second with another ``pos_slice`` (``(1, 5)`` then ``(0, 4)`` for
    ``blocks.0`` only) or another padding, mark the hooks the second did not refill
    `RunCacheDict.stale`, but the cache's analyses did not read the mark: the stack mixed
    ``blocks.0``'s positions 0-3 with the later layers' 1-4 (and normalised them with the
    second pass's padding): ``accumulated_resid(apply_ln=True)`` was off the first pass's by
    up to 2.74, silently (eps 0, kimi and none alike). They refuse such a cache now (the
    `require_run_positions` of the patching sweeps); one pos_slice twice is taken, equal to
    the whole cache's cut."""
    from hooked_attnres.model.cache import AttnResActivationCache

    model = _eps_zero_padded_model(layout)
    routed = model.routing_layout.has_final_router
    kwargs = {"routed": True} if routed else {}
    tokens = torch.tensor([[0, 0, 0, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, whole = model.run_with_cache(tokens, attention_mask=mask)

    def two_passes(first: dict, second: dict) -> AttnResActivationCache:
        cache, hooks, _ = model.get_caching_hooks(pos_slice=first.get("pos_slice"))
        with model.hooks(fwd_hooks=hooks):
            model(tokens, attention_mask=first.get("mask"))
        _, hooks, _ = model.get_caching_hooks(
            cache=cache,
            pos_slice=second.get("pos_slice"),
            names_filter=lambda name: name.startswith("blocks.0."),
        )
        with model.hooks(fwd_hooks=hooks):
            model(tokens, attention_mask=second.get("mask"))
        return AttnResActivationCache(cache, model)

    mixed = {
        "pos_slice": two_passes(
            {"pos_slice": (1, 5), "mask": mask}, {"pos_slice": (0, 4), "mask": mask}
        ),
        "padding": two_passes({"mask": mask}, {"mask": None}),
    }
    for why, cache in mixed.items():
        assert cache.cache_dict.stale, why
        calls = {
            "accumulated_resid": lambda c: c.accumulated_resid(apply_ln=True, **kwargs),
            "decompose_resid": lambda c: c.decompose_resid(routed=routed),
            "routing_lens": lambda c: routing_lens(model, c),
        }
        for name, call in calls.items():
            with pytest.raises(ValueError, match=r"earlier pass"):
                call(cache)
                pytest.fail(f"{name} took the {why} mix")
    same = two_passes(
        {"pos_slice": (1, 5), "mask": mask}, {"pos_slice": Slice((1, 5)), "mask": mask}
    )
    assert not same.cache_dict.stale
    torch.testing.assert_close(
        same.accumulated_resid(apply_ln=True, **kwargs),
        whole.accumulated_resid(apply_ln=True, pos_slice=(1, 5), **kwargs),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
def test_a_cache_without_a_position_axis_refuses_a_pos_slice(layout):
    """Audit 60: ``run_with_cache(..., pos_slice=Slice(k))`` (a ``Slice`` of an int, which
    TransformerLens applies as it is) drops every hook's position axis (``[batch, d]``), and
    the cache records it (`RunCacheDict.pos_slice`), but its analyses applied their own
    ``pos_slice`` to the axis that is left, the prompts': ``logit_lens()`` (default
    ``positions=-1``) returned the last prompt's lens alone, ``[n, d_vocab]``, and
    ``decompose_resid(pos_slice=-1)`` the last prompt's components; and ``logit_attrs``
    refused ``[batch]`` answers as ``[pos]`` ones of the batch's length. They refuse a
    ``pos_slice`` other than ``None`` there now; without one they equal the whole
    cache's at position ``k`` (``[batch]`` answers too)."""
    model = _eps_zero_padded_model(layout)
    routed = model.routing_layout.has_final_router
    kwargs = {"routed": True} if routed else {}
    tokens = torch.tensor([[0, 0, 0, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, whole = model.run_with_cache(tokens, attention_mask=mask)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, pos_slice=Slice(4))
    assert cache["blocks.0.hook_resid_pre"].shape == (2, model.cfg.d_model)
    stack = cache.decompose_resid(routed=routed)
    calls = {
        "decompose_resid": lambda c, s: c.decompose_resid(pos_slice=s, routed=routed),
        "accumulated_resid": lambda c, s: c.accumulated_resid(pos_slice=s, apply_ln=True, **kwargs),
        "get_full_resid_decomposition": lambda c, s: c.get_full_resid_decomposition(
            pos_slice=s, routed=routed
        ),
        "stack_head_results": lambda c, s: c.stack_head_results(pos_slice=s, routed=routed),
        "stack_neuron_results": lambda c, s: c.stack_neuron_results(
            model.cfg.n_layers, pos_slice=s, routed=routed
        ),
        "apply_ln_to_stack": lambda c, s: c.apply_ln_to_stack(
            c.decompose_resid(pos_slice=s, routed=routed) if c is whole else stack,
            pos_slice=s,
            recompute_ln=True,
            routed=routed,
        ),
        "logit_attrs": lambda c, s: c.logit_attrs(
            c.decompose_resid(pos_slice=s, routed=routed) if c is whole else stack,
            torch.tensor([1, 2]),
            pos_slice=s,
            routed=routed,
        ),
        "routing_lens": lambda c, s: routing_lens(model, c, positions=s).logits,
    }
    if not routed:
        calls["logit_lens"] = lambda c, s: (
            c.logit_lens().values if s == -1 else c.logit_lens(positions=s).values
        )
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"no position axis.*(pos_slice|positions)=None"):
            call(cache, -1)
            pytest.fail(f"{name} took pos_slice=-1")
        expected = call(whole, [4])  # the position axis of 1 the cache lacks
        got = call(cache, None)
        assert got.ndim == expected.ndim - 1, name
        torch.testing.assert_close(got, expected.reshape(got.shape), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["cumulative", "none"])
def test_logit_lens_with_a_batch_slice_takes_the_padding_of_its_rows(layout):
    """Audit 57: TransformerLens's ``logit_lens`` cuts the stack to ``batch_slice`` itself
    and then calls ``apply_ln_to_stack(recompute_ln=True)`` without it, so the cache could
    not tell the stack's rows and its norm ignored the run's padding: with eps 0 every
    all-zero padding row of the selected prompts was ``0 / 0`` (nan, for every
    ``batch_slice``: a list, a reordering, an int, a range), where the run is finite. The
    cache's ``logit_lens`` now cuts the cache itself (its rows of the mask kept): the
    result equals the whole batch's lens cut to the same rows, finite everywhere."""
    model = _eps_zero_padded_model(layout)
    tokens = torch.tensor([[0, 0, 0, 4, 5, 6], [7, 3, 4, 5, 1, 2], [1, 2, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for positions in (None, [0, 4], 2):
        whole = cache.logit_lens(positions=positions, incl_mid=True).values
        assert whole.isfinite().all()
        for batch_slice in ([2, 0], 0, (0, 2)):
            result = cache.logit_lens(positions=positions, batch_slice=batch_slice, incl_mid=True)
            assert result.has_batch_dim == (not isinstance(batch_slice, int))
            assert result.values.isfinite().all(), (batch_slice, positions)
            expected = Slice(batch_slice).apply(whole, dim=1)
            torch.testing.assert_close(result.values, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_norms_given_a_cache_padding_keep_the_bits_where_eps_is_positive_or_rows_real(layout):
    """The padding a norm outside its run is given changes nothing but an all-zero
    padding row of an eps-0 model: with eps > 0, and at the real rows with eps 0, the
    routing lens, `DepthRouter.mix` and `RMSNorm.unhooked` give the same bits as without
    it (the eps 1 is added only where the mean square is 0)."""
    from helpers import eps_zero_config

    for eps in (1e-6, 0.0):
        model = randomize_routing(HookedAttnRes(_with_eps(eps_zero_config(layout), eps)))
        with torch.no_grad():
            model.embed.W_E[0] = 0
        tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        keep = torch.ones_like(mask, dtype=torch.bool) if eps else mask.bool()
        final = model.router(None, "final_res")
        sources = list(cache[final.hook_sources.name].unbind(-2))
        with_mask = final.mix(sources, mask)
        without = final.mix(sources)
        for given, plain in zip(with_mask, without, strict=True):
            assert torch.equal(given[keep], plain[keep])
        stack = cache.decompose_resid(routed=True)
        assert torch.equal(
            model.ln_final.unhooked(stack, mask)[:, keep], model.ln_final.unhooked(stack)[:, keep]
        )
        assert not eps or torch.equal(
            routing_lens(model, cache).logits, routing_lens(model, _unrecorded(cache)).logits
        )


def _with_eps(cfg: HookedAttnResConfig, eps: float) -> HookedAttnResConfig:
    import dataclasses

    return dataclasses.replace(cfg, eps=eps)


def _unrecorded(cache):
    """The cache's tensors as a cache that records no padding."""
    from hooked_attnres.model.cache import AttnResActivationCache

    return AttnResActivationCache(dict(cache.cache_dict), cache.model)


@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_schedule_comparison_tells_absent_families_by_n_sources_not_by_mass(num_blocks):
    """Audit 53: schedule_comparison told a family a router reads from one it lacks by
    ``mass != 0``. A recency bias of 200 makes every weight but the current source's
    exp(-200) in float64, 0 in float32: the model routes exactly as its schedule
    (deviation ~1e-87), but the comparison refused it ("disagree on which source families
    exist ... or its routing weights underflowed"). It reads routing_mass's n_sources
    now, compared with the layout's own families."""
    hf = hf_qwen3(num_hidden_layers=4, hidden_size=16, head_dim=4, intermediate_size=16)
    model = HookedAttnRes.from_hf_qwen3(
        hf, wrap="recency", num_blocks=num_blocks, recency_bias=200.0
    )
    tokens = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(4))
    mass = routing_mass(model, tokens, positions="all")
    schedule = recency_schedule(4, num_blocks, 200.0)
    table = schedule_comparison(mass, schedule)
    assert table.max_abs_deviation.max() <= 1e-6
    layout = model.routing_layout
    for site in layout.sites():
        families = layout.families(site)
        rows = table[(table.router == site.kind) & (table.layer == site.layer)]
        for row in rows.itertuples():
            # read families predicted > 0 in float64 (exp(-200) / (1 + n e^-200)), absent 0
            assert (row.predicted > 0) == bool(families[row.family])
    # a table that says a read family is absent is another model's: refused
    site = layout.sites()[-1]
    tampered = mass.copy()
    at = (
        (tampered.router == site.kind)
        & (tampered.layer == site.layer)
        & (tampered.family == "current")
    )
    tampered.loc[at, "n_sources"] = 0
    with pytest.raises(ValueError, match="disagree on which source families exist"):
        schedule_comparison(tampered, schedule)
    with pytest.raises(ValueError, match="lacks the column 'n_sources'.*the comparison"):
        schedule_comparison(mass.drop(columns="n_sources"), schedule)


def _recency_study_tables(num_blocks: int, bias: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(mass summary by router and family, effects of group "all")`` of a 4-layer
    recency-wrapped tiny Qwen3 with ``num_blocks`` blocks and recency bias ``bias``."""
    hf = hf_qwen3(num_hidden_layers=4, hidden_size=16, head_dim=4, intermediate_size=16)
    model = HookedAttnRes.from_hf_qwen3(
        hf, wrap="recency", num_blocks=num_blocks, recency_bias=bias
    )
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 61, (6, 5), generator=generator)
    batch = TaskBatch(
        tokens=tokens,
        answer_pos=torch.full((6,), 4),
        answer=torch.randint(0, 61, (6,), generator=generator),
        contrast=torch.randint(0, 61, (6,), generator=generator),
        corrupted_tokens=tokens.clone(),
        targets=torch.full_like(tokens, -100),
    )
    summary = summarize_mass(routing_mass(model, batch, positions="answer"), n_bootstrap=50)
    effects = ablation_effects(
        model, batch, groups="all", metrics=("logit_diff",), n_bootstrap=50, progress=False
    )
    return summary, effects


@pytest.mark.parametrize("num_blocks", [1, 4])
def test_dissociation_report_tells_present_families_by_family_read(num_blocks):
    """Audit 56: dissociation_report decided which families a router type has by its own
    rule, ``mass > 0 or n_masked_routers > 0``, not by `family_read` (the one rule, audit
    53). A family read with an underflowed weight (recency bias 200: float32 e^-200 = 0)
    must count as present, one no router reads as absent; and the old rule ranked a family
    the mass summary's model does not have when the effects were of another model (its
    mass 0, its effect the other model's): such tables are refused now."""
    summary, effects = _recency_study_tables(num_blocks, 200.0)
    layout = HookedAttnRes.from_hf_qwen3(
        hf_qwen3(num_hidden_layers=4, hidden_size=16, head_dim=4, intermediate_size=16),
        wrap="recency",
        num_blocks=num_blocks,
    ).routing_layout
    report = dissociation_report(summary, effects).set_index("router")
    for router in ("attn_res", "mlp_res"):
        # the families some router of the type reads, from the layout itself
        read = {
            f
            for site in layout.sites()
            if site.kind == router
            for f, sources in layout.families(site).items()
            if sources
        }
        row = report.loc[router]
        assert set(row.mass_ranking) == read == set(row.shares)
        zero = summary[(summary.router == router) & (summary.mass == 0)].family
        if num_blocks == 4:
            # read, and every weight underflowed: present with mass exactly 0
            assert {"older", "prev_completed"} <= read & set(zero)
        else:
            assert read == {"embedding", "current"}  # nothing else to weigh: absent
    # effects of the 4-block model beside the mass of the 1-block one: `older` and
    # `prev_completed` are read there (masked routers, an effect), not here; the old rule
    # ranked them as present at mass 0
    one_block, _ = _recency_study_tables(1, 3.0)
    _, four_blocks = _recency_study_tables(4, 3.0)
    assert (four_blocks[four_blocks.family == "older"].n_masked_routers > 0).all()
    with pytest.raises(ValueError, match="says no router reads .*'older'.*different models"):
        dissociation_report(one_block, four_blocks)
    with pytest.raises(ValueError, match="lacks the column 'family_read'.*dissociation_report"):
        dissociation_report(summary.drop(columns="family_read"), effects)
    with pytest.raises(
        ValueError,
        match=r"^mass_summary's column 'family_read' must hold True or False \(a decision\) in "
        r"every row, but \d+ row\(s\) hold other values \(first: nan at router='attn_res', "
        r"family='.*'\): dissociation_report cannot read",
    ):
        dissociation_report(summary.assign(family_read=float("nan")), effects)


def _cached_over(model: HookedAttnRes, passes: list) -> dict:
    """One `RunCacheDict` filled by caching hooks over every pass of ``passes`` (each a
    ``(names_filter, call)``: the hooks of that filter attached while ``call()`` runs)."""
    cache = None
    for names_filter, call in passes:
        cache, hooks, _ = model.get_caching_hooks(names_filter=names_filter, cache=cache)
        with model.hooks(fwd_hooks=hooks):
            call()
    assert cache is not None
    return cache


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
def test_cache_analyses_refuse_hooks_a_pass_over_other_inputs_filled(layout):
    """Audit 67: caching hooks kept over ``model(A)`` and then ``model(B, stop_at_layer=1)``
    hold layer 0 of prompts B and the later layers of prompts A, and nothing was `stale`
    (the record compared only ``n_past``, padding and ``pos_slice``):
    ``accumulated_resid(apply_ln=True)`` was 3.3 to 6.5 off B's own cache (3.96 measured by
    the reviewer on ``none``), silently. The record now holds the pass's input
    (`PassInput`): a pass over other token ids, with other weights, or over the same
    tokens with another mask makes what it did not refill stale, and the analyses refuse."""
    from hooked_attnres.model.cache import AttnResActivationCache

    model = _eps_zero_padded_model(layout)
    routed = model.routing_layout.has_final_router
    kwargs = {"routed": True} if routed else {}
    tokens_a = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
    tokens_b = torch.tensor([[6, 5, 4, 3, 2, 1], [2, 1, 5, 4, 3, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    calls = {
        "accumulated_resid": lambda c: c.accumulated_resid(apply_ln=True, **kwargs),
        "decompose_resid": lambda c: c.decompose_resid(routed=routed),
        "routing_lens": lambda c: routing_lens(model, c),
    }

    def edit_weights():
        with torch.no_grad():
            model.blocks[1].mlp.W_in.mul_(1.5)

    mixes = {
        "other token ids": [
            (None, lambda: model(tokens_a)),
            (None, lambda: model(tokens_b, stop_at_layer=1)),
        ],
        "another attention mask": [
            (None, lambda: model(tokens_a, attention_mask=mask)),
            (None, lambda: model(tokens_a, stop_at_layer=1)),
        ],
        "other weights": [
            (None, lambda: model(tokens_a)),
            (None, edit_weights),
            (None, lambda: model(tokens_a, stop_at_layer=1)),
        ],
    }
    for why, passes in mixes.items():
        cache = AttnResActivationCache(_cached_over(model, passes), model)
        for name, call in calls.items():
            with pytest.raises(ValueError, match=rf"were last filled by an earlier pass.*{why}"):
                call(cache)
                pytest.fail(f"{name} took the mix of a pass with {why}")


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none", "exact"])
def test_split_names_filter_caching_of_one_input_equals_one_run(layout):
    """Audit 67: one pass cached in pieces (two passes over the same token ids, new tensors
    each time, the same mask, split ``names_filter`` s) is still one pass's cache: nothing
    stale, and its analyses equal those of one ``run_with_cache``."""
    from hooked_attnres.model.cache import AttnResActivationCache

    model = _eps_zero_padded_model(layout)
    routed = model.routing_layout.has_final_router
    kwargs = {"routed": True} if routed else {}
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 3, 4, 5, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, whole = model.run_with_cache(tokens, attention_mask=mask)
    early = lambda name: name == "hook_embed" or name.startswith("blocks.0.")  # noqa: E731
    split = _cached_over(
        model,
        [
            (early, lambda: model(tokens.clone(), attention_mask=mask.clone())),
            (lambda name: not early(name), lambda: model(tokens.clone(), attention_mask=mask)),
        ],
    )
    assert split.keys() == whole.cache_dict.keys() and not split.stale
    cache = AttnResActivationCache(split, model)
    for call in (
        lambda c: c.accumulated_resid(apply_ln=True, **kwargs),
        lambda c: c.decompose_resid(routed=routed),
    ):
        torch.testing.assert_close(call(cache), call(whole), atol=1e-12, rtol=0)


def test_schedule_comparison_refuses_a_layer_column_mixing_text_and_numbers():
    """Audit 121: a mass table whose second batch's layers were text (read back from a CSV)
    was refused as "for a different shape than the measured model" (its layer '0' had no
    prediction), a wrong reason. Refused (`require_one_kind`), naming the column; with one
    dtype again the comparison equals that of one run of all the prompts."""
    model = HookedAttnRes.from_hf_qwen3(
        hf_qwen3(num_hidden_layers=4), wrap="recency", num_blocks=2, recency_bias=3.0
    )
    tokens = torch.randint(0, 61, (4, 5), generator=torch.Generator().manual_seed(0))
    schedule = recency_schedule(4, 2, 3.0)
    first = routing_mass(model, tokens[:2], positions="all")
    second = routing_mass(model, tokens[2:], positions="all").assign(prompt=lambda t: t.prompt + 2)
    mixed = pd.concat([first, second.assign(layer=second.layer.astype(str))])
    with pytest.raises(ValueError, match=r"mass table's column 'layer' mixes text and numbers"):
        schedule_comparison(mixed, schedule)
    pd.testing.assert_frame_equal(
        schedule_comparison(mixed.astype({"layer": int}), schedule),
        schedule_comparison(routing_mass(model, tokens, positions="all"), schedule),
        atol=1e-6,
    )


def test_schedule_comparison_refuses_the_mass_of_several_models():
    """Audit 148: schedule_comparison grouped the mass by router, layer and family only, so
    a mass table of two seeds (two 4-layer cumulative models, routed by seeds 0 and 1, on
    the same prompts) was compared as one model: attention layer 0's ``current`` measured
    0.379, the two models' mean, where seed 0 gives 0.362. Refused naming the column; one
    model's rows give its comparison without the label."""
    schedule = recency_schedule(4, 2, 3.0)
    tokens = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    masses = [
        routing_mass(
            randomize_routing(tiny_model(n_layers=4, attnres_num_blocks=2), seed=s).eval(),
            tokens,
            positions="all",
        )
        for s in (0, 1)
    ]
    both = pd.concat([m.assign(seed=s) for s, m in enumerate(masses)])
    with pytest.raises(
        ValueError,
        match=r"^schedule_comparison reads one model, but the table holds 2 'seed' values "
        r"\(\[0, 1\]\), whose rows it would pool into one mean; pass one model's rows",
    ):
        schedule_comparison(both, schedule)
    pd.testing.assert_frame_equal(
        schedule_comparison(both[both.seed == 1], schedule),
        schedule_comparison(masses[1], schedule),
    )


def test_schedule_deviation_refuses_a_schedule_of_more_layers_as_the_comparison_does():
    """Audit 138: a schedule of 8 layers (4 blocks) beside a 4-layer, 2-block model predicts
    the model's routers alike (the same block size), so schedule_deviation reported
    agreement (2e-8) with a schedule of another model, which schedule_comparison refuses."""
    from hooked_attnres.analysis import schedule_deviation

    model = tiny_model(attnres_recency_bias=3.0)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    assert schedule_deviation(model, cache, recency_schedule(4, 2, 3.0)) < 1e-6  # control
    mass = routing_mass(model, tokens, positions="all")
    for n_layers, num_blocks in ((8, 4), (6, 3)):
        schedule = recency_schedule(n_layers, num_blocks, 3.0)
        with pytest.raises(ValueError, match="different shape"):
            schedule_comparison(mass, schedule)
        with pytest.raises(
            ValueError, match=rf"^the schedule is for {n_layers} layers, but the model has 4"
        ):
            schedule_deviation(model, cache, schedule)


def test_band_of_a_negative_layer_names_the_final_router_and_the_remedy():
    """Review of audit 145: ``band_of(-1, bands)`` (a mass table's layer of the final
    router, `RouterSite.table_layer`, re-banded row by row) was refused as "band_of's layer
    must be an integer >= 0, got -1", naming no remedy; the message says what -1 is and
    what to pass. ``None`` gives the band the table's final rows hold."""
    from hooked_attnres.analysis.mass import band_of

    model = tiny_model(attnres_layout="kimi")
    mass = routing_mass(model, torch.tensor([[1, 2, 3, 4]]), positions="all")
    bands = {"early": [0, 1], "late": [2, 3]}
    final = mass[mass.layer == -1]
    assert len(final) and set(final.band) == {band_of(None, bands)}
    with pytest.raises(
        ValueError,
        match=r"got -1: a mass table's layer -1 is the final router \(band 'final': pass "
        r"None or its RouterSite\).*pass n_layers - 1",
    ):
        band_of(-1, bands)


def test_summarize_mass_refuses_a_bool_layer_among_integers():
    """Review of audit 142: `integer_layers` refuses a bool layer, but read each distinct
    label once, and ``True == 1`` (one label to pandas and to a dict): an object column
    with a 1 before a True read the True as layer 1, so a mass table whose layer-2 rows
    held True was refused as "repeats 8 row(s) ... the repeated rows differ in ['band']
    ... Add 'band' to by" (layer 2's rows taken for layer 1's), a false reason and remedy,
    and with the True first the 1s were refused with it (16 values "no layer" for 8)."""
    model = tiny_model(attnres_layout="kimi")
    mass = routing_mass(model, torch.tensor([[1, 2, 3, 4]]), positions="all")
    bad = mass.assign(layer=mass.layer.astype(object))
    bad.loc[mass.layer.eq(2).to_numpy(), "layer"] = True
    rows = int(mass.layer.eq(2).sum())
    first = int(np.flatnonzero(mass.layer.eq(2).to_numpy())[0])
    with pytest.raises(ValueError, match=rf"holds {rows} value\(s\) .*e\.g\. True in row {first}:"):
        summarize_mass(bad)
    # the True first (layer 0's rows): the 1s are layers, only the True rows are refused
    bad = mass.assign(layer=mass.layer.astype(object))
    bad.loc[mass.layer.eq(0).to_numpy(), "layer"] = True
    rows = int(mass.layer.eq(0).sum())
    first = int(np.flatnonzero(mass.layer.eq(0).to_numpy())[0])
    with pytest.raises(ValueError, match=rf"holds {rows} value\(s\) .*e\.g\. True in row {first}:"):
        summarize_mass(bad)


def test_correct_credits_a_finite_tie_for_the_top_logit_by_its_share_not_by_token_order():
    """Audit 184: ``correct`` took torch's argmax, the first of tied logits, so an answer
    tied for the top logit with another token scored 1 when its id was the lower one and 0
    otherwise: a number of the vocabulary's order. In bfloat16 such ties are common (3 to 5
    of 512 probe prompts of the shipped ``paperlike`` / ``hard`` L8 models; none in
    float32). Now a finite tie of ``k`` tokens, the answer among them, scores ``1 / k``,
    the chance a uniformly random tie-break picks the answer, whatever the ids; infinite
    ties stay NaN. Expected values by construction."""
    rows = [  # (answer, logits at the answer position, expected)
        (0, [2.0, 1.0, 2.0], 0.5),  # the lower id of a tie: was 1
        (2, [2.0, 1.0, 2.0], 0.5),  # the higher id of the same tie: was 0
        (1, [2.0, 1.0, 2.0], 0.0),  # below the tie
        (1, [0.0, 0.0, 0.0], 1 / 3),  # every token ties: was 0 (1 for answer 0)
        (0, [0.0, 0.0, 0.0], 1 / 3),
        (1, [0.5, 3.0, 3.0], 0.5),
        (2, [0.5, 3.0, 1.0], 0.0),
        (1, [0.5, 3.0, 1.0], 1.0),
    ]
    n = len(rows)
    batch, _ = _tie_batch([values for _, values, _ in rows], [answer for answer, _, _ in rows])
    expected = [value for _, _, value in rows]
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        logits = torch.zeros(n, 2, 3, dtype=dtype)
        logits[:, 1] = torch.tensor([values for _, values, _ in rows], dtype=dtype)
        np.testing.assert_allclose(batch.correct(logits).tolist(), expected, rtol=1e-7)
        assert batch.accuracy(logits) == pytest.approx(sum(expected) / n)
        # the same logits with the vocabulary reversed: the same scores
        flipped = dataclasses.replace(batch, answer=2 - batch.answer, contrast=2 - batch.contrast)
        np.testing.assert_allclose(
            flipped.correct(logits.flip(-1)).tolist(), expected, rtol=1e-7, err_msg=str(dtype)
        )


def _tie_batch(answer_logits: list[list[float]], answers: list[int]) -> tuple[TaskBatch, Tensor]:
    """A `TaskBatch` answered at position 1 and float32 logits there (``[n, 2, d_vocab]``)."""
    n = len(answers)
    batch = TaskBatch(
        tokens=torch.zeros(n, 2, dtype=torch.long),
        answer_pos=torch.ones(n, dtype=torch.long),
        answer=torch.tensor(answers),
        contrast=(torch.tensor(answers) + 1) % len(answer_logits[0]),
        corrupted_tokens=torch.zeros(n, 2, dtype=torch.long),
        targets=torch.full((n, 2), -100),
    )
    logits = torch.zeros(n, 2, len(answer_logits[0]))
    logits[:, 1] = torch.tensor(answer_logits)
    return batch, logits


def test_accuracy_is_the_mean_share_correctly_rounded_not_its_float32():
    """Review 185: ``TaskBatch.accuracy`` averaged the shares in float32, so 3 of 10
    prompts correct read 0.30000001192092896 (the float32 of 3/10), where `evaluate` of the
    same prompts gives 0.3 (a float64 sum divided once). Now the float64 mean: k/n (or,
    with the half shares of ties of 2, 1.5/10) correctly rounded, as Python's ``k / n``."""
    for n_right, n_tied, n in ((3, 0, 10), (1, 1, 10), (0, 3, 7), (5, 2, 11)):
        rows = [[2.0, 1.0, 0.0]] * n_right + [[2.0, 2.0, 0.0]] * n_tied
        rows += [[0.0, 2.0, 1.0]] * (n - n_right - n_tied)
        batch, logits = _tie_batch(rows, [0] * n)
        share = Fraction(n_right) + Fraction(n_tied, 2)
        assert batch.accuracy(logits) == float(share / n), (n_right, n_tied, n)


def test_a_drop_of_tied_prompts_meets_criterion_2_exactly():
    """Audit 184's tie credit makes an accuracy effect a mean of fractional differences.
    docs/study.md: with ties of 2 tokens the differences are exact halves, so the effect is
    still the correctly rounded ratio and meets criterion 2's 2 points exactly: 2 of 50
    prompts whose answer ties one other token (1/2 each) and loses it under the ablation
    drop accuracy by 1/50 exactly. Before audit 184 the tie scored 1 (answer of the lower
    id, here) and the drop read 2/50."""
    from hooked_attnres.analysis.bootstrap import bootstrap_ci_rows
    from hooked_attnres.analysis.motifs import PREREGISTERED, _criterion_2

    n = 50
    clean_rows = [[2.0, 2.0, 0.0]] * 2 + [[3.0, 1.0, 0.0]] * (n - 2)
    ablated_rows = [[1.0, 2.0, 0.0]] * 2 + [[3.0, 1.0, 0.0]] * (n - 2)
    batch, clean = _tie_batch(clean_rows, [0] * n)
    _, ablated = _tie_batch(ablated_rows, [0] * n)
    difference = metric_values(batch, ablated, "accuracy") - metric_values(batch, clean, "accuracy")
    mean = bootstrap_ci_rows(difference[None].numpy(), 40)[0][0]
    assert (
        Fraction(mean) == Fraction(float(Fraction(-1, n)))
        and mean == -PREREGISTERED.min_accuracy_drop
    )
    assert _criterion_2(0.0, mean, 1.0, PREREGISTERED) == (True, True)
