"""The statistics of the analysis package against independent NumPy computations: the
percentile bootstrap (resamples, level, paired rows, tiny n), the effects' paired
intervals, the routing mass's positions and the analytic recency schedule's checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import hf_qwen3, randomize_routing, tiny_model

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import (
    ablation_effects,
    bootstrap_ci,
    bootstrap_ci_rows,
    dissociation_report,
    recency_schedule,
    routing_mass,
    schedule_comparison,
    schedule_deviation,
    summarize_mass,
)
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
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


def test_schedule_comparison_names_the_schedules_blocks_as_the_layout_words_them():
    """Audit 115: the refusal of a schedule of another shape said "(4 layers, 2 blocks)"
    for a mode-full schedule, whose block count is unused (a block per sublayer). It now
    words the blocks as `RoutingLayout.blocks_text` of the schedule's layout, the one
    wording of block counts (compared with the layout built independently)."""
    from hooked_attnres.model.depth import RoutingLayout

    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2).eval()
    tokens = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model, tokens, positions="all")
    for num_blocks, mode, words in (
        (2, "full", "a block per sublayer"),
        (4, "block", "4 blocks of 1 layer"),
        (3, "block", "2 blocks of 2 layers"),  # 3 asked, S = ceil(4 / 3) = 2: 2 blocks
    ):
        schedule = recency_schedule(4, num_blocks, 3.0, mode)
        if (num_blocks, mode) == (3, "block"):  # the model's own shape: compared
            schedule_comparison(mass, schedule)
        else:
            with pytest.raises(ValueError, match=rf"the schedule \(4 layers, {words}\) and"):
                schedule_comparison(mass, schedule)
        size = -(-4 // num_blocks)
        assert schedule.layout == RoutingLayout("cumulative", 4, size, mode)
        assert schedule.layout.blocks_text() == words


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
    with pytest.raises(ValueError, match="by is empty"):
        summarize_mass(mass, by=(), n_bootstrap=50)  # was: pandas' "must be a MultiIndex"
    with pytest.raises(ValueError, match=r"by repeats \['router'\]"):
        summarize_mass(mass, by=("router", "router"), n_bootstrap=50)
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


def test_summarize_mass_refuses_prompt_ids_that_repeat_a_router_row():
    """Audit 93: two routing_mass tables concatenated (batches of 6 and 2 prompts, each
    numbered from 0) were summarised as 6 prompts: prompts 0 and 1 of both batches were
    averaged into one, so the mean weighted the prompts unequally (0.052 off on a mass of
    0.25, 4-layer kimi model), the interval was 0.078 off and n_prompts said 6, not 8.
    Such a table repeats a (prompt, router, layer, family) row and is refused;
    renumbered, it equals the summary of one run of all 8 prompts."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (8, 6), generator=torch.Generator().manual_seed(0))
    first = routing_mass(model, tokens[:6], positions="all")
    second = routing_mass(model, tokens[6:], positions="all")
    with pytest.raises(ValueError, match=r"repeats .*prompt.*router.*concatenated"):
        summarize_mass(pd.concat([first, second]), n_bootstrap=50)
    renumbered = pd.concat([first, second.assign(prompt=second.prompt + 6)])
    whole = routing_mass(model, tokens, positions="all")  # independent: one run of all 8
    got = summarize_mass(renumbered, n_bootstrap=50)
    expected = summarize_mass(whole, n_bootstrap=50)
    pd.testing.assert_frame_equal(got, expected, atol=1e-6)
    assert (got.n_prompts == 8).all()
    # the study's table: every row again with band "all", told apart by grouping by band
    summarize_mass(pd.concat([whole, whole.assign(band="all")]), by=("band", "family"))


