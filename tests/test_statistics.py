"""The statistics of the analysis package against independent NumPy computations: the
percentile bootstrap (resamples, level, paired rows, tiny n), the effects' paired
intervals, the routing mass's positions and the analytic recency schedule's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import hf_qwen3, randomize_routing, tiny_model

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import (
    recency_schedule,
    routing_mass,
    schedule_comparison,
    summarize_mass,
)
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.tasks.base import TaskBatch


def _padded_batch(d_vocab: int) -> TaskBatch:
    """Four right-padded prompts of lengths 8, 5, 3, 8 (token 1 pads)."""
    tokens = torch.randint(3, d_vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([8, 5, 3, 8])
    tokens[torch.arange(8) >= lengths[:, None]] = 1
    zeros = torch.zeros(4, dtype=torch.long)
    return TaskBatch(
        tokens=tokens,
        answer_pos=lengths - 1,
        answer=zeros,
        contrast=zeros,
        corrupted_tokens=tokens.clone(),
        targets=torch.full_like(tokens, -100),
    )


def test_routing_mass_refuses_an_answer_pos_in_the_padding_or_one_it_would_ignore():
    """Audit finding: with a TaskBatch, a position list past a prompt's answer_pos (its
    last real position) was refused, but the same position given as ``answer_pos=`` was
    read: routing weights of right-padding tokens, reported as the prompt's mass. And
    ``answer_pos=`` with ``positions="all"`` or a list was silently ignored."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    batch = _padded_batch(model.cfg.d_vocab)
    one_past = torch.clamp(batch.answer_pos + 1, max=7)  # padding for prompts 1 and 2
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1, 2\], into their right padding"):
        routing_mass(model, batch, answer_pos=one_past)
    for positions in ("all", [0, 1]):
        with pytest.raises(ValueError, match="answer_pos applies to positions='answer' only"):
            routing_mass(model, batch, positions=positions, answer_pos=batch.answer_pos)
    # an answer_pos inside every prompt is read: the cache at those positions (independent)
    earlier = batch.answer_pos - 1
    mass = routing_mass(model, batch, answer_pos=earlier)
    _, cache = model.run_with_cache(batch.tokens)
    rows = torch.arange(len(batch))
    for site in model.sites():
        weights = cache[site.hook("weights")][rows, earlier].double()  # [batch, n_sources]
        for family, indices in model.routing_layout.families(site).items():
            expected = weights[:, indices].sum(-1).numpy() if indices else np.zeros(len(batch))
            got = mass[
                (mass.router == site.kind)
                & (mass.layer == site.table_layer)
                & (mass.family == family)
            ].sort_values("prompt")
            np.testing.assert_allclose(got.mass.to_numpy(), expected, atol=1e-5)  # float32
    assert set(mass.family) == set(FAMILIES)


def test_schedule_comparison_refuses_a_schedule_of_another_shape():
    """Audit finding: schedule_comparison refused a schedule with fewer layers than the
    measured model but compared any other: a recency-wrapped 4-layer, 2-block model read
    against recency_schedule(4, 1) or (6, 2) deviated by 0.045 (against (4, 4): 0.083),
    so the schedule claim failed for a model that routes exactly as its own schedule."""
    hf = hf_qwen3(num_hidden_layers=4, hidden_size=16, head_dim=4, intermediate_size=16)
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2, recency_bias=3.0)
    tokens = torch.randint(0, 61, (5, 7), generator=torch.Generator().manual_seed(3))
    mass = routing_mass(model, tokens, positions="all")
    table = schedule_comparison(mass, recency_schedule(4, 2, 3.0))
    # the prediction, independently: e^b / (e^b + n) on current, 1 / (e^b + n) per other source
    for site in model.sites():
        n_other = len(model.routing_layout.labels(site)) - 1
        row = table[
            (table.router == site.kind) & (table.layer == site.layer) & (table.family == "current")
        ]
        assert row.predicted.iloc[0] == pytest.approx(math.e**3 / (math.e**3 + n_other))
    assert table.max_abs_deviation.max() <= 1e-6
    with pytest.raises(ValueError, match=r"no rows for the routers \[\('attn_res', 4\)"):
        schedule_comparison(mass, recency_schedule(6, 2, 3.0))
    for num_blocks in (1, 4):
        with pytest.raises(ValueError, match="disagree on which source families exist"):
            schedule_comparison(mass, recency_schedule(4, num_blocks, 3.0))
    # a schedule for more layers of the same block size predicts the same for these
    # layers, but it is for another model: refused as well
    with pytest.raises(ValueError, match="different shape"):
        schedule_comparison(mass, recency_schedule(8, 4, 3.0))


def test_the_schedule_of_the_qwen3_06b_shape_is_the_design_notes_worked_example():
    """../shared/design/attnres.md section 4: L = 28, N = 8, S = 4, n = 1 + floor(l / 4)
    non-current sources at layer l; mean current mass (1/7) sum_{n=1..7} e^3 / (e^3 + n)."""
    schedule = recency_schedule(28, 8, 3.0)
    e = math.exp(3.0)
    n = np.array([1 + layer // 4 for layer in range(28)])
    expected = {
        "current": np.mean(e / (e + n)),
        "embedding": np.mean(1 / (e + n)),
        "prev_completed": np.mean((n >= 2) / (e + n)),
        "older": np.mean(np.maximum(n - 2, 0) / (e + n)),
    }
    assert np.mean([e / (e + k) for k in range(1, 8)]) == pytest.approx(expected["current"])
    for router in ("attn_res", "mlp_res", "all"):
        for family, value in expected.items():
            assert schedule.family_means.loc[router, family] == pytest.approx(value, abs=1e-15)
    assert round(schedule.mean_current, 4) == 0.8397  # the design notes' number


def test_summarize_mass_refuses_a_group_without_some_prompts_and_grouping_by_prompt():
    """Audit finding: a filtered table (prompt 1's attention routers left out) gave that
    router type a NaN mass and interval with a bootstrap warning about "NaN or infinite
    values" (the mass is finite: the prompt is missing); ``by=("prompt",)`` crashed in
    pandas ("The name prompt occurs multiple times")."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    mass = routing_mass(model, _padded_batch(model.cfg.d_vocab))
    filtered = mass[~((mass.prompt == 1) & (mass.router == "attn_res"))]
    with pytest.raises(ValueError, match=r"'router': 'attn_res'.* no rows for prompt\(s\) \[1\]"):
        summarize_mass(filtered, n_bootstrap=50)
    with pytest.raises(ValueError, match=r"cannot group by \['prompt'\]"):
        summarize_mass(mass, by=("prompt", "family"), n_bootstrap=50)
    # the whole table: per group, the mean over prompts of each prompt's mean over the
    # group's routers, and the percentile interval of the same (independent: NumPy)
    summary = summarize_mass(mass, by=("router", "family"), n_bootstrap=200, seed=5)
    index = np.random.default_rng(5).integers(0, 4, size=(200, 4))
    for row in summary.itertuples():
        group = mass[(mass.router == row.router) & (mass.family == row.family)]
        per_prompt = group.groupby("prompt").mass.mean().sort_index().to_numpy()  # [4]
        low, high = np.quantile(per_prompt[index].mean(axis=1), [0.025, 0.975])
        assert (row.mass, row.ci_low, row.ci_high) == pytest.approx(
            (per_prompt.mean(), low, high), abs=1e-12
        )
        assert row.n_prompts == 4