def test_summarize_mass_refuses_a_key_column_that_mixes_text_and_numbers():
    """Audit 115: a table whose ``prompt`` mixed ints and strings (one part read back from
    a CSV) failed with pandas' bare ``TypeError`` ('<' not supported between str and int);
    one whose ``layer`` did (``0`` and ``'0'``) was summarised silently: two batches both
    numbered from 0 were not seen to repeat a (prompt, router, layer, family) row, so
    prompts 0 and 1 of both were averaged as one (6 prompts, not 8; a mean 0.05 off).
    Every key column that mixes text and numbers is refused, naming it and the remedy."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (8, 6), generator=torch.Generator().manual_seed(0))
    first = routing_mass(model, tokens[:6], positions="all")
    second = routing_mass(model, tokens[6:], positions="all").assign(prompt=lambda t: t.prompt + 6)
    for column in ("prompt", "layer", "router", "family"):
        mixed = pd.concat([first, second.assign(**{column: second[column].astype(str)})])
        if column in ("router", "family"):  # text columns: a number among the labels
            mixed = pd.concat([first, second.assign(**{column: 1})])
        with pytest.raises(
            ValueError, match=rf"column '{column}' mixes text and numbers.*one dtype"
        ):
            summarize_mass(mixed, n_bootstrap=20)
    for extra in ("seed", "condition", "band"):
        mixed = pd.concat([first.assign(**{extra: 0}), second.assign(**{extra: "0"})])
        by = ("band", "family") if extra == "band" else ("router", "family")
        with pytest.raises(ValueError, match=rf"column '{extra}' mixes text"):
            summarize_mass(mixed, by=by, n_bootstrap=20)
    # the silent case: batches numbered from 0, the second's layers read back as text
    with pytest.raises(ValueError, match=r"column 'layer' mixes"):
        summarize_mass(
            pd.concat(
                [first, second.assign(prompt=second.prompt - 6, layer=second.layer.astype(str))]
            ),
            n_bootstrap=20,
        )
    # one dtype again: the summary of one run of all 8 prompts (independent)
    restored = pd.concat([first, second.assign(layer=second.layer.astype(str))])
    restored = restored.astype({"layer": int})
    whole = routing_mass(model, tokens, positions="all")
    pd.testing.assert_frame_equal(
        summarize_mass(restored, n_bootstrap=50), summarize_mass(whole, n_bootstrap=50), atol=1e-6
    )


def test_summarize_mass_refuses_a_categorical_key_column_that_mixes_text_and_numbers():
    """Audit 120: the check of audit 115 read object columns only, so the same concatenated
    table with its ``layer`` made categorical (``astype("category")``, e.g. to save memory;
    categories ``[0, 1, ..., '0', '1', ...]``) was summarised silently: two batches both
    numbered from 0 (6 and 2 prompts), their layers ``0`` and ``'0'``, were not seen to
    repeat a row, ``n_prompts`` 6 for 8. A categorical column of one kind is still taken,
    with the numbers of the plain table (independent: the summary without categories)."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (8, 6), generator=torch.Generator().manual_seed(0))
    first = routing_mass(model, tokens[:6], positions="all")
    second = routing_mass(model, tokens[6:], positions="all")
    mixed = pd.concat([first, second.assign(layer=second.layer.astype(str))])
    with pytest.raises(ValueError, match=r"column 'layer' mixes text and numbers.*one dtype"):
        summarize_mass(mixed.astype({"layer": "category"}), n_bootstrap=40)
    whole = routing_mass(model, tokens, positions="all")
    keys = {"layer": "category", "router": "category", "family": "category"}
    pd.testing.assert_frame_equal(
        summarize_mass(whole.astype(keys), n_bootstrap=50),
        summarize_mass(whole, n_bootstrap=50),
        check_dtype=False,
        check_categorical=False,
    )


def test_the_key_column_check_of_a_large_table_counts_the_rows_it_refuses():
    """Audit 123: `require_keys`' test of text and numbers (`require_one_kind`) classified
    every row of an object or categorical column in Python: 0.28 s for the three text
    columns of a 300k-row mass table of object dtype, which routing_heatmap and
    schedule_comparison paid on each call since audit 121 (the heatmap 0.58 s for 0.20 s
    before), summarize_mass since audit 115 / 120. It classifies each distinct label once
    (0.03 s there; measured, not timed here: the suite has no timed tests). Three object
    columns and one categorical column of 300k rows of one kind each are taken, and a
    mixed column is still refused with its numbers of rows, counted over every row."""
    from hooked_attnres._validation import require_keys

    n, rows = 300_000, np.arange(300_000)

    def text(labels):  # object dtype: pandas 3 would make an array of str its str dtype
        return pd.Series(np.asarray(labels, dtype=object)[rows % len(labels)], dtype=object)

    table = pd.DataFrame(
        {
            "router": text(["attn_res", "mlp_res", "final_res"]),
            "family": text(FAMILIES),
            "condition": text(["kimi"]),
            "layer": pd.Categorical(rows % 8),
        }
    )
    assert all(table[c].dtype == np.dtype(object) for c in ("router", "family", "condition"))
    require_keys(table, ["router", "family", "condition", "layer"], "the mass table")
    mixed = table.assign(condition=table.condition.where(table.index != n - 1, 7))
    with pytest.raises(
        ValueError, match=r"'condition' mixes text and numbers \(299999 text and 1 "
    ):
        require_keys(mixed, ["condition"], "the mass table")


def test_summarize_mass_names_the_column_that_tells_repeated_rows_apart():
    """Audit 97: the refusal of a repeated (prompt, router, layer, family) row (audit 93)
    said only that the prompt ids might not name one prompt each (two tables concatenated).
    For rows told apart by a column outside by and outside condition / seed / model (two
    layouts on the same tokens, a "layout" column; the study's band "all" copy summarised
    by router) that diagnosis is wrong and the remedy "a column in by" named none: the
    message names the column the repeated rows differ in, and a table without a "layer"
    column says that the layers of a router type cannot be told apart. Grouped by the
    column named, the table is summarised as each part alone."""
    kimi = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    full = randomize_routing(tiny_model(attnres_layout="full"), seed=2).eval()
    tokens = torch.randint(3, kimi.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    first = routing_mass(kimi, tokens, positions="all")
    second = routing_mass(full, tokens, positions="all")
    both = pd.concat([first.assign(layout="kimi"), second.assign(layout="full")])
    with pytest.raises(ValueError, match=r"differ in \['layout'\]"):
        summarize_mass(both, n_bootstrap=20)
    with pytest.raises(ValueError, match=r"differ in \['band'\]"):
        summarize_mass(pd.concat([first, first.assign(band="all")]), n_bootstrap=20)
    # truly repeated rows (one table twice) differ in nothing: no column is named
    with pytest.raises(ValueError, match=r"concatenated") as error:
        summarize_mass(pd.concat([first, first]), n_bootstrap=20)
    assert "differ in" not in str(error.value)
    with pytest.raises(ValueError, match=r"no 'layer' column"):
        summarize_mass(first.drop(columns="layer"), n_bootstrap=20)
    got = summarize_mass(both, by=("layout", "router", "family"), n_bootstrap=20)
    for layout, part in (("kimi", first), ("full", second)):
        alone = summarize_mass(part, n_bootstrap=20)  # independent: each table on its own
        mine = got[got.layout == layout].drop(columns="layout").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)


def test_summarize_mass_pools_prompt_ids_only_across_models_of_one_prompt_set():
    """Audit 100: rows of one prompt id were averaged as one prompt across every
    ``condition`` (as across seeds), but a study's conditions can use different tasks, so
    prompt 0 of one task was paired with prompt 0 of another. Conditions of 8 and 4
    different prompts (tiny kimi models) gave a mass 0.027 off the summary of the 12
    prompts, its interval 0.032 off and n_prompts 8; of 4 and 4, the mean was right but the
    interval was 0.093 off and n_prompts 4 for 8. Seeds of one condition with different
    prompt ids (4 and 8) weighed 1:3 in the mean (prompts 4-7 were the second's alone).
    Both are refused; numbered apart, conditions are summarised as their 12 prompts, and
    as models of one prompt set (a ``model`` column) the same prompts pool as before."""
    first = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    second = randomize_routing(tiny_model(attnres_layout="kimi"), seed=2).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, first.cfg.d_vocab, (12, 6), generator=generator)
    task_a = routing_mass(first, tokens[:8], positions="all").assign(condition="a", seed=0)
    task_b = routing_mass(second, tokens[8:], positions="all").assign(condition="b", seed=0)
    for n_a in (8, 4):
        part_a = task_a[task_a.prompt < n_a]
        with pytest.raises(ValueError, match=r"prompt ids of several conditions.*'condition'"):
            summarize_mass(pd.concat([part_a, task_b]), n_bootstrap=50)
        # numbered apart, (condition, prompt) is the unit: the summary of the n_a + 4
        # prompts as one routing_mass table (independent: one run per prompt set, renumbered)
        both = pd.concat([part_a, task_b])
        apart = both.assign(prompt=both.groupby(["condition", "prompt"]).ngroup())
        got = summarize_mass(apart, n_bootstrap=50)
        later = routing_mass(second, tokens[8:], positions="all")
        alone = pd.concat(
            [
                routing_mass(first, tokens[:n_a], positions="all"),
                later.assign(prompt=later.prompt + n_a),
            ]
        )
        pd.testing.assert_frame_equal(got, summarize_mass(alone, n_bootstrap=50), atol=1e-6)
        assert (got.n_prompts == n_a + 4).all()
    # two seeds of one condition (the same prompts): pooled per prompt, each prompt's mean
    # over both models' routers (independent: NumPy over the prompts)
    seeds = pd.concat(
        [
            routing_mass(first, tokens[:4], positions="all").assign(condition="a", seed=0),
            routing_mass(second, tokens[:4], positions="all").assign(condition="a", seed=1),
        ]
    )
    summary = summarize_mass(seeds, n_bootstrap=50)
    for row in summary.itertuples():
        group = seeds[(seeds.router == row.router) & (seeds.family == row.family)]
        assert row.mass == pytest.approx(group.groupby("prompt").mass.mean().mean(), abs=1e-12)
    assert (summary.n_prompts == 4).all()
    # a seed without some prompts the other has: its models would weigh less
    uneven = pd.concat([seeds[seeds.seed == 0], task_a.assign(seed=1)])
    with pytest.raises(ValueError, match=r"\{'seed': 0\} lacks prompt\(s\) \[4, 5, 6, 7\]"):
        summarize_mass(uneven, n_bootstrap=50)
    # conditions of one prompt set, labelled as models: pooled per prompt as the seeds
    relabelled = seeds.assign(seed=0, model=seeds.seed).drop(columns="condition")
    pd.testing.assert_frame_equal(summarize_mass(relabelled, n_bootstrap=50), summary)
    # grouped by condition, each condition is summarised alone (as many prompts each: a
    # group without some prompts is refused, test above)
    task_a = task_a[task_a.prompt < 4]
    by_condition = summarize_mass(
        pd.concat([task_a, task_b]), by=("condition", "router", "family"), n_bootstrap=50
    )
    for condition, part in (("a", task_a), ("b", task_b)):
        mine = by_condition[by_condition.condition == condition].drop(columns="condition")
        alone = summarize_mass(part.drop(columns=["condition", "seed"]), n_bootstrap=50)
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), alone)


def test_summarize_mass_by_condition_takes_conditions_of_different_prompt_counts():
    """With ``condition`` in ``by``, conditions of 8 and 4 prompts (different tasks) were
    refused as a filtered table ("the group ... has no rows for prompt(s) [4, 5, 6, 7]"),
    because one bootstrap resampled every group's prompts together. Each condition is its
    own prompt set now: its rows equal its summary alone (independent: each condition
    summarised by itself, and its mean by NumPy over its prompts)."""
    first = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    second = randomize_routing(tiny_model(attnres_layout="cumulative"), seed=2).eval()
    tokens = torch.randint(
        3, first.cfg.d_vocab, (12, 6), generator=torch.Generator().manual_seed(3)
    )
    parts = {
        "a": routing_mass(first, tokens[:8], positions="all").assign(condition="a", seed=0),
        "b": routing_mass(second, tokens[8:], positions="all").assign(condition="b", seed=0),
    }
    by = ("condition", "router", "family")
    got = summarize_mass(pd.concat(parts.values()), by=by, n_bootstrap=50)
    assert got.condition.tolist() == sorted(got.condition.tolist())  # a's rows, then b's
    for condition, part in parts.items():
        mine = got[got.condition == condition].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, summarize_mass(part, by=by, n_bootstrap=50))
        assert (mine.n_prompts == part.prompt.nunique()).all()
        for row in mine.itertuples():
            group = part[(part.router == row.router) & (part.family == row.family)]
            mean = group.groupby("prompt").mass.mean().to_numpy().mean()
            assert row.mass == pytest.approx(mean, abs=1e-12)


def test_summarize_mass_by_condition_keeps_the_row_order_of_one_summary():
    """Audit 104: with ``condition`` not first in ``by`` (``("router", "condition",
    "family")``), the conditions summarised one at a time came out as one block per
    condition (every router of ``a``, then of ``b``), where one summary of the table, as
    before, orders the rows by ``by`` (each router's ``a`` and ``b`` rows together). With
    conditions of equal prompt counts the table is what it was: rows in ``by`` order, and
    each row the summary of its condition alone."""
    first = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    second = randomize_routing(tiny_model(attnres_layout="kimi"), seed=2).eval()
    tokens = torch.randint(3, first.cfg.d_vocab, (8, 6), generator=torch.Generator().manual_seed(3))
    parts = {
        "a": routing_mass(first, tokens[:4], positions="all").assign(condition="a"),
        "b": routing_mass(second, tokens[4:], positions="all").assign(condition="b"),
    }
    for by in (("router", "condition", "family"), ("family", "condition")):
        got = summarize_mass(pd.concat(parts.values()), by=by, n_bootstrap=50)
        # one summary's order: by each column's values in the table's order
        table = pd.concat(parts.values())
        rank = [{v: i for i, v in enumerate(table[c].unique())} for c in by]
        keys = [tuple(r[v] for r, v in zip(rank, row, strict=True)) for row in got[list(by)].values]
        assert keys == sorted(keys), by
        for condition, part in parts.items():
            alone = summarize_mass(part, by=by, n_bootstrap=50)
            mine = got[got.condition == condition].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, alone)


def test_summarize_mass_refuses_nan_labels_rather_than_drop_their_rows():
    """A NaN in a ``by`` column (or ``prompt``) made pandas leave those rows out of every
    group: with layer 0's band NaN, the early band's mass was layer 1's alone, silently;
    with a NaN condition (``condition`` in by) it failed on an empty bootstrap matrix. Both
    are refused, naming the column and the rows; the filled table is summarised."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model, tokens, positions="all")
    early = mass.band == "early"
    assert early.any() and (mass.layer[early] == 0).any() and (mass.layer[early] > 0).any()
    holed = mass.assign(band=mass.band.where(mass.layer != 0))
    n_holed = int(holed.band.isna().sum())
    with pytest.raises(ValueError, match=rf"NaN labels .*'band': {n_holed}\}}.*fillna"):
        summarize_mass(holed, by=("band", "family"), n_bootstrap=50)
    twice = pd.concat([mass.assign(condition="a"), mass.assign(condition=np.nan)])
    with pytest.raises(ValueError, match=rf"'condition': {len(mass)}\}}"):
        summarize_mass(twice, by=("condition", "router", "family"), n_bootstrap=50)
    with pytest.raises(ValueError, match=r"'prompt': 1\}"):
        summarize_mass(mass.assign(prompt=mass.prompt.where(mass.index != 0)), n_bootstrap=50)
    # filled, the band is summarised over all its layers (independent: NumPy per prompt)
    filled = summarize_mass(holed.fillna({"band": "early"}), by=("band", "family"), n_bootstrap=50)
    row = filled[(filled.band == "early") & (filled.family == "current")].iloc[0]
    part = mass[early & (mass.family == "current")]
    assert row.mass == pytest.approx(part.groupby("prompt").mass.mean().mean(), abs=1e-12)


def test_routing_mass_refuses_per_prompt_positions_rather_than_flatten_them():
    """Audit 93: positions as a [batch, 1] tensor (or a nested list), one position per
    prompt, were flattened and averaged at every prompt: 0.66 off the mass each prompt has
    at its own position (4-layer kimi model). They are refused, as the interventions
    refuse them; one position per prompt is answer_pos=, checked against the cache."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    per_prompt = torch.tensor([[2], [5], [3]])
    for positions in (per_prompt, per_prompt.tolist()):
        with pytest.raises(ValueError, match=r"flat list .*got shape \(3, 1\).*answer_pos="):
            routing_mass(model, tokens, positions=positions)
    mass = routing_mass(model, tokens, answer_pos=per_prompt[:, 0])
    _, cache = model.run_with_cache(tokens)  # independent: each prompt's own position
    for site in model.sites():
        weights = cache[site.hook("weights")][torch.arange(3), per_prompt[:, 0]]  # [3, n]
        for family, indices in model.source_families(site).items():
            got = mass[(mass.router == site.kind) & (mass.layer == site.table_layer)]
            got = got[got.family == family].sort_values("prompt").mass.to_numpy()
            expected = weights[:, indices].sum(-1) if indices else torch.zeros(3)
            np.testing.assert_allclose(got, expected.double().numpy(), atol=1e-6)


def _percentile_bootstrap(values: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """Independent reference: each row ``[rows, n]`` resampled with the prompts of one
    ``default_rng(seed).integers(0, n, (n_resamples, n))`` draw, and the ``(1 - c) / 2``,
    ``(1 + c) / 2`` quantiles (NumPy's default, linear) of the resampled means."""
    index = np.random.default_rng(seed).integers(0, values.shape[1], (n_resamples, values.shape[1]))
    means = np.stack([row[index].mean(axis=1) for row in values])  # [rows, n_resamples]
    alpha = (1 - confidence) / 2
    return values.mean(axis=1), *np.quantile(means, [alpha, 1 - alpha], axis=1)


@pytest.mark.parametrize("n_resamples,confidence,seed", [(1000, 0.95, 0), (257, 0.9, 7)])
def test_bootstrap_is_the_percentile_bootstrap_of_an_independent_implementation(
    n_resamples, confidence, seed
):
    rng = np.random.default_rng(11)
    values = np.vstack([rng.exponential(size=23), rng.normal(size=23), np.full(23, 0.1)])
    got = bootstrap_ci_rows(values, n_resamples, confidence, seed)
    want = _percentile_bootstrap(values, n_resamples, confidence, seed)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
    # reproducible, and a row's interval is independent of the other rows
    again = bootstrap_ci_rows(values[::-1], n_resamples, confidence, seed)
    for g, a in zip(got, again, strict=True):
        np.testing.assert_array_equal(g, a[::-1])
    assert bootstrap_ci(values[1], n_resamples, confidence, seed) == pytest.approx(
        (got[0][1], got[1][1], got[2][1]), abs=1e-12
    )
    # constant data: a zero-width interval at the mean
    assert got[1][2] == got[0][2] == got[2][2]
    # two prompts: a resampled mean is a, (a + b) / 2 or b with probabilities 1/4, 1/2,
    # 1/4, so (with 1000 resamples, P(fewer than 50 draws of a) < 1e-40) the interval is
    # [min, max]; one prompt has no interval (tests/test_catalogue.py)
    assert bootstrap_ci([0.3, -1.2], 1000, 0.9, seed) == pytest.approx(
        (-0.45, -1.2, 0.3), abs=1e-15
    )
    # another seed draws other prompts
    assert bootstrap_ci_rows(values, n_resamples, confidence, seed + 1)[1][0] != got[1][0]


def test_bootstrap_with_fewer_resamples_than_its_level_needs_warns():
    """Audit finding: any n_resamples >= 1 was taken silently; with 1 the "95 % interval"
    is one resampled mean (zero width, 0 % coverage), with 10 it covers the true mean of
    N(2, 3^2) samples of 30 in 75 % of 400 datasets (1000 resamples: 93 %). Fewer than
    2 / (1 - confidence) resamples (less than one resampled mean per tail the interval cuts
    off, n * (1 - confidence) / 2 < 1) now warn. Review 202: the warning said "fewer than
    one resampled mean beyond each bound", which no count of two or more resamples leaves
    (10 resamples: the lowest mean is below the low bound, the highest above the high)."""
    data = np.random.default_rng(0).normal(2.0, 3.0, size=(400, 30))

    def coverage(n_resamples: int) -> float:
        _, low, high = bootstrap_ci_rows(data, n_resamples, 0.95, seed=1)
        return float(np.mean((low <= 2.0) & (2.0 <= high)))

    with pytest.warns(RuntimeWarning, match=r"n_resamples=10 .* 95 % interval .* at least 40"):
        few = coverage(10)
    # what the old wording denied: one resampled mean of 10 lies beyond each bound
    means = data[0][np.random.default_rng(5).integers(0, 30, (10, 30))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    assert (means < low).sum() == 1 and (means > high).sum() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        many = coverage(1000)
        bootstrap_ci_rows(data[:2], 40, 0.95)  # 40 resamples: 40 * 2.5 % = 1 per tail
        bootstrap_ci_rows(data[:2], 20, 0.9)
    # the binomial standard error of a coverage over 400 datasets is at most 0.025:
    # 1000 resamples are within 3 of the level, 10 more than 6 below it
    assert many >= 0.95 - 3 * 0.025 and few <= 0.95 - 6 * 0.025
    with pytest.warns(RuntimeWarning, match="per 0.5 % tail of a 99 % interval .*at least 200"):
        bootstrap_ci_rows(data[:2], 199, 0.99)
    with pytest.warns(RuntimeWarning, match="n_resamples=1 "):
        _, low, high = bootstrap_ci([0.0, 1.0], n_resamples=1)
    assert low == high  # one resampled mean: what the warning is about


def test_an_effects_interval_is_the_bootstrap_of_the_paired_per_prompt_differences():
    """``effect`` and ``[ci_low, ci_high]`` of ablation_effects recomputed independently:
    the ablation as a hook setting the family's router logits to -inf, the metric read
    from plain forward passes, the interval the NumPy percentile bootstrap of the
    per-prompt differences ablated - clean (paired: the same prompts resampled for both),
    not of two independently resampled means."""
    task = KeyValueRetrieval(n_pairs=4, n_keys=8, n_values=8)
    tokenizer = task_tokenizer(task)
    model = tiny_model(
        d_vocab=len(tokenizer), attnres_layout="cumulative", n_layers=4, dtype=torch.float64
    )
    model = randomize_routing(model, seed=2, scale=4.0).eval()
    batch = task.sample(32, seed=5, split="test", vocab=tokenizer.get_vocab())
    effects = ablation_effects(
        model,
        batch,
        families=["current", "embedding"],
        routers="mlp_res",
        groups={"early": [0, 1]},
        metrics=("logit_diff",),
        n_bootstrap=500,
        confidence=0.9,
        seed=3,
        progress=False,
    )
    with torch.no_grad():
        clean = batch.logit_diff(model(batch.tokens)).double().numpy()  # [32]
    index = np.random.default_rng(3).integers(0, len(batch), (500, len(batch)))
    for family in ("current", "embedding"):
        hooks = []
        for layer in (0, 1):
            site = model.site(layer, "mlp_res")
            masked = model.routing_layout.families(site)[family]

            def mask(logits, hook, masked=masked):
                logits = logits.clone()
                logits[..., masked] = float("-inf")
                return logits

            hooks.append((site.hook("logits"), mask))
        with torch.no_grad():
            ablated = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=hooks))
        differences = ablated.double().numpy() - clean  # [32]
        low, high = np.quantile(differences[index].mean(axis=1), [0.05, 0.95])
        row = effects[effects.family == family].iloc[0]
        assert row.confidence == 0.9
        assert row.effect == pytest.approx(differences.mean(), abs=1e-12)
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), abs=1e-12)
        # the unpaired interval (clean and ablated resampled apart) is another, wider one
        other = np.random.default_rng(4).integers(0, len(batch), (500, len(batch)))
        unpaired = ablated.double().numpy()[index].mean(1) - clean[other].mean(1)
        unpaired_low, unpaired_high = np.quantile(unpaired, [0.05, 0.95])
        assert unpaired_high - unpaired_low > 10 * (high - low)  # here about 500x


def test_recency_schedule_refuses_an_unknown_mode_and_full_mode_is_the_formula():
    """Audit finding: recency_schedule(mode="Full") (any mode but "full") returned the
    block-mode schedule (RoutingLayout reads any other mode as "block"): for 4 layers and
    2 blocks, mean current weight 0.9310 where the full-mode schedule is 0.8242."""
    for mode in ("Full", "blocks", "snapshot"):
        with pytest.raises(ValueError, match=rf"^mode must be one of .*, got {mode!r}$"):
            recency_schedule(4, 2, 3.0, mode)
    # full mode, independently: a snapshot after every sublayer, so the router of
    # sublayer k (2 * layer for attention, 2 * layer + 1 for the MLP) has k + 1 others
    schedule = recency_schedule(4, 2, 3.0, "full")
    e = math.exp(3.0)
    for (layer, router), group in schedule.families.groupby(["layer", "router"]):
        k = 2 * layer + (router == "mlp_res")
        current = group[group.family == "current"].weight.iloc[0]
        assert current == pytest.approx(e / (e + k + 1), abs=1e-15)
    expected = np.mean([e / (e + k + 1) for k in range(8)])
    assert schedule.mean_current == pytest.approx(expected, abs=1e-15)
    # and a zero-query full-mode model routes so
    model = tiny_model(attnres_layout="cumulative", attnres_mode="full", attnres_recency_bias=3.0)
    _, cache = model.eval().run_with_cache(torch.randint(0, 50, (2, 5)))
    assert schedule_deviation(model, cache, schedule) <= 1e-6


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values])


def test_dissociation_spearman_with_ties_is_the_pearson_correlation_of_average_ranks():
    families = list(FAMILIES)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mass_values = rng.choice([0.1, 0.2, 0.3], size=4)  # ties
        effect_values = rng.choice([-0.5, -0.2, 0.2, 1.0], size=4)  # |effect| ties too
        mass = pd.DataFrame(
            {"router": "mlp_res", "family": families, "mass": mass_values, "ci_low": 0.0}
        ).assign(ci_high=1.0, family_read=True, layers="0,1,2")
        effects = pd.DataFrame(
            {
                "router": "mlp_res",
                "group": "all",
                "layers": "0,1,2",
                "metric": "logit_diff",
                "family": families,
                "effect": effect_values,
                "ci_low": effect_values - 0.1,
                "ci_high": effect_values + 0.1,
                "n_masked_routers": 2,
            }
        )
        got = dissociation_report(mass, effects).iloc[0].spearman
        ranks_m = _average_ranks(mass_values)
        ranks_e = _average_ranks(np.abs(effect_values))
        if ranks_m.std() == 0 or ranks_e.std() == 0:
            assert np.isnan(got)
            continue
        dm, de = ranks_m - ranks_m.mean(), ranks_e - ranks_e.mean()
        assert got == pytest.approx((dm @ de) / np.sqrt((dm @ dm) * (de @ de)), abs=1e-12)


def test_summarize_mass_does_not_depend_on_the_row_order_of_the_table():
    """Property-test finding (session 14): the bootstrap resampled the prompts in the
    order they first appeared in the table, so the same table with its rows reordered
    (sorted by mass, concatenated from filtered parts) got other intervals with the same
    seed (0.048 apart, kimi); every ordering now gives the interval of the prompts in id
    order, against the independent NumPy bootstrap."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    mass = routing_mass(model, _padded_batch(model.cfg.d_vocab))
    index = np.random.default_rng(3).integers(0, 4, size=(100, 4))
    for order in (mass.sort_values("mass"), mass.sample(frac=1.0, random_state=2)):
        summary = summarize_mass(order, by=("router", "family"), n_bootstrap=100, seed=3)
        for row in summary.itertuples():
            group = mass[(mass.router == row.router) & (mass.family == row.family)]
            per_prompt = group.groupby("prompt").mass.mean().sort_index().to_numpy()
            low, high = np.quantile(per_prompt[index].mean(axis=1), [0.025, 0.975])
            assert (row.mass, row.ci_low, row.ci_high) == pytest.approx(
                (per_prompt.mean(), low, high), abs=1e-12
            )


def test_schedule_comparison_refuses_nan_labels_rather_than_drop_their_rows():
    """Audit 109: a NaN layer (or family, or router) in a mass table left its rows out of
    schedule_comparison's groupby: with layer 1's rows of prompt 0 NaN, layer 1's measured
    mass was that of the other prompts, 0.013 off (4-layer cumulative model). Refused,
    naming the column and its rows; the measured mass is each cell's mean over prompts."""
    model = randomize_routing(tiny_model(attnres_layout="cumulative"), seed=1).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    mass = routing_mass(model, tokens, positions="all")
    cfg = model.cfg
    schedule = recency_schedule(cfg.n_layers, cfg.attnres_num_blocks, 3.0, cfg.attnres_mode)
    table = schedule_comparison(mass, schedule)
    for row in table.itertuples():  # independent: NumPy over the cell's prompts
        cell = mass[
            (mass.router == row.router) & (mass.layer == row.layer) & (mass.family == row.family)
        ]
        assert len(cell) == 4
        assert row.measured == pytest.approx(np.mean(cell.mass.to_numpy()), abs=1e-12)
    hole = (mass.layer == 1) & (mass.prompt == 0)
    with pytest.raises(ValueError, match=rf"NaN labels .*\{{'layer': {int(hole.sum())}\}}"):
        schedule_comparison(mass.assign(layer=mass.layer.where(~hole)), schedule)
    with pytest.raises(ValueError, match=r"\{'router': 1, 'family': 1\}"):
        schedule_comparison(
            mass.assign(
                family=mass.family.where(mass.index != 3), router=mass.router.where(mass.index != 9)
            ),
            schedule,
        )


def test_bootstrap_ci_refuses_values_that_are_not_one_axis():
    """Audit 138: a number (``bootstrap_ci(3.0)``) failed with NumPy's "too many indices
    for array: array is 0-dimensional"; a table of rows named the rows' function's shape."""
    from hooked_attnres.analysis import bootstrap_ci

    with pytest.raises(ValueError, match=r"^values must be \[n\] .*got shape \(\); for several"):
        bootstrap_ci(3.0)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\); for several rows .*_rows"):
        bootstrap_ci(np.ones((2, 3)))


def test_bootstrap_ci_of_no_values_names_their_own_shape():
    """Review 185: ``bootstrap_ci([])`` was refused as "values must be [rows, n] with n >=
    1, got shape (1, 0)": the shape of the one-row table it builds for `bootstrap_ci_rows`,
    not of what the caller passed, and a form ([rows, n]) the caller did not use."""
    from hooked_attnres.analysis import bootstrap_ci

    for empty in ([], np.zeros(0), torch.zeros(0)):
        with pytest.raises(
            ValueError,
            match=r"^values must hold at least one number \(one per prompt\), got shape \(0,\)",
        ):
            bootstrap_ci(empty)


def test_bootstrap_refuses_text_and_reads_numbers_of_any_kind():
    """Audit 145: ``bootstrap_ci(["1", "2"])`` returned (1.5, 1.0, 2.0): NumPy parsed the
    strings as numbers. Text (a str array, a pandas string or object column holding text)
    is refused; booleans, numbers in an object array and NumPy integers are read as the
    numbers they are (the same interval as their float64 values)."""
    from hooked_attnres.analysis import bootstrap_ci, bootstrap_ci_rows

    for text in (["1", "2"], pd.Series(["1", "2"]), pd.Series(["1", "2"], dtype="string")):
        with pytest.raises(TypeError, match=r"^values must be numbers .*astype\(float\)"):
            bootstrap_ci(text, n_resamples=50)
    with pytest.raises(TypeError, match="holding text"):
        bootstrap_ci_rows(np.array([[1.0, "2"]], dtype=object), n_resamples=50)
    numbers = [1.0, 0.0, 1.0, 1.0]
    expected = bootstrap_ci(np.array(numbers), n_resamples=50)
    for same in (
        [True, False, True, True],
        np.array(numbers, dtype=object),
        np.array([1, 0, 1, 1]),
        pd.Series([1, 0, 1, 1], dtype="Int64"),
    ):
        assert bootstrap_ci(same, n_resamples=50) == expected


def test_bootstrap_refuses_values_of_no_real_dtype_without_calling_them_text():
    """Review of audit 145: ``as_numpy`` refused a complex or datetime array (NumPy had
    dropped the imaginary part with a warning, or read the dates as counts of days) with
    the message for text, "text is not parsed as numbers; convert it first (e.g.
    table[column].astype(float))", a wrong reason and, for complex values, a remedy that
    drops the imaginary part again; they are refused as no real numbers."""
    from hooked_attnres.analysis import bootstrap_ci

    for values, dtype in (
        (np.array([1 + 1j, 2 + 0j]), "complex128"),
        (np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[D]"), r"datetime64\[D\]"),
    ):
        with pytest.raises(TypeError, match=rf"^values must be real numbers .*dtype {dtype};") as e:
            bootstrap_ci(values, n_resamples=50)
        assert "text" not in str(e.value)


def test_too_few_resamples_warning_writes_the_level_as_the_report_and_figures_do():
    """The warning wrote the level with Python's ``.0%``: a 99.9 % interval read "a 100%
    interval" (a level no interval has), where the report and the figures write "99.9 %"
    (`level_text`, one rule for the level's text)."""
    from hooked_attnres.analysis.bootstrap import too_few_resamples_text

    assert "of a 99.9 % interval (it needs at least 2000)" in too_few_resamples_text("n=10", 0.999)
    assert "of a 95 % interval (it needs at least 40)" in too_few_resamples_text("n=10", 0.95)


def test_level_text_never_rounds_a_level_to_one_no_interval_has():
    """Review 182: `level_text` wrote ``100 * confidence`` with ``:g`` (six significant
    digits), so a 99.99999 % interval (``confidence=0.9999999``, which the bootstrap takes)
    read "100 %" in the too-few-resamples warning, the report and the figures, the fault
    audit 177 fixed for ``.0%``: a level no interval has. Six significant digits, more
    where those read 100 % (or 0 %)."""
    from hooked_attnres.analysis.bootstrap import level_text, too_few_resamples_text

    for confidence in (0.95, 0.999, 0.9999999, 0.99999999999, 0.8, 0.123456789, 1e-9):
        text = level_text(confidence)
        assert text.endswith(" %"), text
        percent = float(text[: -len(" %")])
        assert 0 < percent < 100 and percent / 100 == pytest.approx(confidence, rel=1e-5), text
    assert level_text(0.9999999) == "99.99999 %" and level_text(0.99999999999) == "99.999999999 %"
    assert level_text(0.95) == "95 %" and level_text(0.999) == "99.9 %"
    # a float32 0.95 (0.949999988...) still reads as the level it was meant to be
    assert level_text(np.float32(0.95)) == "95 %"
    assert "of a 99.99999 % interval" in too_few_resamples_text("n=10", 0.9999999)
