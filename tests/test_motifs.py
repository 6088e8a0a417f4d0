"""The pre-registered motif and dissociation detector on synthetic tables with known answers:
each criterion true, false, and at its boundary (docs/study.md, "Pre-registered criteria")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hooked_attnres.analysis import (
    CLAIMS,
    motif_report,
    motif_verdicts,
    verdict_changes,
    verdict_word,
)
from hooked_attnres.analysis.motifs import same_top_family

FAMILIES = ("embedding", "older", "prev_completed", "current")
GROUPS = ("early", "middle", "late", "all")
# the layers of each group (as ablation_effects writes them) of a 6-layer model
LAYERS = {"early": "0,1", "middle": "2,3", "late": "4,5", "all": "0,1,2,3,4,5"}


def tables(effects=None, accuracy=None, mass=None, clean=10.0, seed=None):
    """(mass_summary, effects): every effect 0 with interval [-0.01, 0.01], accuracy effects 0,
    masses 0.25, except the given ``{(router, group, family): (effect, low, high)}``,
    ``{(router, group, family): accuracy effect}`` and ``{(router, family): mass}``."""
    effects, accuracy, mass = effects or {}, accuracy or {}, mass or {}
    rows = []
    for router in ("attn_res", "mlp_res"):
        for group in GROUPS:
            for family in FAMILIES:
                e, lo, hi = effects.get((router, group, family), (0.0, -0.01, 0.01))
                rows.append(
                    dict(
                        router=router,
                        group=group,
                        layers=LAYERS[group],
                        family=family,
                        metric="logit_diff",
                        clean=clean,
                        effect=e,
                        ci_low=lo,
                        ci_high=hi,
                        n_masked_routers=1,  # every family masked at one router
                        skipped="",
                    )
                )
                a = accuracy.get((router, group, family), 0.0)
                rows.append(
                    dict(
                        router=router,
                        group=group,
                        layers=LAYERS[group],
                        family=family,
                        metric="accuracy",
                        clean=1.0,
                        effect=a,
                        ci_low=a - 0.01,
                        ci_high=a + 0.01,
                        n_masked_routers=1,
                        skipped="",
                    )
                )
    summary = pd.DataFrame(
        [
            dict(
                router=r,
                band="all",
                family=f,
                mass=mass.get((r, f), 0.25),
                family_read=True,
                layers=LAYERS["all"],
            )
            for r in ("attn_res", "mlp_res")
            for f in FAMILIES
        ]
    )
    effect_table = pd.DataFrame(rows)
    if seed is not None:
        summary["seed"], effect_table["seed"] = seed, seed
    return summary, effect_table


def present(report, claim) -> bool:
    return bool(report.set_index("claim").loc[claim, "present"])


def harmful(effect, width=0.2):
    return (effect, effect - width, effect + width)


def test_motif_report_refuses_mass_of_other_layers_than_the_effects_group_all():
    """Audit 129: D1 and D3 pair the summary's mass over every layer (band "all") with the
    effects of group "all" by name only, so effects whose group "all" masked layers 0-1
    were compared with the mass of layers 0-5. The summary's ``layers`` must be the
    group's; a summary without the column (the stored docs/results files, written before
    audit 129) is read as every layer only beside the study's sweep (group "all" of every
    layer, the depth bands of its count), and refused beside other groups."""
    summary, effects = tables(mass={("attn_res", "current"): 0.4})
    expected = motif_report(summary, effects)
    short = effects.assign(layers=effects.layers.where(effects.group != "all", "0,1"))
    with pytest.raises(
        ValueError,
        match=r"^at router='attn_res', the mass summary's rows paired with group 'all' are of "
        r"layers \[0, 1, 2, 3, 4, 5\] but the effects of group 'all' masked layers \[0, 1\]",
    ):
        motif_report(summary, short)
    legacy = summary.drop(columns="layers")
    pd.testing.assert_frame_equal(motif_report(legacy, effects), expected)
    for other in (
        short,
        effects.assign(layers=effects.layers.where(effects.group != "early", "0")),
    ):
        with pytest.raises(ValueError, match=r"^mass_summary lacks the column 'layers'"):
            motif_report(legacy, other)


def test_where_nothing_matters_only_d3_holds():
    report = motif_report(*tables())
    assert list(report.claim) == list(CLAIMS)
    # prev_completed carries 0.25 of the mass with no effect: D3 by its definition
    assert set(report.claim[report.present]) == {"D3-attn_res", "D3-mlp_res"}


@pytest.mark.parametrize(
    "claim,router,band,family",
    [
        ("M1", "mlp_res", "early", "embedding"),
        ("M2-attn", "attn_res", "early", "current"),
        ("M2-mlp", "mlp_res", "early", "current"),
        ("M3", "attn_res", "late", "older"),
    ],
)
def test_each_motif_is_found_where_it_is_and_nowhere_else(claim, router, band, family):
    report = motif_report(*tables({(router, band, family): harmful(-1.0)}))
    assert present(report, claim)
    assert set(report.claim[report.present & (report.kind == "motif")]) == {claim}
    other_band = "middle"
    moved = motif_report(*tables({(router, other_band, family): harmful(-1.0)}))
    assert not present(moved, claim)


def test_m2_needs_both_router_types():
    one = motif_report(*tables({("attn_res", "early", "current"): harmful(-1.0)}))
    assert present(one, "M2-attn") and not present(one, "M2-mlp") and not present(one, "M2")
    both = motif_report(
        *tables(
            {
                ("attn_res", "early", "current"): harmful(-1.0),
                ("mlp_res", "early", "current"): harmful(-1.0),
            }
        )
    )
    assert present(both, "M2") and present(both, "M2-attn") and present(both, "M2-mlp")


def test_motif_criterion_1_the_interval_must_exclude_zero():
    cell = ("mlp_res", "early", "embedding")
    assert present(motif_report(*tables({cell: (-1.0, -1.5, -1e-9)})), "M1")
    assert not present(motif_report(*tables({cell: (-1.0, -1.5, 0.0)})), "M1")  # boundary
    assert not present(motif_report(*tables({cell: (-1.0, -2.0, 0.3)})), "M1")


def test_motif_criterion_2_five_percent_of_the_clean_logit_difference_or_two_points():
    cell = ("mlp_res", "early", "embedding")
    assert present(motif_report(*tables({cell: harmful(-1.0)}, clean=20.0)), "M1")  # exactly 5 %
    assert not present(motif_report(*tables({cell: harmful(-0.999)}, clean=20.0)), "M1")
    small = {cell: harmful(-0.5, width=0.1)}  # 2.5 % of 20
    assert present(motif_report(*tables(small, accuracy={cell: -0.02}, clean=20.0)), "M1")
    assert not present(motif_report(*tables(small, accuracy={cell: -0.0199}, clean=20.0)), "M1")


def test_motif_criterion_3_the_band_must_be_the_most_harmful():
    cell = ("mlp_res", "early", "embedding")
    stronger_later = {cell: harmful(-1.0), ("mlp_res", "late", "embedding"): harmful(-1.5)}
    assert not present(motif_report(*tables(stronger_later)), "M1")
    tie = {cell: harmful(-1.0), ("mlp_res", "middle", "embedding"): harmful(-1.0)}
    assert present(motif_report(*tables(tie)), "M1")  # a tie counts as localised
    report = motif_report(*tables(stronger_later)).set_index("claim")
    assert report.loc["M1", "largest_band"] == "late"


def test_a_band_tied_for_the_most_harm_is_named_with_the_motif_band():
    # M3 (older, late attention routers) tied with the early band: localised (a tie
    # counts), so present; the sentence must not name "early" alone as the most harmful
    # band next to "present" (it named the first band of the tie, in band order)
    tie = {
        ("attn_res", "late", "older"): harmful(-1.0),
        ("attn_res", "early", "older"): harmful(-1.0),
    }
    report = motif_report(*tables(tie, seed=0))
    row = report.set_index("claim").loc["M3"]
    assert bool(row.present)
    assert row.largest_band.split("|") == ["early", "late"]  # every band of the tie
    sentence = motif_verdicts(report).set_index("claim").loc["M3", "sentence"]
    assert "most harmful bands early and late (tied)" in sentence


def test_d1_top_mass_is_not_top_effect_with_separated_intervals():
    mass = {("attn_res", "current"): 0.6, ("attn_res", "embedding"): 0.1}
    separated = {
        ("attn_res", "all", "embedding"): (-2.0, -2.5, -1.5),
        ("attn_res", "all", "current"): (-0.5, -1.0, 0.0),
    }
    assert present(motif_report(*tables(separated, mass=mass)), "D1-attn_res")
    touching = {
        ("attn_res", "all", "embedding"): (-2.0, -2.5, -1.0),
        ("attn_res", "all", "current"): (-0.5, -1.0, 0.0),
    }
    assert not present(motif_report(*tables(touching, mass=mass)), "D1-attn_res")  # boundary
    same = {("attn_res", "all", "current"): (-2.0, -2.5, -1.5)}
    report = motif_report(*tables(same, mass=mass))
    assert not present(report, "D1-attn_res") and not present(report, "D1-mlp_res")


def test_d1_ties_for_the_top_are_decided_by_every_tied_family():
    """Amendment 4: the first family of a tie in the fixed family order used to decide D1
    (embedding and older tied for the largest harm: present with the narrow interval on
    embedding, absent with it on older). Every tied family must now satisfy D1."""
    mass = {("attn_res", "current"): 0.6}
    narrow, wide = (-2.0, -2.1, -1.9), (-2.0, -3.0, -0.05)
    base = {("attn_res", "all", "current"): (-0.5, -1.0, 0.0)}
    for first, second in ((narrow, wide), (wide, narrow)):
        effects = {
            **base,
            ("attn_res", "all", "embedding"): first,
            ("attn_res", "all", "older"): second,
        }
        row = motif_report(*tables(effects, mass=mass)).set_index("claim").loc["D1-attn_res"]
        assert row.top_effect == "embedding|older" and row.top_mass == "current"
        assert not row.present  # one tied family's interval overlaps current's
    both_narrow = {
        **base,
        ("attn_res", "all", "embedding"): narrow,
        ("attn_res", "all", "older"): narrow,
    }
    assert present(motif_report(*tables(both_narrow, mass=mass)), "D1-attn_res")
    # a family tied for the top mass that is also a top-effect family: the same family
    tied_mass = {("attn_res", "current"): 0.4, ("attn_res", "embedding"): 0.4}
    effects = {**base, ("attn_res", "all", "embedding"): narrow}
    row = motif_report(*tables(effects, mass=tied_mass)).set_index("claim").loc["D1-attn_res"]
    assert row.top_mass == "embedding|current" or row.top_mass == "current|embedding"
    assert not row.present and same_top_family(row.top_mass, row.top_effect)


def test_d2_embedding_mass_below_half_and_effect_at_least_twice_current():
    def d2(mass_embedding, effect_embedding, effect_current=(-0.5, -0.7, -0.3)):
        mass = {("mlp_res", "embedding"): mass_embedding, ("mlp_res", "current"): 0.4}
        effects = {
            ("mlp_res", "all", "embedding"): effect_embedding,
            ("mlp_res", "all", "current"): effect_current,
        }
        return present(motif_report(*tables(effects, mass=mass)), "D2")

    assert d2(0.19, (-1.0, -1.2, -0.8))
    assert not d2(0.2, (-1.0, -1.2, -0.8))  # mass exactly 0.5x: not below
    assert d2(0.19, (-1.0, -1.2, -0.8))  # effect exactly 2x: enough
    assert not d2(0.19, (-0.999, -1.2, -0.8))
    assert not d2(0.19, (-1.0, -2.0, 0.5))  # embedding's interval contains 0
    assert not d2(0.19, (-1.0, -2.0, 0.0))  # ci_high exactly 0: does not exclude 0
    # a current effect of about zero does not make any embedding effect "twice" it
    assert d2(0.19, (-0.3, -0.4, -0.2), effect_current=(0.1, 0.0, 0.2))


def test_d3_prev_completed_mass_without_detectable_effect():
    def d3(mass_pc, effect_pc, top=(-10.0, -11.0, -9.0)):
        effects = {
            ("attn_res", "all", "prev_completed"): effect_pc,
            ("attn_res", "all", "current"): top,
        }
        return present(
            motif_report(*tables(effects, mass={("attn_res", "prev_completed"): mass_pc})),
            "D3-attn_res",
        )

    assert d3(0.10, (0.0, -0.1, 0.1))  # exactly the mass threshold
    assert not d3(0.0999, (0.0, -0.1, 0.1))
    assert d3(0.2, (-0.999, -1.1, -0.9))  # excludes 0 but < 10 % of the top harm (10)
    assert not d3(0.2, (-1.0, -1.1, -0.9))  # exactly 10 %: not below
    assert d3(0.2, (-1.0, -1.1, 0.0))  # the interval ends at 0: it contains 0 (closed)
    assert d3(0.2, (1.0, 0.0, 1.1))  # ... at either end
    assert not d3(0.2, (1.0, 1e-12, 1.1))  # a harmless effect of 10 % excludes 0 too


def test_verdicts_across_seeds_say_k_of_n_and_the_preregistered_word():
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)} if seed < 2 else {}, seed=seed) for seed in range(3)]
    report = motif_report(pd.concat([p[0] for p in parts]), pd.concat([p[1] for p in parts]))
    assert list(report.seed.unique()) == [0, 1, 2]
    verdicts = motif_verdicts(report).set_index("claim")
    assert (verdicts.loc["M1", "k"], verdicts.loc["M1", "n"]) == (2, 3)
    assert verdicts.loc["M1", "verdict"] == "majority"
    assert verdicts.loc["M3", "verdict"] == "absent"
    sentence = verdicts.loc["M1", "sentence"]
    assert sentence.startswith("M1 (embedding through early MLP routers): present in 2 of 3 seeds")
    assert "seed 0: effect -1.00 [-1.20, -0.80] logits = 10.0 % of the clean 10.00" in sentence
    assert [verdict_word(k, 3) for k in range(4)] == [
        "absent",
        "minority",
        "majority",
        "replicated",
    ]
    # amendment 3: one seed replicates nothing
    assert verdict_word(1, 2) == "minority" and verdict_word(1, 1) == "single seed"
    assert verdict_word(0, 1) == "absent" and verdict_word(2, 2) == "replicated"
    with pytest.raises(ValueError, match="0 <= k <= n"):
        verdict_word(4, 3)


def test_verdict_changes_between_two_prompt_sets():
    cell = ("mlp_res", "early", "embedding")
    first = motif_report(*tables({cell: harmful(-1.0)}, seed=0))
    second = motif_report(*tables({}, seed=0))
    changed = verdict_changes(first, second)
    assert list(changed.claim) == ["M1"] and bool(changed.present_first.iloc[0])
    assert verdict_changes(first, first).empty


def test_verdict_changes_refuses_a_claim_twice_rather_than_miss_a_model():
    """Audit 109: a report with seed 0 twice and seed 1 missing has as many rows as the
    full other report, so the length check passed; the merge paired seed 0's rows twice
    and never compared seed 1, whose M1 changed: "no verdict changed". Refused, naming
    the repeated row; the full reports give seed 1's change (compared by hand)."""
    cell = ("mlp_res", "early", "embedding")
    first = pd.concat(
        [motif_report(*tables({cell: harmful(-1.0)}, seed=s)) for s in (0, 1)], ignore_index=True
    )
    second = pd.concat(
        [motif_report(*tables({cell: harmful(-1.0)}, seed=0)), motif_report(*tables({}, seed=1))],
        ignore_index=True,
    )
    changed = verdict_changes(first, second)
    by_hand = first.merge(second, on=["seed", "claim"])
    by_hand = by_hand[by_hand.present_x != by_hand.present_y]
    assert not by_hand.empty and set(by_hand.seed) == {1}
    assert changed[["seed", "claim"]].values.tolist() == by_hand[["seed", "claim"]].values.tolist()
    twice = pd.concat([first[first.seed == 0]] * 2, ignore_index=True)
    assert len(twice) == len(second)
    with pytest.raises(
        ValueError,
        match=r"the first report has several rows for seed=0, claim='M1': 2 rows of one "
        r"\('seed', 'claim'\)",
    ):
        verdict_changes(twice, second)


def test_verdict_changes_compares_models_told_apart_by_motif_reports_by():
    """Review of audit 109: motif_report and motif_verdicts take ``by`` (e.g. models
    labelled by a ``model`` column, as summarize_mass's message suggests for conditions of
    one task), but verdict_changes keyed on condition / seed only, so two such models of
    seed 0 were refused as "a report concatenated twice: pass each model once" (before
    audit 109: "do not cover the same models"). With ``by`` it compares them (merged by
    hand); without it the message names ``by``."""
    cell = ("mlp_res", "early", "embedding")

    def report(effects_of_b):
        parts = [
            [t.assign(model=model) for t in tables(effects, seed=0)]
            for model, effects in (("a", {cell: harmful(-1.0)}), ("b", effects_of_b))
        ]
        mass, effects = (pd.concat(list(t), ignore_index=True) for t in zip(*parts, strict=True))
        return motif_report(mass, effects, by=["model", "seed"])

    first, second = report({cell: harmful(-1.0)}), report({})
    keys = ["model", "seed", "claim"]
    by_hand = first.merge(second, on=keys)
    by_hand = by_hand[by_hand.present_x != by_hand.present_y]
    assert not by_hand.empty and set(by_hand.model) == {"b"}
    changed = verdict_changes(first, second, by=["model", "seed"])
    assert changed[keys].values.tolist() == by_hand[keys].values.tolist()
    with pytest.raises(ValueError, match=r"name it in by \(e.g. by=\['seed', 'model'\]\)"):
        verdict_changes(first, second)
    with pytest.raises(ValueError, match="the first report lacks the column 'task'"):
        verdict_changes(first, second, by=["task", "seed"])


def test_bad_tables_are_refused_with_what_to_do():
    summary, effects = tables()
    with pytest.raises(ValueError, match="needs the groups"):
        motif_report(summary, effects[effects.group != "all"])
    with pytest.raises(ValueError, match=r"mass_summary lacks the column\(s\) \[.mass.\]"):
        motif_report(summary.drop(columns="mass"), effects)
    with pytest.raises(ValueError, match="no 'logit_diff' rows"):
        motif_report(summary, effects[effects.metric == "accuracy"])
    with pytest.raises(ValueError, match=r"several rows for .*\('router', 'group', 'family'\)"):
        motif_report(summary, pd.concat([effects, effects]), by=[])


def test_a_mass_summary_without_every_family_at_every_router_is_refused_not_read_as_zero():
    from hooked_attnres.analysis import dissociation_report

    summary, effects = tables()
    # summarize_mass by (router, band, family): no band "all" rows, every mass would be 0
    per_band = pd.concat([summary.assign(band=band) for band in ("early", "middle", "late")])
    with pytest.raises(ValueError, match="no band 'all' rows .* by=\\('router', 'family'\\)"):
        motif_report(per_band, effects)
    dropped = summary[~((summary.router == "mlp_res") & (summary.family == "embedding"))]
    with pytest.raises(
        ValueError, match=r"lacks the \(router, family\) rows \[\('mlp_res', 'embedding'\)\]"
    ):
        motif_report(dropped, effects)
    with pytest.raises(
        ValueError, match=r"lacks the \(router, family\) rows \[\('mlp_res', 'embedding'\)\]"
    ):
        dissociation_report(dropped.drop(columns="band"), effects[effects.group == "all"])
    # with every row the masses are read as given (D2 reports them)
    report = motif_report(
        *tables(mass={("mlp_res", "embedding"): 0.1, ("mlp_res", "current"): 0.6})
    )
    d2 = report.set_index("claim").loc["D2"]
    assert (d2.mass_embedding, d2.mass_current) == (0.1, 0.6)


def test_criterion_2_as_written_and_as_amended_differ_only_where_the_answer_is_not_preferred():
    """Amendment 1: with clean <= 0 the 5 % test does not apply (only accuracy can make an
    effect large); `present_as_written` is the verdict of the criterion as first written,
    where any harm is at least 5 % of a non-positive clean difference."""
    cell = ("mlp_res", "early", "embedding")
    for clean, amended, as_written in ((10.0, True, True), (0.0, False, True), (-2.0, False, True)):
        report = motif_report(*tables({cell: harmful(-1.0)}, clean=clean)).set_index("claim")
        assert report.loc["M1", "present"] == amended
        assert report.loc["M1", "present_as_written"] == as_written
    # too small for 5 % of a positive clean difference: absent in both readings
    report = motif_report(*tables({cell: harmful(-0.1)}, clean=10.0)).set_index("claim")
    assert not report.loc["M1", "present"] and not report.loc["M1", "present_as_written"]
    # M2 needs both parts in either reading; dissociations are the same in both
    both = {
        ("attn_res", "early", "current"): harmful(-1.0),
        ("mlp_res", "early", "current"): harmful(-1.0),
    }
    report = motif_report(*tables(both, clean=-1.0)).set_index("claim")
    assert report.loc["M2", "present_as_written"] and not report.loc["M2", "present"]
    dissociations = report[report.kind == "dissociation"]
    assert (dissociations.present == dissociations.present_as_written).all()


def test_verdicts_of_several_unlabelled_seeds_are_refused():
    report = motif_report(*tables())
    with pytest.raises(ValueError, match="2 rows for M1 and no 'seed' column"):
        motif_verdicts(pd.concat([report, report]))
    assert motif_verdicts(report).set_index("claim").loc["M1", "n"] == 1


def test_a_model_that_does_not_prefer_the_answer_meets_the_size_criterion_only_by_accuracy():
    cell = ("mlp_res", "early", "embedding")
    harm = {cell: harmful(-1.0)}
    for clean in (0.0, -2.0):
        report = motif_report(*tables(harm, clean=clean))
        assert not present(report, "M1")  # 5 % of a non-positive difference is undefined
        assert (
            "the answer is not preferred"
            in motif_verdicts(report.assign(seed=0)).set_index("claim").loc["M1", "sentence"]
        )
        by_accuracy = motif_report(*tables(harm, accuracy={cell: -0.05}, clean=clean))
        assert present(by_accuracy, "M1")
        # the sentence shows the number that met criterion 2
        sentence = motif_verdicts(by_accuracy.assign(seed=0)).set_index("claim").loc["M1"]
        assert "present in 1 of 1 seed" in sentence.sentence
        assert "(the answer is not preferred), accuracy -5.0 points" in sentence.sentence
    # a large effect whose accuracy moves less than 2 points: the accuracy is not shown
    report = motif_report(*tables(harm, accuracy={cell: -0.01}, clean=10.0)).assign(seed=0)
    sentence = motif_verdicts(report).set_index("claim").loc["M1", "sentence"]
    assert "= 10.0 % of the clean 10.00, most harmful band early" in sentence
    assert "accuracy" not in sentence
    # a stored report without the column, concatenated with a newer one: its rows read
    # NaN there, which once printed their accuracy as if it had met criterion 2
    old = report.assign(seed=1).drop(columns="large_by_accuracy")
    sentence = motif_verdicts(pd.concat([report, old], ignore_index=True))
    sentence = sentence.set_index("claim").loc["M1", "sentence"]
    assert (
        "seed 1: effect -1.00 [-1.20, -0.80] logits = 10.0 % of the clean 10.00, most" in sentence
    )
    assert "accuracy" not in sentence


def test_attribution_estimates_are_refused_where_measured_effects_are_needed():
    from hooked_attnres.analysis import dissociation_report

    summary, effects = tables()
    estimates = effects.assign(method="linear", estimate=effects.effect)
    with pytest.raises(ValueError, match="needs measured effects"):
        motif_report(summary, estimates)
    with pytest.raises(ValueError, match="needs measured effects"):
        dissociation_report(summary.drop(columns="band"), estimates[estimates.group == "all"])


def test_the_report_gives_both_readings_of_criterion_2_and_calls_one_seed_a_single_seed(
    tmp_path,
):
    from hooked_attnres.study.report import _conclusion
    from hooked_attnres.study.run import StudyResult

    cell = ("mlp_res", "early", "embedding")
    parts = []
    for seed in range(3):  # harmful where the answer is not preferred: absent as amended
        summary, effects = tables({cell: harmful(-1.0)}, clean=-1.0, seed=seed)
        parts.append(motif_report(summary, effects).assign(condition="hard_cumulative_L8"))
    summary, effects = tables({cell: harmful(-1.0)}, clean=10.0, seed=0)
    parts.append(motif_report(summary, effects).assign(condition="attnres"))  # one seed
    motifs = pd.concat(parts, ignore_index=True)
    empty = pd.DataFrame()
    result = StudyResult(
        tmp_path,
        empty,
        empty,
        empty,
        empty,
        empty,
        empty,
        empty,
        motifs=motifs,
        verdicts=motif_verdicts(motifs),
    )
    lines = _conclusion(result)
    assert (
        "M1: replicated or majority in 0 of 1 Block AttnRes conditions with several seeds; "
        "present in the single seed of attnres." in lines
    )
    differ = [line for line in lines if line.startswith("Criterion 2 as first written")]
    assert differ == [
        "Criterion 2 as first written (amendment 1 in docs/study.md) decides 3 per-seed "
        "verdict(s) differently: "
        + "; ".join(
            f"hard_cumulative_L8 seed {s} M1: present as written, absent as amended"
            for s in range(3)
        )
        + "."
    ]
    verdicts = result.verdicts.set_index(["condition", "claim"])
    assert verdicts.loc[("attnres", "M1"), "verdict"] == "single seed"


def test_non_finite_numbers_are_refused_not_read_as_absent():
    """Audit finding: NaN compares False, so an effect table of one prompt (NaN intervals)
    read as "absent" everywhere, and a NaN harm in one band decided localisation by the
    order of the bands (M3 present with NaN in the middle band, absent with it in the early
    band). Every number a verdict reads must be finite."""
    nan = float("nan")
    late = ("attn_res", "late", "older")
    for band in ("early", "middle"):
        cells = {late: harmful(-2.0), ("attn_res", band, "older"): (nan, nan, nan)}
        with pytest.raises(ValueError, match=f"non-finite effect .*group='{band}'.*2 prompts"):
            motif_report(*tables(cells))
    summary, effects = tables()
    one_prompt = effects.assign(ci_low=nan, ci_high=nan, n_prompts=1)
    with pytest.raises(ValueError, match="non-finite ci_low .* from 1 prompt"):
        motif_report(summary, one_prompt)
    # audit 196: the count was printed as int(n_prompts): 1.5 (rows averaged over tables)
    # read "from 1 prompt(s)", and a missing count failed with Python's "cannot convert
    # float NaN to integer" in place of the refusal; the count is printed as it is
    with pytest.raises(ValueError, match=r"non-finite ci_low \(nan\) .* from 1\.5 prompt"):
        motif_report(summary, one_prompt.assign(n_prompts=1.5))
    with pytest.raises(ValueError, match=r"family='embedding'; the pre-registered verdicts"):
        motif_report(summary, one_prompt.assign(n_prompts=nan))
    with pytest.raises(ValueError, match="non-finite clean"):
        motif_report(*tables(clean=nan))
    with pytest.raises(ValueError, match="accuracy effects hold a non-finite effect"):
        motif_report(*tables(accuracy={("mlp_res", "early", "embedding"): nan}))
    with pytest.raises(ValueError, match="non-finite mass at router='mlp_res', family='current'"):
        motif_report(*tables(mass={("mlp_res", "current"): nan}))
    # rows the verdicts do not read may hold anything (e.g. a final router's group)
    summary, effects = tables()
    extra = effects.iloc[:1].assign(router="final_res", group="final", effect=nan)
    assert len(motif_report(summary, pd.concat([effects, extra]))) == len(CLAIMS)


def test_dissociation_report_refuses_non_finite_numbers():
    """Audit finding: a NaN effect sorted to an arbitrary place, so NaN at ``embedding`` made
    it the top-effect family over ``older`` (effect -3)."""
    from hooked_attnres.analysis import dissociation_report

    nan = float("nan")
    older = {("attn_res", "all", "older"): (-3.0, -3.2, -2.8)}
    summary, effects = tables(older)
    top = dissociation_report(
        summary.drop(columns="band"), effects[effects.group == "all"].assign(n_masked_routers=1)
    )
    assert top.set_index("router").loc["attn_res", "top_abs_effect"] == "older"
    for cell in ((nan, nan, nan), (-0.5, nan, nan)):
        summary, effects = tables({**older, ("attn_res", "all", "embedding"): cell})
        with pytest.raises(ValueError, match="'attn_res', family 'embedding': a non-finite"):
            dissociation_report(
                summary.drop(columns="band"),
                effects[effects.group == "all"].assign(n_masked_routers=1),
            )
    summary, effects = tables(older, mass={("mlp_res", "current"): nan})
    with pytest.raises(ValueError, match="'mlp_res', family 'current': a non-finite"):
        dissociation_report(
            summary.drop(columns="band"), effects[effects.group == "all"].assign(n_masked_routers=1)
        )


def test_intervals_of_another_level_than_95_percent_are_refused():
    """Audit finding: the criteria read 95 % intervals, but an effects table of
    ``ablation_effects(confidence=0.5)`` was read as if it were one (criterion 1 met by a
    50 % interval). The table records its level and motif_report checks it."""
    from helpers import tiny_model

    from hooked_attnres.analysis import ablation_effects, routing_mass, summarize_mass
    from hooked_attnres.interventions.selection import depth_bands
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    task = KeyValueRetrieval(n_pairs=2, n_keys=8, n_values=8)
    tokenizer = task_tokenizer(task)
    model = tiny_model(n_layers=3, attnres_num_blocks=3, d_vocab=len(tokenizer)).eval()
    batch = task.sample(6, 0, "test", tokenizer.get_vocab())
    groups = {**depth_bands(3), "all": [0, 1, 2]}
    summary = summarize_mass(routing_mass(model, batch), n_bootstrap=20)
    for level in (0.95, 0.5):
        effects = ablation_effects(
            model, batch, groups=groups, n_bootstrap=20, confidence=level, progress=False
        )
        assert (effects.confidence == level).all()
        if level == 0.95:
            assert len(motif_report(summary, effects)) == len(CLAIMS)
        else:
            with pytest.raises(ValueError, match=r"holds \[0.5\] intervals.*confidence=0.95"):
                motif_report(summary, effects)


def test_d3_can_hold_with_a_detectable_effect_and_its_sentence_says_so():
    """D3 passes with an effect whose interval excludes 0 when the effect is under 0.10 of
    the top harm (hard_cumulative_L8 seed 0, attention routers: -0.01 [-0.02, -0.01]
    against a harm of 8.29); its generated sentence called that 'no detectable effect'."""
    effects = {
        ("attn_res", "all", "prev_completed"): (-0.05, -0.07, -0.03),
        ("attn_res", "all", "current"): harmful(-2.0),
    }
    report = motif_report(*tables(effects))
    assert present(report, "D3-attn_res")
    sentence = motif_verdicts(report).set_index("claim").loc["D3-attn_res", "sentence"]
    assert "no detectable effect" not in sentence
    assert "interval contains 0 or |effect| < 0.10x the top harm" in sentence
    assert "effect -0.05 [-0.07, -0.03]" in sentence and "harm 2.00" in sentence


def test_an_effects_table_without_accuracy_is_refused_not_read_as_no_accuracy_drop():
    """Audit finding: without ``accuracy`` rows criterion 2's "or at most -0.02 accuracy"
    silently never held (M1 with 2.5 % of the clean difference and -5 points read absent,
    present with the rows); a table lacking one accuracy cell raised a bare KeyError."""
    cell = ("mlp_res", "early", "embedding")
    summary, effects = tables({cell: harmful(-0.5, width=0.1)}, accuracy={cell: -0.05}, clean=20.0)
    assert present(motif_report(summary, effects), "M1")  # by the accuracy criterion
    with pytest.raises(ValueError, match="no 'accuracy' rows.*criterion 2's 2 points"):
        motif_report(summary, effects[effects.metric == "logit_diff"])
    lacking = (
        (effects.metric == "accuracy")
        & (effects.router == "mlp_res")
        & (effects.group == "early")
        & (effects.family == "embedding")
    )
    with pytest.raises(
        ValueError, match=r"'accuracy' effects lack .* \[\('mlp_res', 'early', 'embedding'\)\]"
    ):
        motif_report(summary, effects[~lacking])


def test_effects_with_several_clean_logit_differences_are_refused():
    """Audit finding: criterion 2 read the clean logit difference of the table's first row;
    a table mixing two prompt sets (clean 100 first, 20 at the motif) read M1 absent, 5 %
    of 100, where its own rows say 5 % of 20."""
    cell = ("mlp_res", "early", "embedding")
    summary, effects = tables({cell: harmful(-1.0)}, clean=20.0)
    assert present(motif_report(summary, effects), "M1")
    effects.loc[effects.index[0], "clean"] = 100.0
    with pytest.raises(ValueError, match=r"2 different clean logit differences \(\[20.0, 100.0\]"):
        motif_report(summary, effects)


def test_every_summarised_model_needs_its_effects_and_a_label():
    """Audit finding: a seed in the mass summary but not in the effects table, or a seed
    label that is NaN (pandas' groupby drops it), left the count of seeds: M1, present in
    all 3 seeds, read "2 of 2 (replicated)"."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    effects = pd.concat([p[1] for p in parts], ignore_index=True)
    verdicts = motif_verdicts(motif_report(summary, effects)).set_index("claim")
    assert (verdicts.loc["M1", "k"], verdicts.loc["M1", "n"]) == (3, 3)
    with pytest.raises(ValueError, match=r"models that the effects table lacks: \[\{'seed': 2\}\]"):
        motif_report(summary, effects[effects.seed != 2])
    unlabelled = effects.assign(seed=effects.seed.where(effects.seed != 2))  # NaN for seed 2
    n_unlabelled = int((effects.seed == 2).sum())
    with pytest.raises(ValueError, match=rf"effects has NaN labels .*\{{'seed': {n_unlabelled}\}}"):
        motif_report(summary, unlabelled)


def test_k_of_n_counts_each_seed_once():
    """Audit finding: ``n`` counted rows, not seeds: a report with seed 0 twice read M1
    "4 of 4 seeds" (3 seeds), and one without seed 2's M1 row read "2 of 2 (replicated)"
    while its M3 read "0 of 3"."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    report = motif_report(
        pd.concat([p[0] for p in parts], ignore_index=True),
        pd.concat([p[1] for p in parts], ignore_index=True),
    )
    with pytest.raises(ValueError, match=r"claim M1 needs one row per seed, but seed\(s\) \[0\] "):
        motif_verdicts(pd.concat([report, report[report.seed == 0]]))
    lacking = report[~((report.seed == 2) & (report.claim == "M1"))]
    with pytest.raises(
        ValueError, match=r"M1 needs one row per seed, but seed\(s\) \[2\] have none"
    ):
        motif_verdicts(lacking)
    n_unlabelled = int((report.seed == 1).sum())
    with pytest.raises(
        ValueError, match=rf"the report has NaN labels .*\{{'seed': {n_unlabelled}\}}"
    ):
        motif_verdicts(report.assign(seed=report.seed.where(report.seed != 1)))


def test_a_two_point_accuracy_drop_of_whole_prompts_meets_criterion_2_exactly():
    """Criterion 2 reads "at most -0.02": 1 of 50, 2 of 100, ... prompts losing their
    answer must meet it exactly (per-prompt accuracies of whole prompts are float32 0/1; the
    effect must be the correctly rounded k/n, not a float32 mean a hair above -0.02; tied
    prompts' shares: test_analysis.py::test_a_drop_of_tied_prompts_meets_criterion_2_exactly)."""
    import numpy as np

    from hooked_attnres.analysis.bootstrap import bootstrap_ci_rows
    from hooked_attnres.analysis.motifs import PREREGISTERED

    for k, n in ((1, 50), (2, 100), (3, 150), (4, 200), (5, 250)):
        lost = np.zeros((1, n), dtype=np.float32)
        lost[0, :k] = -1.0
        mean = bootstrap_ci_rows(lost, 20)[0][0]
        assert mean == -k / n and mean <= -PREREGISTERED.min_accuracy_drop


def test_dissociation_report_names_every_family_tied_for_the_top():
    """Audit finding: ties for the top were broken by family name, so ``embedding`` tied
    with ``current`` for the most mass and with the largest effect read "top mass current,
    top effect embedding, not the same family" (D1's amendment 4 counts it as the same)."""
    from hooked_attnres.analysis import dissociation_report

    tied_mass = {("attn_res", "embedding"): 0.4, ("attn_res", "current"): 0.4}
    tied_mass.update({("attn_res", "older"): 0.1, ("attn_res", "prev_completed"): 0.1})
    effects = {("attn_res", "all", "embedding"): (-2.0, -2.5, -1.5)}
    summary, table = tables(effects, mass=tied_mass)
    row = dissociation_report(
        summary.drop(columns="band"), table[table.group == "all"].assign(n_masked_routers=1)
    ).set_index("router")
    attn = row.loc["attn_res"]
    assert set(attn.top_mass.split("|")) == {"embedding", "current"}
    assert attn.top_abs_effect == "embedding" and attn.top_mass_is_top_abs_effect
    d1 = motif_report(summary, table).set_index("claim").loc["D1-attn_res"]
    assert same_top_family(d1.top_mass, d1.top_effect)  # the pre-registered D1 agrees
    # mlp: every mass 0.25 and every effect 0: all four families tie for both tops
    mlp = row.loc["mlp_res"]
    assert len(mlp.top_mass.split("|")) == 4 and mlp.top_mass_is_top_abs_effect


def fake_study(tmp_path, seeds_present, settings=None, changed=()):
    """A `StudyResult` of synthetic tables: ``{condition: [seed, ...]}`` with M1 harmful
    (present) at the seeds listed in ``seeds_present[condition][1]`` of the seeds
    ``seeds_present[condition][0]``; ``changed``: (condition, seed) whose M1 flips on the
    second prompt set."""
    from hooked_attnres.study.run import StudyResult

    cell = ("mlp_res", "early", "embedding")
    summaries, effects, fresh, accuracy = [], [], [], []
    for condition, (seeds, present_at) in seeds_present.items():
        for seed in seeds:
            here = seed in present_at
            summary, effect = tables({cell: harmful(-1.0)} if here else {}, seed=seed)
            summaries.append(summary.assign(condition=condition, ci_low=0.2, ci_high=0.3))
            effects.append(effect.assign(condition=condition))
            flip = (condition, seed) in changed
            again = tables({cell: harmful(-1.0)} if here != flip else {}, seed=seed)
            fresh.append(motif_report(*again).assign(condition=condition))
            accuracy.append(
                dict(condition=condition, seed=seed, accuracy=0.5, logit_diff=10.0, n_prompts=64)
            )
    mass_summary, effect_table = pd.concat(summaries), pd.concat(effects)
    motifs = motif_report(mass_summary, effect_table)
    fresh_motifs = pd.concat(fresh, ignore_index=True)
    empty = pd.DataFrame()
    return StudyResult(
        tmp_path,
        pd.DataFrame(accuracy),
        empty,
        mass_summary,
        effect_table,
        empty,
        empty,
        empty,
        motifs=motifs,
        verdicts=motif_verdicts(motifs),
        fresh_motifs=fresh_motifs,
        robustness=verdict_changes(motifs, fresh_motifs),
        settings=settings or {},
    )


def test_the_verdict_lines_use_the_preregistered_words_and_name_the_wrapped_baselines(tmp_path):
    """They said "M1: does not hold" where M1 was a minority (1 of 3 seeds), and left out the
    recency-wrapped baselines, where a motif can be replicated (paperlike_vanilla_L8 M2,
    3 of 3, on the shipped checkpoints)."""
    from hooked_attnres.study.report import _conclusion, study_report

    result = fake_study(
        tmp_path,
        {
            "hard_cumulative_L8": ([0, 1, 2], [1]),
            "paperlike_cumulative_L8": ([0, 1, 2], [0, 2]),
            "attnres": ([0], []),
            "hard_vanilla_L8": ([0, 1, 2], [0, 1, 2]),
        },
    )
    lines = {line.split(":")[0]: line for line in _conclusion(result)}
    assert lines["M1"] == (
        "M1: replicated or majority in 1 of 2 Block AttnRes conditions with several seeds "
        "(paperlike_cumulative_L8 2/3 majority); minority in hard_cumulative_L8 1/3; absent in "
        "the single seed of attnres; recency-wrapped vanilla baselines: hard_vanilla_L8 3/3 "
        "replicated."
    )
    # a claim present in no Block AttnRes seed is reported as not replicated (docs/study.md)
    assert lines["M3"].endswith(
        "absent in every seed of every Block AttnRes condition: not replicated; "
        "recency-wrapped vanilla baselines: hard_vanilla_L8 0/3 absent."
    )
    # the words are defined as docs/study.md defines them
    text = study_report(result)
    for word in ("*replicated* (k = n)", "*majority* (n/2 < k < n)", "*minority* (0 < k <= n/2)"):
        assert word.replace("*", "") in text


def test_the_report_states_the_preregistered_criteria_formula_for_formula(tmp_path):
    """Every formula of docs/study.md's motif and dissociation criteria is in the report,
    as written there (the report used to give only the claims' short labels, whose D1 lacked
    the separated intervals and D2 the embedding interval excluding 0)."""
    import re

    from hooked_attnres.analysis.motifs import claim_text
    from hooked_attnres.study.report import study_report

    docs = (Path(__file__).parents[1] / "docs" / "study.md").read_text()
    section = docs[docs.index("**Inputs**") : docs.index("**Across seeds.**")]
    formulas = {
        " ".join(f.split())
        for f in re.findall(r"`([^`]+)`", section)
        if any(op in f for op in ("<", ">", "*"))
    }
    assert len(formulas) >= 6  # the docs' formulas were found
    text = " ".join(study_report(fake_study(tmp_path, {"hard_cumulative_L8": ([0], [])})).split())
    missing = [f for f in formulas if f not in text]
    assert not missing
    assert "accuracy effect of the same ablation is at most -0.02 (2 points)" in text
    assert "95 % percentile-bootstrap intervals" in text
    assert "8 layers: early 0-2, middle 3-5, late 6-7" in text  # the docs' bands
    # the claims' labels carry each criterion's conditions, not the claim alone
    assert "effect intervals are separated" in claim_text("D1-attn_res")
    assert "effect intervals are separated" in claim_text("D1-mlp_res")
    assert "interval excluding 0" in claim_text("D2")


def test_the_report_tables_and_seeds_summary_refuse_mass_of_other_layers_than_group_all(
    tmp_path,
):
    """Audit 148: the study report's tables and the seeds summary paired the mass of band
    "all" with the effects of group "all" by name: a 6-layer model's mass (attention
    embedding 0.563, prev_completed 0.104) was printed beside the effects of a 3-layer
    model's layers 0-2 (whose own mass is 0.581 and 0). Both read `every_layer_mass` now
    (the rule `require_same_layers`, as the figures and motif_report)."""
    import dataclasses

    from hooked_attnres.study.report import study_report
    from hooked_attnres.study.run import _seeds_summary

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1], [1])})
    effects = result.effects
    short = effects.assign(layers=effects.layers.where(effects.group != "all", "0,1"))
    head = (
        r"^at router='attn_res', condition='hard_cumulative_L8', seed=0, the mass summary's "
        r"rows paired with group 'all' are of layers \[0, 1, 2, 3, 4, 5\] but the effects of "
        r"group 'all' masked layers \[0, 1\]: "
    )
    with pytest.raises(ValueError, match=head + "the study report's tables would show"):
        study_report(dataclasses.replace(result, effects=short))
    with pytest.raises(ValueError, match=head + "the seeds summary would show"):
        _seeds_summary(result.mass_summary, short)
    # of the same layers: each seed's every-layer mass beside its effects of group "all"
    summary = _seeds_summary(result.mass_summary, effects).set_index(["router", "family"])
    every = result.mass_summary[result.mass_summary.band == "all"]
    expected = every.groupby(["router", "family"]).mass.mean()
    pd.testing.assert_series_equal(summary.mass.sort_index(), expected, check_names=False)
    assert (summary.n_seeds == 2).all()


def test_the_report_tables_and_seeds_summary_refuse_tables_of_other_models(tmp_path):
    """Audit 148: the seeds summary merged the mass and the effects by condition and seed,
    so a seed one of them lacked fell out of the mean over seeds without a word (n_seeds 1
    of 2), and the report's tables printed a model the mass summary lacked as an empty
    table. Both refuse tables of other models (`require_same_models`)."""
    import dataclasses

    from hooked_attnres.study.report import study_report
    from hooked_attnres.study.run import _seeds_summary

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1], [1])})
    one_seed = result.mass_summary[result.mass_summary.seed == 0]
    lacks = r"effects holds models that mass_summary lacks: \[\{'condition': 'hard_cumulative_L8', "
    with pytest.raises(ValueError, match=r"^the seeds summary: the rows .* are paired .*" + lacks):
        _seeds_summary(one_seed, result.effects)
    with pytest.raises(
        ValueError, match=r"^the study report's tables: the rows .* are paired .*" + lacks
    ):
        study_report(dataclasses.replace(result, mass_summary=one_seed))
    fewer = result.accuracy[result.accuracy.seed == 0]
    with pytest.raises(
        ValueError, match=r"^the study report's tables: the rows of accuracy and effects are paired"
    ):
        study_report(dataclasses.replace(result, accuracy=fewer))


@pytest.mark.parametrize("table", ["accuracy", "mass_summary", "effects"])
def test_the_report_tables_refuse_seeds_of_numbers_beside_seeds_of_text(tmp_path, table):
    """Review 157: `require_same_models` reads a ``seed`` column holding numbers in one table
    and text in another (0 beside '0', a table read back as text) as a column the tables do
    not share, so the report's tables passed it, then matched each model's rows with ``==``
    and found none: every model's table was printed empty, its mass and effects left out
    without a word. Refused naming the column, the tables and the remedy."""
    import dataclasses

    from hooked_attnres.study.report import study_report

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1], [1])})
    # the tables as given print each model's rows (8 of each: 2 router types x 4 families)
    text = study_report(result)
    for seed in (0, 1):
        section = text.split(f"### hard_cumulative_L8, seed {seed}")[1].split("###")[0]
        assert section.count("| attn_res |") == 4 and section.count("| mlp_res |") == 4
    labels = getattr(result, table)
    as_text = dataclasses.replace(result, **{table: labels.assign(seed=labels.seed.astype(str))})
    with pytest.raises(
        ValueError,
        match=rf"^the column 'seed' holds .* the study result's {table} table.*: 1 and '1' "
        r"would be two different labels, so no row would match; give both one dtype first",
    ):
        study_report(as_text)


def test_the_report_says_which_per_seed_verdicts_the_second_prompt_set_changes(tmp_path):
    from hooked_attnres.study.report import _conclusion

    result = fake_study(
        tmp_path,
        {"hard_cumulative_L8": ([0, 1, 2], [1])},
        settings={"n_prompts": 64, "fresh_probe_seed": 2},
        changed=[("hard_cumulative_L8", 0), ("hard_cumulative_L8", 1)],
    )
    line = next(x for x in _conclusion(result) if x.startswith("On a second"))
    assert line == (
        "On a second, disjoint set of 64 held-out prompts per model (data seed 2), 2 of 30 "
        "per-seed verdicts changed: hard_cumulative_L8 seed 0 M1 absent -> present; "
        "hard_cumulative_L8 seed 1 M1 present -> absent."
    )


def test_the_accuracy_table_names_the_model_wrap_and_prompts_of_each_number(tmp_path):
    """A vanilla condition's accuracy is its recency-wrapped model's, which computes another
    function than the trained Qwen3 (hard_vanilla_L8: 0.137 / 0.105 / 0.109 wrapped against
    0.133 / 0.086 / 0.109 plain); the report used to give it unlabelled."""
    from hooked_attnres.study import load_condition
    from hooked_attnres.study.report import study_report

    result = fake_study(
        tmp_path,
        {"hard_cumulative_L8": ([0], []), "hard_vanilla_L8": ([0], [])},
        settings={"probe_seed": 1, "recency_bias": 3.0},
    )
    text = study_report(result)
    table = text[text.index("## Accuracy") : text.index("## Tables")]
    wrapped = load_condition("hard_vanilla_L8", 0).cfg  # the model the study measures
    assert wrapped.attnres_layout == "cumulative"
    model = (
        f"vanilla Qwen3 through the recency wrap ({wrapped.attnres_num_blocks} blocks, "
        f"recency bias {wrapped.attnres_recency_bias:g}), not the plain model"
    )
    header = "| condition | seed | model | prompts | n_prompts | accuracy | logit_diff |"
    assert header in table
    assert f"| hard_vanilla_L8 | 0 | {model} | test split, data seed 1 | 64 |" in table
    trained = load_condition("hard_cumulative_L8", 0).cfg
    assert (
        f"| hard_cumulative_L8 | 0 | Block AttnRes, {trained.attnres_layout}, as trained | "
        "test split, data seed 1 | 64 |"
    ) in table
    assert "A vanilla condition's rows are not the trained Qwen3's own accuracy" in table
    assert f"### hard_vanilla_L8 ({model}, 8 layers, task hard)" in text


def test_d3_sentences_print_the_size_test_with_the_digits_that_decide_it():
    """On the shipped paperlike_cumulative_L8, D3-mlp read "effect -0.00 [-0.00, -0.00]
    (top family current, harm 0.02)" for seed 0 (absent: |effect| 0.00252 >= 0.1 x 0.02174)
    and "-0.00 [-0.00, -0.00] (..., harm 0.03)" for seed 1 (present): the printed numbers
    could not tell the two verdicts apart."""
    pc, cur = ("mlp_res", "all", "prev_completed"), ("mlp_res", "all", "current")
    cases = {
        0: {pc: (-0.0025, -0.0042, -0.0008), cur: (-0.0217, -0.03, -0.01)},  # 0.0025 >= 0.00217
        1: {pc: (-0.0029, -0.0049, -0.0009), cur: (-0.0313, -0.04, -0.02)},  # 0.0029 < 0.00313
        2: {pc: (-0.0013, -0.0027, 0.0001), cur: (-0.0359, -0.05, -0.02)},  # interval holds 0
    }
    parts = [tables(effects, seed=seed) for seed, effects in cases.items()]
    report = motif_report(pd.concat([p[0] for p in parts]), pd.concat([p[1] for p in parts]))
    rows = report[report.claim == "D3-mlp_res"].set_index("seed")
    assert list(rows.present) == [False, True, True]
    sentence = motif_verdicts(report).set_index("claim").loc["D3-mlp_res", "sentence"]
    seed0, seed1, seed2 = sentence.split("; seed ")
    assert seed0.endswith("harm 0.02), |effect| 0.0025 >= 0.0022 = 0.10x the top harm")
    assert seed1.endswith("harm 0.03), |effect| 0.0029 < 0.0031 = 0.10x the top harm")
    assert seed2.endswith("harm 0.04).") and "|effect|" not in seed2  # criterion met by the 0
    # a report stored before the limit was a column: the sentence as before, no guessed limit
    old = motif_verdicts(report.drop(columns="effect_limit")).set_index("claim")
    assert old.loc["D3-mlp_res", "sentence"].endswith("(top family current, harm 0.04).")
    assert ", |effect| 0.00" not in old.loc["D3-mlp_res", "sentence"]


def test_the_verdicts_say_when_the_robustness_check_was_not_run(tmp_path):
    """docs/study.md pre-registers the robustness check; a study run without it
    (robustness=False, the motifs notebook) left it out of the verdicts without a word."""
    from hooked_attnres.study import verdict_sentences

    ran = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1, 2], [1])})
    assert any(line.startswith("On a second, disjoint set") for line in verdict_sentences(ran))
    skipped = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1, 2], [1])})
    skipped.fresh_motifs = skipped.fresh_motifs.iloc[:0]  # what run_study(robustness=False) keeps
    lines = verdict_sentences(skipped)
    assert lines[-1] == (
        "The verdicts were not recomputed on a second, disjoint set of held-out prompts: "
        "this run skipped the robustness check of docs/study.md."
    )
    assert not any(line.startswith("On a second") for line in lines)


def test_the_verdict_lines_keep_the_baselines_claims_without_a_block_attnres_condition(tmp_path):
    """A study of recency-wrapped baselines only (`hooked-attnres study --conditions
    vanilla`) had no claim line at all: the shipped vanilla's M2-attn (1 of 1) and
    paperlike_vanilla_L8's M2 (3 of 3) left the verdicts without a word; and a study whose
    Block AttnRes conditions have one seed each read "replicated or majority in 0 of 0
    Block AttnRes conditions with several seeds"."""
    from hooked_attnres.study import verdict_sentences

    alone = fake_study(tmp_path, {"hard_vanilla_L8": ([0, 1, 2], [0, 1, 2])})
    lines = {line.split(":")[0]: line for line in verdict_sentences(alone)}
    assert lines["M1"] == (
        "M1: no Block AttnRes condition was studied; recency-wrapped vanilla baselines: "
        "hard_vanilla_L8 3/3 replicated."
    )
    assert lines["M3"].endswith("hard_vanilla_L8 0/3 absent.")
    assert all(claim in lines for claim in CLAIMS)
    single = fake_study(tmp_path, {"attnres": ([0], [0]), "vanilla": ([0], [])})
    lines = {line.split(":")[0]: line for line in verdict_sentences(single)}
    assert lines["M1"] == (
        "M1: present in the single seed of attnres; recency-wrapped vanilla baselines: "
        "vanilla 0/1 absent."
    )
    assert lines["M3"] == (
        "M3: absent in the single seed of attnres; absent in every seed of every Block AttnRes "
        "condition: not replicated; recency-wrapped vanilla baselines: vanilla 0/1 absent."
    )


@pytest.mark.parametrize("label", [float("nan"), "0"])
def test_accuracy_table_refuses_the_seed_labels_the_report_refuses(tmp_path, label):
    """`accuracy_table` (public since audit 130, the motifs notebook's table) showed a
    table whose seed column holds a NaN or mixes 0 and '0' (two rows both reading seed 0,
    of different models), where `study_report` refuses the same result (`require_keys`)."""
    from hooked_attnres.study import accuracy_table
    from hooked_attnres.study.report import study_report

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1], [])})
    accuracy = result.accuracy.astype({"seed": object})
    accuracy.loc[accuracy.index[1], "seed"] = label
    result.accuracy = accuracy
    why = "NaN labels" if label != "0" else "mixes text and numbers"
    for show in (accuracy_table, study_report):
        with pytest.raises(ValueError, match=f"the study result's accuracy table.*{why}"):
            show(result)


def test_the_accuracy_table_prints_the_same_digits_in_markdown_and_html(tmp_path):
    """pandas' HTML pads a float column to common digits and the Markdown printed each
    float as Python does: the shipped report's paperlike_vanilla_L16-like row read "0.18"
    in report.md and "0.180" in report.html, and a logit difference 1.6 against 1.60."""
    import re

    from hooked_attnres.study.report import study_report, study_report_html

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1], [])})
    result.accuracy = result.accuracy.assign(accuracy=[0.18, 0.59375], logit_diff=[1.6, 0.0123])
    text = study_report(result)
    markdown = [line.split(" | ")[-2:] for line in text.splitlines() if "| 64 |" in line]
    assert markdown == [["0.180", "1.60 |"], ["0.594", "0.01 |"]]
    page = study_report_html(result)
    cells = re.findall(r"<td>64</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>", page)
    assert cells == [("0.180", "1.60"), ("0.594", "0.01")]


def test_per_seed_sentences_print_the_digits_that_decide_each_threshold():
    """The sentences printed each number at fixed digits: an effect of 4.996 % of the clean
    difference read "5.0 %" in a motif absent for its size (criterion 2: 5 %), a
    prev_completed mass of 0.0996 read "mass 0.100" in an absent D3 (>= 0.10), and a D2
    whose masses and effects pass read "mass 0.100 vs 0.400, effect -0.50 vs -0.10"
    without the embedding interval (ci_high +0.01) that made it absent, and D2's effects of
    a model at chance, -0.003 against -0.004 (not twice), read "-0.00 vs -0.00"."""

    def sentence(claim, effects, mass=None, clean=10.0):
        report = motif_report(*tables(effects, mass=mass, clean=clean, seed=0))
        row = report.set_index("claim").loc[claim]
        verdict = motif_verdicts(report).set_index("claim").loc[claim, "sentence"]
        return bool(row.present), verdict

    cell = ("mlp_res", "early", "embedding")
    held, text = sentence("M1", {cell: harmful(-0.49996, width=0.1)})
    assert not held and "= 4.9996 % of the clean 10.00" in text  # 5.0 would read as met
    held, text = sentence("M1", {cell: harmful(-0.5, width=0.1)})  # exactly 5 %: met
    assert held and "= 5.0 % of the clean 10.00" in text
    held, text = sentence("M1", {cell: harmful(-0.3, width=0.1)})  # the usual one decimal
    assert not held and "= 3.0 % of the clean 10.00" in text
    pc = ("attn_res", "all", "prev_completed")
    held, text = sentence("D3-attn_res", {pc: (0.0, -0.1, 0.1)}, {("attn_res", pc[2]): 0.0996})
    assert not held and "seed 0: mass 0.0996, effect" in text
    held, text = sentence("D3-attn_res", {pc: (0.0, -0.1, 0.1)}, {("attn_res", pc[2]): 0.1})
    assert held and "seed 0: mass 0.100, effect" in text
    d2 = {("mlp_res", "embedding"): 0.1, ("mlp_res", "current"): 0.4}
    emb, cur = ("mlp_res", "all", "embedding"), ("mlp_res", "all", "current")
    held, text = sentence("D2", {emb: (-0.5, -0.9, 0.01), cur: (-0.1, -0.2, -0.05)}, d2)
    assert not held and text.endswith(
        "seed 0: mass 0.100 vs 0.400, effect -0.50 vs -0.10, but embedding's effect interval "
        "does not exclude 0 (ci_high +0.01)."
    )
    held, text = sentence("D2", {emb: (-0.5, -0.9, -0.01), cur: (-0.1, -0.2, -0.05)}, d2)
    assert held and text.endswith("seed 0: mass 0.100 vs 0.400, effect -0.50 vs -0.10.")
    # effects of about 0 (a model at chance): -0.003 is not twice -0.004, "-0.00" is "-0.00"
    held, text = sentence("D2", {emb: (-0.003, -0.006, -0.001), cur: (-0.004, -0.01, -0.001)}, d2)
    assert not held and text.endswith("seed 0: mass 0.100 vs 0.400, effect -0.003 vs -0.004.")
    d2_close = {("mlp_res", "embedding"): 0.19996, ("mlp_res", "current"): 0.40006}  # 0.4998x
    held, text = sentence("D2", {emb: (-0.5, -0.9, -0.1), cur: (-0.1, -0.2, -0.05)}, d2_close)
    assert held and "seed 0: mass 0.2000 vs 0.4001, effect -0.50 vs -0.10" in text  # not 0.200


def _side(x) -> int:
    return (x > 0) - (x < 0)


def _near(value: float, steps: int) -> float:
    """``value`` moved ``steps`` floats up (or down, negative)."""
    import math

    for _ in range(abs(steps)):
        value = math.nextafter(value, math.inf if steps > 0 else -math.inf)
    return value


_THRESHOLDS = [5.0, 0.1, 0.0, 1e-6, -0.25, 0.3, 1 / 3, 7e-300, 1e14, -2.0]
_SPECS = [("f", 1), ("f", 3), ("+f", 2), ("e", 1)]


@settings(max_examples=400, deadline=None)
@given(
    threshold=st.one_of(
        st.sampled_from(_THRESHOLDS),
        # a threshold as a sentence writes one, a short decimal (a float whose exact value
        # has digits past its repr's at the printed places, 562949953421312.8 printed
        # "...312.750" beside it, is no sentence's threshold)
        st.builds(lambda m, k: float(f"{m}e{k}"), st.integers(-(10**6), 10**6), st.integers(-9, 3)),
    ),
    spec=st.sampled_from(_SPECS),
    how=st.sampled_from(["ulps", "offset", "any"]),
    steps=st.integers(-4, 4),
    offset=st.floats(-30, 3),
    anything=st.floats(allow_nan=False, allow_infinity=False),
)
def test_printed_beside_reads_on_the_values_side_of_its_threshold(
    threshold, spec, how, steps, offset, anything
):
    """A reader of the printed number compares its decimal text (exactly, as a Decimal) with
    the threshold as Python writes it (repr, the shortest text that reads back as it) and
    must find the value's side (below, at, above), for values a few floats from the
    threshold, at 10**offset from it, and anywhere; the decimals printed are the asked ones
    or one more than the place where value and threshold first differ (a bound: no
    17-digit print of an ordinary number)."""
    import math
    from decimal import Decimal

    from hooked_attnres.analysis.motifs import printed_beside

    if how == "ulps":
        value = _near(threshold, steps)
    elif how == "offset":
        value = threshold + math.copysign(10.0**offset, steps or 1)
    else:
        value = anything
    assume(math.isfinite(value))
    kind, digits = spec
    text = printed_beside(value, threshold, digits, kind)
    assert _side(Decimal(text) - Decimal(repr(threshold))) == _side(value - threshold), text
    gap = abs(value - threshold)
    if kind.endswith("f") and 1e-12 < gap and abs(value) < 1e6 and abs(threshold) < 1e6:
        places = len(text.split(".")[1]) if "." in text else 0
        assert places <= max(digits, math.floor(-math.log10(gap)) + 1), (value, text)
    asked = format(value, f"{kind[:-1]}.{digits}{kind[-1]}")
    if value == threshold and float(asked) == threshold:
        assert text == asked  # a tie at a threshold the asked digits write: as asked


@settings(max_examples=400, deadline=None)
@example(other=-1 / 3, steps=0, tied=True, anything=0.0)  # a tie: repr's digits misread it
# 2 * other overflows to an effect of -inf (no table's, but printed_deciding's): the exact
# reading keeps an infinity as the float it is (Fraction(inf) raised OverflowError)
@example(other=-8.98846567431158e307, steps=0, tied=True, anything=0.0)
@given(
    other=st.one_of(
        st.floats(-1, 1),
        st.sampled_from([0.0, 0.4, -0.004, 0.3, 1 / 3, 1e-300, -1e-300]),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    steps=st.integers(-3, 3),
    tied=st.booleans(),
    anything=st.floats(allow_nan=False, allow_infinity=False),
)
def test_d2_numbers_read_as_their_tests_decide(other, steps, tied, anything):
    """D2's two tests read from the printed masses / effects (exact decimal arithmetic, the
    ratios 0.5 and 2 as written) decide as the values do, at ties and a few floats off."""
    from decimal import Decimal, localcontext

    from hooked_attnres.analysis.motifs import _d2_effect, _d2_mass, printed_deciding

    # normal floats: a subnormal's shortest repr, doubled, may name another float
    # (-2.2250738585e-313 doubled reads as its next float up, -4.450147717e-313)
    assume(other == 0 or abs(other) > 1e-300)
    assume(anything == 0 or abs(anything) > 1e-300)
    mass = _near(0.5 * other, steps) if tied else anything
    masses = printed_deciding([mass, other], 3, _d2_mass)
    effect = _near(2 * min(other, 0.0), steps) if tied else anything
    effects = printed_deciding([effect, other], 2, _d2_effect, "+f")
    with localcontext(prec=1000):  # exact for any float's digits
        half = Decimal("0.5") * Decimal(masses[1])
        assert (Decimal(masses[0]) < half) == _d2_mass(mass, other), masses
        twice = 2 * max(-Decimal(effects[1]), Decimal(0))
        assert (-Decimal(effects[0]) >= twice) == _d2_effect(effect, other), effects


def test_printing_a_nan_beside_a_threshold_is_refused():
    """NaN is on no side of a threshold: it was printed "nan" after 16 tries."""
    from hooked_attnres.analysis.motifs import _d2_mass, printed_beside, printed_deciding

    with pytest.raises(ValueError, match="NaN.*no side"):
        printed_beside(float("nan"), 5.0, 1)
    with pytest.raises(ValueError, match="NaN.*no side"):
        printed_deciding([0.1, float("nan")], 3, _d2_mass)


@pytest.mark.parametrize(
    "effect,clean",
    [(-0.0765, 1.53), (-0.21099999999999997, 4.22), (-0.10849999999999999, 2.17), (-0.5, 10.0)],
)
def test_a_motifs_printed_percent_reads_as_its_size_test_decides(effect, clean):
    """Criterion 2 tested ``-effect >= 0.05 * clean`` and the sentence printed
    ``100 * (-effect / clean)``, another rounding: at a harm within a float of 5 % the
    sentence read "5.0 % of the clean 1.53" for a motif absent for its size (-0.0765 of
    1.53: 0.05 * 1.53 rounds up to 0.07650000000000001). The printed percent, read against
    5 %, now decides as the verdict does."""
    import re
    from decimal import Decimal

    cell = ("mlp_res", "early", "embedding")
    report = motif_report(*tables({cell: (effect, 2 * effect, effect / 2)}, clean=clean, seed=0))
    row = report.set_index("claim").loc["M1"]
    assert row.harmful and row.localised and not row.large_by_accuracy  # size alone decides
    text = motif_verdicts(report).set_index("claim").loc["M1", "sentence"]
    percent = re.search(r"= (\S+) % of the clean", text).group(1)
    assert (Decimal(percent) >= 5) == bool(row.present), text


def test_sentence_intervals_read_on_their_side_of_zero():
    """Per-seed sentences printed an effect's interval with 2 decimals: the shipped report's
    D3-attn_res read "effect -0.02 [-0.03, -0.00]" (interval read as containing 0, which
    meets D3) in a D3 absent because the interval excludes 0 and the effect is too large,
    and a motif harmful by ci_high < 0 read "[..., -0.00]". Each bound now prints with the
    digits that put it on its side of 0 (the tests "contains 0" and "< 0")."""
    import re
    from decimal import Decimal

    pc = ("attn_res", "all", "prev_completed")
    top = ("attn_res", "all", "embedding")
    m1 = ("mlp_res", "early", "embedding")
    effects = {pc: (-0.02, -0.03, -0.004), top: (-0.13, -0.2, -0.05), m1: (-0.9, -1.8, -0.003)}
    report = motif_report(*tables(effects, seed=0))
    rows = report.set_index("claim")
    assert not rows.loc["D3-attn_res", "present"] and rows.loc["M1", "present"]
    sentences = motif_verdicts(report).set_index("claim").sentence
    for claim, contains_zero in (("D3-attn_res", False), ("M1", False)):
        low, high = re.search(r"effect \S+ \[(\S+), (\S+)\]", sentences[claim]).groups()
        assert (Decimal(low) <= 0 <= Decimal(high)) == contains_zero, sentences[claim]


def test_the_verdicts_say_when_the_intervals_had_too_few_bootstrap_resamples(tmp_path):
    """A study with ``n_bootstrap=1`` decided every verdict from zero-width "95 %" intervals
    that need not contain the mean (effect -0.207, interval [-0.164, -0.164]: D1 present
    as "separated"), and its report said only "95 % percentile-bootstrap intervals"; the
    warning went to the console, not into the report. Fewer than 2 / (1 - 0.95) = 40
    resamples leave less than one resampled mean per tail the interval cuts off. The remedy names
    ``--bootstrap`` beside ``n_bootstrap`` (audit 115: a study run from the command line,
    which has no ``n_bootstrap``, was told to rerun with it)."""
    from hooked_attnres.study import verdict_sentences

    def lines(n_bootstrap):
        settings = {"n_bootstrap": n_bootstrap, "confidence": 0.95}
        return verdict_sentences(fake_study(tmp_path, {"attnres": ([0], [0])}, settings))

    for few in (1, 10, 39):
        first = lines(few)[0]
        assert first.startswith(f"The intervals were computed from {few} bootstrap resample"), first
        assert "fewer than the 40 that a 95 % interval needs" in first
        # audit 115: the command line's flag too (the result does not say which was used)
        assert "rerun with n_bootstrap >= 40 (hooked-attnres study --bootstrap 40 or" in first
    for enough in (40, 1000):
        assert not any("bootstrap resample" in line for line in lines(enough))
    # a result built by hand, without settings: nothing is claimed about the resamples
    bare = verdict_sentences(fake_study(tmp_path, {"attnres": ([0], [0])}))
    assert not any("bootstrap resample" in line for line in bare)


def test_a_report_without_a_seed_column_does_not_name_a_seed_it_was_not_given():
    """`motif_report` of one model's tables without a ``seed`` column (the README's
    notebook workflow: `load_condition(..., seed=2)`, `summarize_mass`, `ablation_effects`)
    gave sentences reading "seed 0: effect ..." for any model, seed 2's too."""
    summary, effects = tables({("mlp_res", "early", "embedding"): harmful(-1.0)})
    assert "seed" not in summary.columns and "seed" not in effects.columns
    verdicts = motif_verdicts(motif_report(summary, effects)).set_index("claim")
    for claim in CLAIMS:
        sentence = verdicts.loc[claim, "sentence"]
        assert "seed 0" not in sentence, sentence
        assert sentence.split(". ", 1)[1].startswith("the model: "), sentence
    # with a seed column, each seed is named as before
    summary, effects = tables({("mlp_res", "early", "embedding"): harmful(-1.0)}, seed=2)
    sentence = motif_verdicts(motif_report(summary, effects)).set_index("claim").sentence
    assert all(". seed 2: " in s for s in sentence)


def test_the_two_top_effect_families_are_named_by_their_ranking():
    """Audit 51: ``dissociation_report`` ranks by ``|effect|`` (a family whose ablation
    helps can be on top), the pre-registered D1 by harm; both called it ``top_effect``. The
    |effect| one is now ``top_abs_effect``; the pre-registered name keeps its meaning."""
    from hooked_attnres.analysis import dissociation_report

    # older's ablation helps most (+3), embedding's harms most (-1): the rankings differ
    effects = {
        ("attn_res", "all", "older"): (3.0, 2.5, 3.5),
        ("attn_res", "all", "embedding"): (-1.0, -1.2, -0.8),
    }
    summary, table = tables(effects)
    attn = (
        dissociation_report(
            summary.drop(columns="band"), table[table.group == "all"].assign(n_masked_routers=1)
        )
        .set_index("router")
        .loc["attn_res"]
    )
    cells = table[(table.router == "attn_res") & (table.group == "all")]
    cells = cells[cells.metric == "logit_diff"].set_index("family").effect
    assert attn.top_abs_effect == cells.abs().idxmax() == "older"
    assert attn.abs_effect_ranking[0] == "older"
    assert "top_effect" not in attn.index and "effect_ranking" not in attn.index
    d1 = motif_report(summary, table).set_index("claim").loc["D1-attn_res"]
    assert d1.top_effect == (-cells).idxmax() == "embedding"  # the pre-registered harm ranking


# a number of 1e16 or more in scientific notation: sign, one digit, its decimals, exponent
_SCIENTIFIC = r"[+-]?\d(\.\d+)?e[+-]\d+"


@settings(max_examples=300, deadline=None)
@example(threshold=1e20, steps=0, spec=("+f", 2), anything=1e300)
@example(threshold=-1e16, steps=-1, spec=("f", 3), anything=-1e16)
@given(
    threshold=st.one_of(
        st.floats(1e16, 1e308), st.floats(-1e308, -1e16), st.sampled_from([1e16, 2.0**60])
    ),
    steps=st.integers(-3, 3),
    spec=st.sampled_from([("f", 3), ("+f", 2), ("f", 1)]),
    anything=st.one_of(st.floats(1e16, 1e308), st.floats(-1e308, -1e16)),
)
def test_huge_numbers_print_in_scientific_notation_on_their_side(threshold, steps, spec, anything):
    """Numbers of 1e16 or more printed every integer digit ("100000000000000000000.00" for
    1e20 with "+f" and 2 decimals): they print in scientific notation, still on their side
    of the threshold read exactly (Fraction: independent of the Decimal reading), with no
    more significant digits than a float needs (17)."""
    import math
    import re
    from fractions import Fraction

    from hooked_attnres.analysis.motifs import printed_beside

    kind, digits = spec
    for value in (_near(threshold, steps), anything, threshold):
        assume(math.isfinite(value))
        text = printed_beside(value, threshold, digits, kind)
        if abs(value) >= 1e16:
            assert re.fullmatch(_SCIENTIFIC, text), text
            assert len(re.sub(r"\D", "", text.split("e")[0])) <= 17, text
        else:  # a float next to -1e16, -9999999999999998: as before
            assert text == format(value, f"{kind[:-1]}.{digits}f"), text
        read = Fraction(text.replace("+", "", 1) if text.startswith("+") else text)
        assert _side(read - Fraction(repr(threshold))) == _side(value - threshold), text


@settings(max_examples=300, deadline=None)
@example(other=1.2345678901234567e20, steps=0, tied=True)
@example(other=-3.0e300, steps=0, tied=True)
@given(
    other=st.one_of(st.floats(4e16, 1e300), st.floats(-1e300, -4e16)),
    steps=st.integers(-3, 3),
    tied=st.booleans(),
)
def test_huge_d2_numbers_print_in_scientific_notation_as_their_tests_decide(other, steps, tied):
    """D2's tests at huge magnitudes (ties included): scientific notation, read exactly
    (Fraction) on the side the values decide."""
    import re
    from fractions import Fraction

    from hooked_attnres.analysis.motifs import _d2_effect, _d2_mass, printed_deciding

    mass = _near(0.5 * other, steps) if tied else -other
    masses = printed_deciding([mass, other], 3, _d2_mass)
    effect = _near(2 * min(other, 0.0), steps) if tied else other / 3
    effects = printed_deciding([effect, other], 2, _d2_effect, "+f")
    for value, text in zip([mass, other, effect, other], masses + effects, strict=True):
        if abs(value) >= 1e16:  # (a tied effect beside a positive other is 0)
            assert re.fullmatch(_SCIENTIFIC, text), text
    m, o = (Fraction(t) for t in masses)
    assert (m < Fraction(1, 2) * o) == _d2_mass(mass, other), masses
    e, o = (Fraction(t.replace("+", "", 1)) for t in effects)
    assert (-e >= 2 * max(-o, Fraction(0))) == _d2_effect(effect, other), effects


@pytest.mark.parametrize("fraction", [1e14, 1e16, 1.2345e30, 0.05, 0.050000000000000010])
def test_a_huge_percent_prints_in_scientific_notation_on_its_side(fraction):
    """Criterion 2's percent of a tiny clean difference (harm / clean of 1e14 and more)
    printed every integer digit; it prints in scientific notation from 1e16 %, read on the
    fraction's side of 5 % (Fraction)."""
    import re
    from fractions import Fraction

    from hooked_attnres.analysis.motifs import PREREGISTERED, _percent_text

    text = _percent_text(fraction, PREREGISTERED.min_effect_fraction)
    if 100 * fraction >= 1e16:
        assert re.fullmatch(_SCIENTIFIC, text), text
    limit = Fraction(repr(PREREGISTERED.min_effect_fraction))
    want = _side(fraction - PREREGISTERED.min_effect_fraction)  # as the criterion decides
    assert _side(Fraction(text) / 100 - limit) == want, text


@pytest.mark.parametrize("threshold", [0.5, 0.05, 1e-6, 0.1])
@pytest.mark.parametrize("steps", [-1, 0, 1])
def test_printed_beside_takes_a_numpy_threshold(threshold, steps):
    """A NumPy float threshold (a table's value) crashed: its repr "np.float64(0.5)" is no
    Decimal (decimal.InvalidOperation). It prints as the same float's threshold does, on
    the value's side of it (read exactly, Fraction)."""
    from fractions import Fraction

    import numpy as np

    from hooked_attnres.analysis.motifs import printed_beside

    value = _near(threshold, steps)
    for like in (np.float64(threshold), np.float32(threshold)):
        text = printed_beside(value, like, 2)
        written = Fraction(repr(float(like)))
        assert _side(Fraction(text) - written) == _side(value - float(like)), text
    assert printed_beside(value, np.float64(threshold), 2) == printed_beside(value, threshold, 2)


@pytest.mark.parametrize("threshold", [float("inf"), -float("inf")])
def test_printed_beside_an_infinite_threshold_prints_the_value_as_asked(threshold):
    """Audit 75: b151e99 read every threshold through ``_as_written`` (``Fraction(repr)``),
    which has no infinity: ``printed_beside(1.0, inf, 2)`` raised "Invalid literal for
    Fraction: 'inf'" where it printed "1.00" (its ``Decimal(repr)`` reading took one). An
    infinite threshold is read as the float it is, as ``_exactly`` reads an infinite value;
    a finite value is on its side of it at any digits (the asked ones), an infinite one is
    printed as Python prints it."""
    from hooked_attnres.analysis.motifs import printed_beside

    for value, digits, kind in ((1.0, 2, "f"), (-0.125, 1, "+f"), (3e20, 2, "e")):
        assert printed_beside(value, threshold, digits, kind) == format(
            value, f"{kind[:-1]}.{digits}{kind[-1]}"
        )
    for value in (float("inf"), -float("inf")):
        assert printed_beside(value, threshold, 2) == format(value, ".2f")


def test_printed_beside_refuses_a_nan_threshold_by_name():
    """Audit 87: 05d3ea3 let every non-finite threshold through `_as_written` as its
    float, so a NaN one reached a `Decimal` comparison and raised
    ``decimal.InvalidOperation: [<class 'decimal.InvalidOperation'>]`` (an
    ``ArithmeticError``, not a ``ValueError``, naming nothing; before, "Invalid literal
    for Fraction: 'nan'"). No number is on a side of NaN: refused as `printed_deciding`
    refuses a NaN value, by name."""
    import numpy as np

    from hooked_attnres.analysis.motifs import printed_beside

    for threshold in (float("nan"), np.float32("nan")):
        with pytest.raises(ValueError, match=r"^cannot print 1\.0 beside the threshold nan: "):
            printed_beside(1.0, threshold, 2)


def test_the_report_tables_print_no_number_where_nothing_was_masked(tmp_path):
    """Audit finding: the effect tables printed "0.00" for ablations that masked no router
    (``older`` in the early band: no early router reads it; with kimi's early attention
    ``prev_completed``, 36 attention and 27 MLP rows of docs/results/grid/effects.csv), as
    if a zero effect had been measured, and said
    every family was masked "at every router of a type in the group", though a router of
    which the family is every source is left alone (``skipped``). Every cell is rederived
    here from the effects table: "–" where ``n_masked_routers`` is 0, else the number; the
    mass "–" where ``family_read`` is False."""
    import re

    from hooked_attnres.study.report import study_report, study_report_html

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0], [])})
    effects, mass = result.effects.copy(), result.mass_summary.copy()
    effects.loc[(effects.group == "early") & (effects.family == "older"), "n_masked_routers"] = 0
    unread = (effects.router == "mlp_res") & (effects.family == "prev_completed")
    effects.loc[unread, "n_masked_routers"] = 0
    mass.loc[(mass.router == "mlp_res") & (mass.family == "prev_completed"), "family_read"] = False
    skipped = (
        (effects.router == "attn_res")
        & (effects.family == "embedding")
        & effects.group.isin(["early", "all"])
    )
    effects.loc[skipped, "skipped"] = "attn_res layer 0"
    result.effects, result.mass_summary = effects, mass
    text = study_report(result)
    shown = {}
    for line in text.split("### hard_cumulative_L8, seed 0", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("attn_res", "mlp_res"):
            shown[cells[0], cells[1]] = cells[2:]
    assert len(shown) == 8
    logit = effects[effects.metric == "logit_diff"].set_index(["router", "family", "group"])
    n_unmasked = 0
    for (router, family), cells in shown.items():
        expected = []
        for group in ("all", "early", "middle", "late"):
            row = logit.loc[(router, family, group)]
            number = f"{row.effect:.2f}"
            if group == "all":
                number += f" [{row.ci_low:.2f}, {row.ci_high:.2f}]"
            n_unmasked += row.n_masked_routers == 0
            expected.append("–" if row.n_masked_routers == 0 else number)
        read = mass.set_index(["router", "family"]).loc[(router, family), "family_read"]
        assert cells[0].startswith("0.250 [") if read else cells[0] == "–"
        assert cells[1:] == expected, (router, family)
    assert n_unmasked == 6  # two older early cells, mlp_res prev_completed in four groups
    assert shown["attn_res", "older"][3] == "0.00"  # masked, measured 0: printed
    assert re.search(r"^–: nothing was masked \(.*effects\.csv holds effect 0 there", text, re.M)
    assert "at every router of a type in the group that reads it, except a router" in text
    assert (
        "in this study: embedding at attn_res layer 0 (groups early, all; 1 of 1 model))." in text
    )
    page = study_report_html(result)
    assert page.count("<td>–</td>") == 6 + 1  # the effect cells and the unread mass
    result.effects = effects.drop(columns="n_masked_routers")
    with pytest.raises(
        ValueError,
        match=r"^effects lacks the column 'n_masked_routers' \(how many routers each "
        r"ablation masked\), needed by the study report's tables: without it an ablation "
        r"that masked nothing \(effect 0 by construction\) would be shown as a measured 0",
    ):
        study_report(result)


def test_the_report_refuses_a_nan_n_masked_routers(tmp_path):
    """Audit 76: an effects table whose ``n_masked_routers`` held NaN (an empty cell of
    effects.csv, or a merge that did not match) printed the ablation's effect 0 as
    "0.00" (NaN is not 0, so the cell was not "–"), a measured-looking number; refused now
    by the figures' check (`require_masked_column`), naming the row."""
    from hooked_attnres.study.report import study_report, study_report_html

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0], [])})
    effects = result.effects.copy()
    hole = (effects.group == "early") & (effects.family == "older")
    effects.loc[hole, ["effect", "ci_low", "ci_high"]] = 0.0  # nothing masked: 0
    effects.loc[hole, "n_masked_routers"] = None
    path = tmp_path / "effects.csv"
    effects.to_csv(path, index=False)
    result.effects = pd.read_csv(path)
    first = effects[hole & (effects.metric == "logit_diff")].iloc[0]
    for report in (study_report, study_report_html):
        with pytest.raises(
            ValueError,
            match=rf"^effects holds {int((hole & (effects.metric == 'logit_diff')).sum())} "
            r"non-finite 'n_masked_routers' value\(s\) \(first: nan at condition="
            rf"'hard_cumulative_L8', seed=0, router='{first.router}', group='early', "
            r"family='older', metric='logit_diff'\), which the study report's tables cannot "
            r"read: an ablation that masked nothing \(effect 0 by construction\) there would "
            r"be shown as a measured effect",
        ):
            report(result)


# thresholds other than the pre-registered ones, each deciding the cases below otherwise
_CUSTOM = dict(
    min_effect_fraction=0.075,
    min_accuracy_drop=0.0214,
    d2_mass_ratio=0.75,
    d2_effect_ratio=1.5,
    d3_min_mass=0.2,
    d3_max_effect_fraction=0.125,
)


def _read(text: str):
    """A printed number as a reader reads it: exactly."""
    from decimal import Decimal
    from fractions import Fraction

    return Fraction(Decimal(text))


def _custom_sentences(criteria, effects=None, accuracy=None, mass=None, clean=10.0):
    """(report rows by claim, sentences by claim) of one seed under ``criteria``."""
    report = motif_report(
        *tables(effects, accuracy=accuracy, mass=mass, clean=clean, seed=0), criteria=criteria
    )
    sentences = motif_verdicts(report).set_index("claim").sentence
    return report.set_index("claim"), sentences


def test_sentences_of_custom_criteria_print_their_numbers_beside_the_thresholds_that_decided():
    """With custom `Criteria`, the sentences printed each number with the digits that put it
    on its side of the pre-registered threshold, and named the pre-registered thresholds:
    7.4996 % read "7.5 %" in a motif absent beside 7.5 %; an accuracy effect of -2.149
    points, present beside 2.14, read "-2.1 points"; D2 masses 0.29996 vs 0.4, met beside
    0.75x, read "0.300 vs 0.400"; D2 effects -0.149 vs -0.1, not 1.5x, read "-0.15 vs -0.10";
    a D2 absent only by its interval lacked the "but embedding's effect interval" clause
    (the masses fail 0.5x); a D3 mass of 0.19996, absent beside 0.2, read "mass 0.200"; D3's
    limit read "0.12x the top harm" for 0.125; the claim texts said 0.5x, 2x, 0.10."""
    from fractions import Fraction

    from hooked_attnres.analysis import Criteria, claim_text

    c = Criteria(**_CUSTOM)
    at = {name: Fraction(repr(value)) for name, value in _CUSTOM.items()}
    cell = ("mlp_res", "early", "embedding")
    rows, text = _custom_sentences(c, {cell: harmful(-0.74996, width=0.1)})
    assert not rows.loc["M1", "present"]
    (percent,) = re.findall(r"logits = (\S+) % of the clean", text["M1"])
    assert _read(percent) / 100 < at["min_effect_fraction"], text["M1"]
    rows, text = _custom_sentences(c, {cell: harmful(-0.1, width=0.05)}, {cell: -0.02149})
    assert rows.loc["M1", "present"] and rows.loc["M1", "large_by_accuracy"]
    (points,) = re.findall(r"accuracy (\S+) points", text["M1"])
    assert _read(points) / 100 <= -at["min_accuracy_drop"], text["M1"]

    emb, cur = ("mlp_res", "all", "embedding"), ("mlp_res", "all", "current")
    close = {("mlp_res", "embedding"): 0.29996, ("mlp_res", "current"): 0.4}
    far = {("mlp_res", "embedding"): 0.1, ("mlp_res", "current"): 0.4}
    pattern = r"seed 0: mass (\S+) vs (\S+), effect (\S+) vs (\S+)[.,]"
    rows, text = _custom_sentences(
        c, {emb: (-0.5, -0.9, -0.1), cur: (-0.1, -0.2, -0.05)}, mass=close
    )
    assert rows.loc["D2", "present"]
    m, o, _, _ = (_read(t) for t in re.findall(pattern, text["D2"])[0])
    assert m < at["d2_mass_ratio"] * o, text["D2"]
    rows, text = _custom_sentences(
        c, {emb: (-0.149, -0.3, -0.1), cur: (-0.1, -0.2, -0.05)}, mass=far
    )
    assert not rows.loc["D2", "present"]
    _, _, e, o = (_read(t) for t in re.findall(pattern, text["D2"])[0])
    assert not -e >= at["d2_effect_ratio"] * max(-o, 0), text["D2"]
    rows, text = _custom_sentences(
        c, {emb: (-0.5, -0.9, 0.01), cur: (-0.1, -0.2, -0.05)}, mass=close
    )
    assert not rows.loc["D2", "present"]
    assert text["D2"].endswith(
        "but embedding's effect interval does not exclude 0 (ci_high +0.01)."
    ), text["D2"]

    pc = ("attn_res", "all", "prev_completed")
    rows, text = _custom_sentences(c, {pc: (0.0, -0.1, 0.1)}, mass={("attn_res", pc[2]): 0.19996})
    assert not rows.loc["D3-attn_res", "present"]
    (printed,) = re.findall(r"seed 0: mass (\S+), effect", text["D3-attn_res"])
    assert _read(printed) < at["d3_min_mass"], text["D3-attn_res"]
    top = ("attn_res", "all", "embedding")
    rows, text = _custom_sentences(c, {pc: (-0.01, -0.02, -0.005), top: (-1.0, -1.2, -0.8)})
    assert rows.loc["D3-attn_res", "present"]
    (named,) = re.findall(r"= (\S+)x the top harm\.$", text["D3-attn_res"])
    assert _read(named) == at["d3_max_effect_fraction"], text["D3-attn_res"]

    # the claims name the custom thresholds, read exactly
    d2 = re.findall(r"< (\S+)x current's mass and >= (\S+)x its harm", claim_text("D2", c))
    assert [tuple(map(_read, d2[0]))] == [(at["d2_mass_ratio"], at["d2_effect_ratio"])]
    for router in ("attn_res", "mlp_res"):
        said = claim_text(f"D3-{router}", c)
        assert text[f"D3-{router}"].startswith(f"D3-{router} ({said}): ")
        d3 = re.findall(r">= (\S+) mass, .* \|effect\| < (\S+)x the top harm", said)
        assert [tuple(map(_read, d3[0]))] == [(at["d3_min_mass"], at["d3_max_effect_fraction"])]
    assert text["D2"].startswith(f"D2 ({claim_text('D2', c)}): ")


_SHORT = st.builds(lambda m, k: float(f"{m}e{k}"), st.integers(1, 999), st.integers(-5, -3))


@settings(max_examples=12, deadline=None)
@given(
    fraction=_SHORT,
    drop=_SHORT,
    ratios=st.tuples(
        st.sampled_from([0.3, 0.45, 0.6, 0.75, 0.9]), st.sampled_from([1.1, 1.5, 3.0, 2.5])
    ),
    d3=st.tuples(_SHORT, _SHORT),
    steps=st.lists(st.integers(-3, 3), min_size=6, max_size=6),
)
# the float 0.009 is below 0.009 as written: a prev_completed effect of the float 2 * 0.009
# is below 0.009x a top harm of 2 exactly (decided absent in floats until audit 72)
@example(fraction=0.05, drop=0.02, ratios=(0.6, 1.5), d3=(0.2, 0.009), steps=[0] * 6)
def test_custom_criteria_sentences_read_as_their_verdicts_decide(fraction, drop, ratios, d3, steps):
    """Numbers a few floats from custom thresholds: each printed number, read exactly
    (Fraction), is on the side of the custom threshold (as written, its repr) that the
    verdict's float test put it on; D3's sentence names the custom fraction."""
    from fractions import Fraction

    from hooked_attnres.analysis import Criteria

    mass_ratio, effect_ratio = ratios
    min_mass, max_fraction = d3
    c = Criteria(
        min_effect_fraction=fraction,
        min_accuracy_drop=drop,
        d2_mass_ratio=mass_ratio,
        d2_effect_ratio=effect_ratio,
        d3_min_mass=min_mass,
        d3_max_effect_fraction=max_fraction,
    )
    size = _near(fraction, steps[0])  # harm / clean with clean 1
    acc = -_near(drop, steps[1])
    emb_mass = _near(mass_ratio * 0.4, steps[2])
    emb_effect = -_near(effect_ratio * 0.1, steps[3])
    pc_mass = _near(min_mass, steps[4])
    pc_effect = -_near(max_fraction * 2.0, steps[5])  # beside the limit of a top harm of 2
    m1 = ("mlp_res", "early", "embedding")
    effects = {
        m1: (-size, -2 * size, -size / 2),
        ("mlp_res", "all", "embedding"): (emb_effect, 2 * emb_effect, emb_effect / 2),
        ("mlp_res", "all", "current"): (-0.1, -0.2, -0.05),
        ("attn_res", "all", "prev_completed"): (pc_effect, 2 * pc_effect, pc_effect / 2),
        ("attn_res", "all", "embedding"): (-2.0, -2.5, -1.5),
    }
    masses = {
        ("mlp_res", "embedding"): emb_mass,
        ("mlp_res", "current"): 0.4,
        ("attn_res", "prev_completed"): pc_mass,
    }
    rows, text = _custom_sentences(c, effects, {m1: acc}, masses, clean=1.0)
    at = Fraction(repr(fraction))
    (percent,) = re.findall(r"logits = (\S+) % of the clean", text["M1"])
    assert _side(_read(percent) / 100 - at) == _side(size - fraction), text["M1"]
    if acc <= -drop:
        (points,) = re.findall(r"accuracy (\S+) points", text["M1"])
        assert _read(points) / 100 <= -Fraction(repr(drop)), text["M1"]
    assert bool(rows.loc["M1", "present"]) == (size >= fraction or acc <= -drop)
    m, o, e, oe = map(
        _read, re.findall(r"mass (\S+) vs (\S+), effect (\S+) vs (\S+)[.,]", text["D2"])[0]
    )
    # D2 is decided exactly, the ratios as written (audit 65: the float product 0.3 * 0.4
    # rounded to the embedding mass 0.12 below it, D2 absent, printed "0.120 vs 0.400")
    r_mass, r_effect = Fraction(repr(mass_ratio)), Fraction(repr(effect_ratio))
    mass_met = Fraction(emb_mass) < r_mass * Fraction(0.4)
    effect_met = -Fraction(emb_effect) >= r_effect * Fraction(0.1)
    assert (m < r_mass * o) == mass_met, text["D2"]
    assert (-e >= r_effect * max(-oe, 0)) == effect_met, text["D2"]
    assert bool(rows.loc["D2", "present"]) == (mass_met and effect_met), text["D2"]
    (mass,) = re.findall(r"seed 0: mass (\S+), effect", text["D3-attn_res"])
    assert (_read(mass) >= Fraction(repr(min_mass))) == (pc_mass >= min_mass), text["D3-attn_res"]
    named = re.findall(r"= (\S+)x the top harm\.$", text["D3-attn_res"])
    assert [_read(t) for t in named] == [Fraction(repr(max_fraction))], text["D3-attn_res"]
    # D3's size test exactly too, the fraction as written (audit 72: the float product
    # 0.1 * 0.7 is 0.06999999999999999, equal to an effect below 0.07 exactly)
    top = max(Fraction(2), -Fraction(pc_effect))
    below = abs(Fraction(pc_effect)) < Fraction(repr(max_fraction)) * top
    held = pc_mass >= min_mass and (pc_effect == 0 or below)
    assert bool(rows.loc["D3-attn_res", "present"]) == held, text["D3-attn_res"]
    for s, sign, limit in re.findall(r"\|effect\| (\S+) (<|>=) (\S+)", text["D3-attn_res"]):
        assert (sign == "<") == below == (_read(s) < _read(limit)), text["D3-attn_res"]


def test_verdicts_refuse_criteria_other_than_those_that_decided_the_report(tmp_path):
    """The sentences take the report's criteria (`motif_report` records them); other
    criteria given, or a report read from a file whose stored decisions the criteria
    contradict (read by the pre-registered ones), are refused: the sentences would print
    numbers beside thresholds that did not decide them."""
    from hooked_attnres.analysis import PREREGISTERED, Criteria

    c = Criteria(**_CUSTOM)
    pc = ("attn_res", "all", "prev_completed")
    report = motif_report(
        *tables({pc: (0.0, -0.1, 0.1)}, mass={("attn_res", pc[2]): 0.15}, seed=0), criteria=c
    )
    assert report.attrs["criteria"] == c
    with pytest.raises(ValueError, match="was decided by Criteria.*not the criteria="):
        motif_verdicts(report, criteria=PREREGISTERED)
    report.to_csv(tmp_path / "motifs.csv", index=False)
    stored = pd.read_csv(tmp_path / "motifs.csv")
    assert not stored.attrs
    # D3's mass 0.15 is absent beside 0.2, present beside 0.10
    with pytest.raises(ValueError, match="D3-attn_res row seed 0 was not decided by Criteria"):
        motif_verdicts(stored)
    given = motif_verdicts(stored, criteria=c).set_index("claim")
    recorded = motif_verdicts(report).set_index("claim")
    pd.testing.assert_frame_equal(given, recorded)


def test_the_shipped_reports_sentences_are_those_of_the_preregistered_criteria():
    """The criteria-given texts write the pre-registered thresholds as the shipped report
    (docs/results/shipped_report.md) does: its claim legend and every sentence's head, D3's
    "= 0.10x the top harm"; and its accuracy points (effects of 256 prompts, multiples of
    1/256) print as the fixed one decimal they were printed with."""
    from hooked_attnres.analysis import CLAIMS, PREREGISTERED, claim_text
    from hooked_attnres.analysis.motifs import _percent_text, _threshold_text

    shipped = (Path(__file__).resolve().parents[1] / "docs/results/shipped_report.md").read_text()
    for claim in CLAIMS:
        assert f"\n| {claim} | {claim_text(claim)} |\n" in shipped, claim
        heads = re.findall(rf"\n\* {re.escape(claim)} \((.*?)\): present in", shipped)
        assert len(heads) >= 7 and set(heads) == {claim_text(claim)}, claim
    limits = re.findall(r"= (\S+)x the top harm\.", shipped)
    assert limits and set(limits) == {_threshold_text(PREREGISTERED.d3_max_effect_fraction, 2)}
    assert claim_text("D2", PREREGISTERED) == claim_text("D2")
    points = re.findall(r"accuracy (\S+) points", shipped)
    assert len(points) >= 10
    for k in range(-256, 0):
        if k / 256 <= -PREREGISTERED.min_accuracy_drop:
            text = _percent_text(k / 256, -PREREGISTERED.min_accuracy_drop, "+f")
            assert text == f"{100 * k / 256:+.1f}", k
    assert set(points) <= {f"{100 * k / 256:+.1f}" for k in range(-256, -5)}


@pytest.mark.parametrize("scale", [1e20, -1e20, 3e300])
def test_huge_effects_clean_differences_and_harms_print_in_scientific_notation(scale):
    """Audit 64: a verdict sentence printed the effect, the clean difference and D3's top
    harm with ``.2f``, every integer digit of a huge value ("effect
    -30000000000000000000.00 ... of the clean 100000000000000000000.00", a 3e300 harm its 301
    digits). They print in scientific notation from `SCIENTIFIC_FROM` (1e16), as the
    numbers beside a threshold do; the clean difference, which decides its clause (clean >
    0), on its side of 0. Checked against the values read back (Fraction)."""
    import re
    from fractions import Fraction

    harm = 0.3 * abs(scale)
    cell = harmful(-harm, width=0.1 * harm)
    summary, effects = tables(
        {("mlp_res", "early", "embedding"): cell, ("mlp_res", "all", "embedding"): cell},
        clean=scale,
    )
    sentences = motif_verdicts(motif_report(summary, effects)).set_index("claim").sentence
    for claim in ("M1", "D3-mlp_res"):
        assert not re.search(r"\d{17}", sentences[claim]), sentences[claim]
    m1 = re.search(
        rf"effect (?P<effect>{_SCIENTIFIC}) \[{_SCIENTIFIC}, {_SCIENTIFIC}\] logits = .*?"
        rf"(?:of the clean|clean logit difference) (?P<clean>{_SCIENTIFIC})",
        sentences["M1"],
    )
    assert m1, sentences["M1"]
    effect, clean = Fraction(m1["effect"]), Fraction(m1["clean"])
    assert abs(effect + Fraction(harm)) <= Fraction(harm) / 100
    assert _side(clean) == _side(scale) and abs(clean - Fraction(scale)) <= abs(scale) / 100
    d3 = re.search(rf"harm ({_SCIENTIFIC})\)", sentences["D3-mlp_res"])
    assert d3 and abs(Fraction(d3.group(1)) - Fraction(harm)) <= Fraction(harm) / 100, sentences


@pytest.mark.parametrize("clean", [0.004, -0.004])
def test_a_small_clean_difference_prints_on_its_side_of_zero(clean):
    """Audit 64: a clean logit difference of 0.004 (> 0: criterion 2 applies) printed "of
    the clean 0.00", which reads as not above 0, and -0.004 "clean logit difference -0.00
    (the answer is not preferred)"; printed beside 0 (`printed_beside`), read exactly."""
    import re
    from fractions import Fraction

    summary, effects = tables(clean=clean)
    sentence = motif_verdicts(motif_report(summary, effects)).set_index("claim").sentence["M1"]
    found = re.search(r"(?:of the clean|clean logit difference) ([-+]?[\d.]+)", sentence)
    assert found, sentence
    assert _side(Fraction(found.group(1))) == _side(clean), sentence


def test_the_report_files_are_written_in_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Audit 64: since the report prints "–" where nothing was masked (audit 62) it holds a
    character outside ASCII, and write_study wrote report.md / report.html in the locale's
    encoding: under an ASCII locale (LC_ALL=C with PYTHONCOERCECLOCALE=0, measured:
    UnicodeEncodeError) the study failed after every model's work, and under cp1252 the page
    that declares charset utf-8 got the byte 0x96. Emulated here by a locale default of
    ASCII for every text open, read_text and write_text without an encoding."""
    from hooked_attnres.study.run import write_study

    result = fake_study(tmp_path / "tables", {"hard_cumulative_L8": ([0], [])})
    effects = result.effects.copy()
    effects.loc[(effects.group == "early") & (effects.family == "older"), "n_masked_routers"] = 0
    result.effects, result.out_dir = effects, tmp_path / "out"
    result.mass = pd.DataFrame(  # mass.csv's per-layer rows (fake_study has none)
        [dict(condition="hard_cumulative_L8", seed=0, router="mlp_res", layer=0, band="early")]
    ).assign(family="embedding", n_sources=1, mass=0.25, prompt=0)
    from helpers import emulate_ascii_locale

    emulate_ascii_locale(monkeypatch)
    write_study(result)
    for name in ("report.md", "report.html"):
        text = (result.out_dir / name).read_bytes().decode("utf-8")
        assert "–" in text, name


def test_d2_ratios_are_applied_exactly_as_written():
    """D2's "embedding mass < r x current's" and "harm >= r x current's" are decided on the
    numbers and the ratio as written (exactly, as a reader reads the sentence), not on the
    float product: with r = 0.123, 0.123 * 0.14905962049611388 rounded to a float at or
    below an embedding mass of 0.018334333321022005 that is below it exactly; D2 was
    decided absent and the sentence printed both masses to 58 digits, reading as met. A
    subnormal current mass's half rounded to 0, so an embedding mass of 0 was not below
    it. Non-finite thresholds are refused (the exact reading has none)."""
    from fractions import Fraction

    from hooked_attnres.analysis import PREREGISTERED, Criteria

    emb, cur = ("mlp_res", "all", "embedding"), ("mlp_res", "all", "current")
    effects = {emb: (-0.5, -0.9, -0.1), cur: (-0.1, -0.2, -0.05)}
    pattern = r"seed 0: mass (\S+) vs (\S+), effect"
    for criteria, masses in (
        (Criteria(d2_mass_ratio=0.123), (0.018334333321022005, 0.14905962049611388)),
        (PREREGISTERED, (0.0, 5e-324)),
    ):
        mass = {("mlp_res", "embedding"): masses[0], ("mlp_res", "current"): masses[1]}
        rows, text = _custom_sentences(criteria, effects, mass=mass)
        ratio = Fraction(repr(criteria.d2_mass_ratio))
        exactly = Fraction(masses[0]) < ratio * Fraction(masses[1])
        assert exactly and bool(rows.loc["D2", "present"]), text["D2"]
        m, o = (_read(t) for t in re.findall(pattern, text["D2"])[0])
        assert m < ratio * o, text["D2"]
    # harm: 1.1 x a current harm of 0.756 rounds to 0.8316000000000001, above an
    # embedding harm of 0.8316 that is 1.1x it or more exactly
    c = Criteria(d2_effect_ratio=1.1)
    harm, base = 0.8316, 0.756
    assert Fraction(harm) >= Fraction("1.1") * Fraction(base)
    far = {("mlp_res", "embedding"): 0.1, ("mlp_res", "current"): 0.4}
    rows, text = _custom_sentences(
        c, {emb: (-harm, -0.9, -0.1), cur: (-base, -0.9, -0.2)}, mass=far
    )
    assert rows.loc["D2", "present"], text["D2"]
    e, o = (_read(t) for t in re.findall(r"effect (\S+) vs (\S+)\.", text["D2"])[0])
    assert -e >= Fraction("1.1") * max(-o, 0), text["D2"]
    for name in ("d2_mass_ratio", "d2_effect_ratio", "d3_min_mass", "min_effect_fraction"):
        with pytest.raises(ValueError, match=rf"^Criteria's {name} must be a finite number"):
            Criteria(**{name: float("inf")})


def test_criteria_refuse_an_integer_too_large_for_a_float_by_name():
    """``Criteria(d2_mass_ratio=10**400)`` raised a bare ``OverflowError`` (from
    ``math.isfinite``), naming no criterion; every threshold is read as a float. The
    largest integer a float holds is still taken."""
    from hooked_attnres.analysis import Criteria

    for name in ("d2_mass_ratio", "d3_max_effect_fraction", "schedule_max_deviation"):
        for huge in (10**400, -(10**400), 2**1024):
            with pytest.raises(ValueError, match=rf"^Criteria's {name} must be a finite number"):
                Criteria(**{name: huge})
    big = int(sys.float_info.max)
    assert Criteria(d2_mass_ratio=big).d2_mass_ratio == big


def test_verdicts_read_a_report_stored_before_the_d2_interval_column():
    """A report stored before ``ci_high_embedding`` (and D3's ``effect_limit``) existed is
    read as before (its D2 decision is checked by the tests its columns allow): checking
    the criteria, motif_verdicts raised AttributeError on a present D2 row of one."""
    from hooked_attnres.analysis import Criteria

    emb, cur = ("mlp_res", "all", "embedding"), ("mlp_res", "all", "current")
    effects = {emb: (-0.5, -0.9, -0.1), cur: (-0.1, -0.2, -0.05)}
    mass = {("mlp_res", "embedding"): 0.1, ("mlp_res", "current"): 0.4}
    report = motif_report(*tables(effects, mass=mass, seed=0))
    assert report.set_index("claim").loc["D2", "present"]
    old = report.drop(columns=["ci_high_embedding", "effect_limit"])
    old.attrs = {}
    pd.testing.assert_frame_equal(motif_verdicts(old), motif_verdicts(report))
    # a present D2 whose masses fail the criteria given is still refused
    strict = Criteria(d2_mass_ratio=0.2)
    with pytest.raises(ValueError, match="D2 row seed 0 was not decided by Criteria"):
        motif_verdicts(old, criteria=strict)


def test_d3_effect_limit_is_applied_exactly_as_written():
    """D3's "|effect| < 0.10x the top harm" is decided on the numbers and the fraction as
    written (exactly, as D2's ratios and as a reader reads the sentence), not on the float
    product: 0.1 * 0.7 rounds to the float 0.06999999999999999, equal to an effect of that
    size, which is below 0.07 (= 0.10 x 0.7) exactly; D3 was decided absent. The sentence
    prints the two numbers on the side the verdict decided."""
    from fractions import Fraction

    from hooked_attnres.analysis import PREREGISTERED

    harm, size = 0.7, 0.06999999999999999
    fraction = Fraction(repr(PREREGISTERED.d3_max_effect_fraction))
    below = Fraction(size) < fraction * Fraction(harm)
    assert below and not size < PREREGISTERED.d3_max_effect_fraction * harm  # the near-tie
    effects = {
        ("attn_res", "all", "current"): (-harm, -0.9, -0.5),
        ("attn_res", "all", "prev_completed"): (-size, -0.08, -0.06),
    }
    rows, text = _custom_sentences(PREREGISTERED, effects)
    assert bool(rows.loc["D3-attn_res", "present"]) == below, text["D3-attn_res"]
    ((s, sign, limit),) = re.findall(r"\|effect\| (\S+) (<|>=) (\S+) =", text["D3-attn_res"])
    assert sign == "<" and _read(s) < _read(limit), text["D3-attn_res"]
    assert _read(s) < fraction * Fraction(harm), text["D3-attn_res"]


def test_d1_ranks_only_the_families_a_router_type_reads():
    """Audit 100: D1 ranked every family, also one no router of the type reads (its mass 0,
    its ablation masking nothing: effect 0, interval [0, 0]). Where every family read
    helps when ablated (harm < 0), the unread family's harm 0 topped the harm ranking:
    D1-attn_res read "present" (top effect ``older|prev_completed``, interval [0, 0] below
    embedding's 0.3) for a model whose top-harm family, ``current`` (interval up to 0.45),
    is not separated from embedding. As `dissociation_report`, D1 and D3 rank the families
    the mass summary's ``family_read`` says the router type reads."""
    unread = ("older", "prev_completed")
    summary, effects = tables(
        effects={
            ("attn_res", "all", "embedding"): (0.5, 0.3, 0.7),
            ("attn_res", "all", "current"): (0.4, 0.35, 0.45),
            **{("attn_res", group, f): (0.0, 0.0, 0.0) for group in GROUPS for f in unread},
        },
        mass={("attn_res", "embedding"): 0.6, ("attn_res", "current"): 0.4}
        | {("attn_res", f): 0.0 for f in unread},
    )
    where = (summary.router == "attn_res") & summary.family.isin(unread)
    summary.loc[where, "family_read"] = False
    masked = (effects.router == "attn_res") & effects.family.isin(unread)
    effects.loc[masked, "n_masked_routers"] = 0
    row = motif_report(summary, effects).set_index("claim").loc["D1-attn_res"]
    # independent: D1 by hand over the two families read, embedding and current
    harm = {"embedding": -0.5, "current": -0.4}
    assert row.top_mass == "embedding" and row.top_effect == max(harm, key=harm.get)
    assert not row.present  # current's ci_high 0.45 is not below embedding's ci_low 0.3
    d3 = motif_report(summary, effects).set_index("claim").loc["D3-attn_res"]
    assert d3.top_harm == max(harm.values()) and not d3.present
    # a summary without family_read: a family of mass 0 may be unread, so it is refused
    with pytest.raises(ValueError, match=r"lacks the column 'family_read'.*motif_report"):
        motif_report(summary.drop(columns="family_read"), effects)
    # ... and one whose every family has mass is read everywhere: the verdicts as with it
    bare, bare_effects = tables()
    pd.testing.assert_frame_equal(
        motif_report(bare.drop(columns="family_read"), bare_effects),
        motif_report(bare, bare_effects),
    )
    # effects that masked routers for a family the summary says is unread: other models
    with pytest.raises(ValueError, match=r"says no router reads.*different models"):
        motif_report(summary, effects.assign(n_masked_routers=1))


def test_a_summary_without_family_read_takes_a_family_its_ablation_masked_as_read():
    """Audit 105: audit 100 read a summary without ``family_read`` (a ``mass_summary.csv``
    written before audit 53) as every family read only when each has mass, and refused it
    otherwise. A family read with weights that underflow to 0 has mass 0, but its ablation
    masked routers (an ablation masks only sources a router reads): the effects tell it is
    read, and the verdicts are those of the summary with ``family_read`` (before audit 100
    too). A family of mass 0 whose ablation masked nothing is still refused; a NaN mass is
    refused as non-finite, not as a summary without ``family_read``."""
    summary, effects = tables(
        effects={("attn_res", "all", "older"): harmful(-1.0)},
        mass={("attn_res", "older"): 0.0, ("attn_res", "embedding"): 0.5},
    )
    assert summary.family_read.all() and (effects.n_masked_routers > 0).all()
    bare = summary.drop(columns="family_read")
    got = motif_report(bare, effects)
    pd.testing.assert_frame_equal(got, motif_report(summary, effects))
    d1 = got.set_index("claim").loc["D1-attn_res"]
    assert d1.top_effect == "older" and d1.top_mass == "embedding"
    # mass 0 and an ablation that masked nothing: read with no weight, or not read at all
    nothing = effects.assign(
        n_masked_routers=effects.n_masked_routers.where(
            ~((effects.router == "attn_res") & (effects.family == "older")), 0
        )
    )
    with pytest.raises(ValueError, match=r"lacks the column 'family_read'.*motif_report"):
        motif_report(bare, nothing)
    # a NaN mass (its ablation masking nothing, or not) is no mass 0: named as non-finite
    bare.loc[(bare.router == "attn_res") & (bare.family == "older"), "mass"] = float("nan")
    for other in (nothing, effects):
        with pytest.raises(ValueError, match=r"non-finite mass at router='attn_res', family='old"):
            motif_report(bare, other)


def test_model_labels_that_mix_text_and_numbers_are_refused():
    """Audit 121: ``0`` and ``'0'`` are two labels to pandas (a table read back from a CSV
    concatenated with one in memory). motif_report of seed 0's tables given twice, once
    with seed '0', reported "two" models silently (20 rows; the same tables with seed 0
    twice are refused: several rows for one (router, group, family)); motif_verdicts of one
    condition's report labelled 1 and '1' split it in two conditions, each "2 of 2 seeds"
    (the report with condition 1 twice is refused: a seed with several rows), and of seeds
    0, 1 and '2' failed with pandas' bare TypeError, as verdict_changes of int and text
    seeds did (merge on int64 and str). Refused (`require_one_kind`), naming the column."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    effects = pd.concat([p[1] for p in parts], ignore_index=True)
    report = motif_report(summary, effects)
    one_summary, one_effects = parts[0]
    with pytest.raises(ValueError, match=r"several rows for .*\('router', 'group', 'family'\)"):
        motif_report(pd.concat([one_summary] * 2), pd.concat([one_effects] * 2))
    with pytest.raises(ValueError, match=r"effects's column 'seed' mixes text and numbers"):
        motif_report(
            pd.concat([one_summary, one_summary.assign(seed="0")]),
            pd.concat([one_effects, one_effects.assign(seed="0")]),
        )
    with pytest.raises(ValueError, match=r"seed\(s\) \[0, 1, 2\] have several"):
        motif_verdicts(pd.concat([report.assign(condition=1)] * 2))
    with pytest.raises(ValueError, match=r"the report's column 'condition' mixes text and"):
        motif_verdicts(pd.concat([report.assign(condition=1), report.assign(condition="1")]))
    text_2 = report.assign(seed=report.seed.astype(object).where(report.seed != 2, "2"))
    with pytest.raises(ValueError, match=r"the report's column 'seed' mixes text and numbers"):
        motif_verdicts(text_2)
    with pytest.raises(ValueError, match=r"the second report's column 'seed' mixes text"):
        verdict_changes(report, text_2)
    # one dtype again: the verdicts and changes of the unmixed report
    restored = text_2.astype({"seed": int})
    pd.testing.assert_frame_equal(motif_verdicts(restored), motif_verdicts(report))
    assert verdict_changes(report, restored).empty


TABLES = ("mass_summary", "effects", "motifs")


@pytest.mark.parametrize("study", ["grid", "paperlike"])
def test_motif_report_reads_the_stored_results_without_layers(study):
    """Audit 129: the stored ``mass_summary.csv`` files predate the ``layers`` column; beside
    their own ``effects.csv`` (the study's sweep) motif_report still reads them, and gives
    the stored per-seed decisions (those of seed 0, to keep the test fast)."""
    directory = Path(__file__).resolve().parents[1] / "docs" / "results" / study
    mass, effects, stored = (
        table[table.seed == 0]
        for table in (pd.read_csv(directory / f"{name}.csv") for name in TABLES)
    )
    assert "layers" not in mass.columns and not stored.empty
    report = motif_report(mass, effects)
    key = ["condition", "seed", "claim"]
    for column in ("present", "present_as_written"):
        got = report.set_index(key)[column].sort_index()
        pd.testing.assert_series_equal(got, stored.set_index(key)[column].sort_index())


@pytest.mark.parametrize("labelled", [True, False])
def test_a_summary_without_layers_is_checked_at_the_depth_of_its_conditions_recipe(labelled):
    """Audit 148: a summary without ``layers`` (the stored ``mass_summary.csv`` files) was
    paired by name with any effects that look like the study's sweep, those of a smaller
    model too: the stored hard_cumulative_L16 seed-0 mass (every layer of 16) beside the
    hard_cumulative_L8 seed-0 effects (group "all" = layers 0-7), labelled as the L16 model
    or not labelled, decided D1 present at both router types, where the L16 model's own
    effects decide it absent at both. A grid condition's recipe fixes its depth, so its
    rows are read as the default bands at that depth and checked exactly; the stored
    decisions are unchanged (`test_motif_report_reads_the_stored_results_without_layers`)."""
    from hooked_attnres.interventions.selection import depth_bands
    from hooked_attnres.study.conditions import get_condition

    directory = Path(__file__).resolve().parents[1] / "docs" / "results" / "grid"
    mass = pd.read_csv(directory / "mass_summary.csv")
    effects = pd.read_csv(directory / "effects.csv")
    big, small = "hard_cumulative_L16", "hard_cumulative_L8"
    mass = mass[(mass.condition == big) & (mass.seed == 0)]
    assert "layers" not in mass.columns
    smaller = effects[(effects.condition == small) & (effects.seed == 0)]
    n_big, n_small = get_condition(big).n_layers, get_condition(small).n_layers
    # the effects record their groups' layers: the default bands of the smaller depth
    recorded = dict(zip(smaller.group, smaller.layers, strict=True))
    bands = {**depth_bands(n_small), "all": list(range(n_small))}
    assert recorded == {g: ",".join(map(str, layers)) for g, layers in bands.items()}
    if labelled:
        smaller, where = smaller.assign(condition=big), f", condition='{big}', seed=0"
    else:
        smaller, where = smaller.drop(columns=["condition", "seed"]), ""
    listed = ", ".join(map(str, range(n_big)))
    with pytest.raises(
        ValueError,
        match=rf"^at router='attn_res'{where}, the mass summary has no 'layers' column .*"
        r"read as the default band of that name at the depth of their condition's recipe, "
        rf"layers \[{listed}\], but the effects of group 'all' masked layers "
        rf"\[{', '.join(map(str, range(n_small)))}\]: either the tables are of other models",
    ):
        motif_report(mass, smaller)


def test_a_summary_without_layers_of_a_grid_name_at_another_depth_names_the_remedy():
    """Review 157: a grid condition's name can hold a model of another depth (a model saved
    as ``{condition}_seed{n}/model`` without its metrics.json is studied as it is, as the
    tests' `tiny_study_runs` do). A summary without ``layers`` of such a model (here 6
    layers, studied as ``hard_kimi_L8``, whose recipe has 8) beside its own effects was
    refused as if its mass were of layers 0-7 ("are of layers [0, ..., 7]"), with the
    remedy "summarise the mass over the group's layers (routing_mass(..., bands=B) with
    ablation_effects(..., groups=B), or the defaults of both)", which the tables already
    are. The tables cannot tell the recipe's run from such a model, so it is still
    refused, saying so and naming what pairs them: the summary's ``layers`` column."""
    from hooked_attnres.study.conditions import get_condition

    condition = "hard_kimi_L8"
    summary, effects = tables({("mlp_res", "early", "embedding"): harmful(-1.0)}, seed=0)
    summary, effects = summary.assign(condition=condition), effects.assign(condition=condition)
    assert get_condition(condition).n_layers == 8 and LAYERS["all"] == "0,1,2,3,4,5"
    with pytest.raises(
        ValueError,
        match=r"^at router='attn_res', condition='hard_kimi_L8', seed=0, the mass summary "
        r"has no 'layers' column .* layers \[0, 1, 2, 3, 4, 5, 6, 7\], but the effects of "
        r"group 'all' masked layers \[0, 1, 2, 3, 4, 5\]: .*the run studied under this grid "
        r"condition's name is not of its recipe's depth .*recompute the summary with "
        r"summarize_mass\(routing_mass\(\.\.\.\)\) of this version .*or add the column "
        r"'layers'",
    ):
        motif_report(summary.drop(columns="layers"), effects)
    # the remedy: with the summary's layers, the tables are paired (M1 harmful: present)
    report = motif_report(summary, effects).set_index("claim")
    assert bool(report.loc["M1", "present"])


def test_by_as_one_column_name_is_that_column():
    """Audit 127: ``by="seed"`` was read letter by letter ("the first report lacks the
    column 's' that identifies a model"); summarize_mass takes one name as that column.
    Now so do motif_report, motif_verdicts and verdict_changes: the results of
    ``by=["seed"]``; ``by=5`` is refused by name."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)} if s else {}, seed=s) for s in range(2)]
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    effects = pd.concat([p[1] for p in parts], ignore_index=True)
    report = motif_report(summary, effects, by=["seed"])
    pd.testing.assert_frame_equal(motif_report(summary, effects, by="seed"), report)
    labelled = report.assign(condition="c")
    pd.testing.assert_frame_equal(
        motif_verdicts(labelled, by="condition"), motif_verdicts(labelled, by=["condition"])
    )
    swapped = [tables({cell: harmful(-1.0)} if not s else {}, seed=s) for s in range(2)]
    fresh = motif_report(
        *(pd.concat(t, ignore_index=True) for t in zip(*swapped, strict=True)), by=["seed"]
    )
    changed = verdict_changes(report, fresh, by=["seed"])
    assert not changed.empty
    pd.testing.assert_frame_equal(verdict_changes(report, fresh, by="seed"), changed)
    with pytest.raises(ValueError, match=r"^by must be a list .*got 5$"):
        verdict_changes(report, fresh, by=5)


def test_model_labels_of_two_tables_that_differ_in_kind_are_refused_by_name():
    """Audit 127: two tables each of one kind, but seeds 0, 1 in one and '0', '1' in the
    other (one read back from a CSV without dtypes): verdict_changes failed with pandas'
    own merge error ("You are trying to merge on int64 and str columns"), and motif_report
    said that the effects table lacks seed 0, which it holds. Refused, naming the column,
    both tables and the remedy; the same tables with one dtype again give the result of
    the unconverted ones."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(2)]
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    effects = pd.concat([p[1] for p in parts], ignore_index=True)
    report = motif_report(summary, effects)
    text = report.astype({"seed": str})
    with pytest.raises(
        ValueError,
        match=r"^the column 'seed' holds numbers in the first report and text in the second "
        r"report: .*give both one dtype",
    ):
        verdict_changes(report, text)
    with pytest.raises(ValueError, match=r"^the column 'condition' holds text in the first "):
        verdict_changes(report.assign(condition="1"), report.assign(condition=1))
    with pytest.raises(
        ValueError, match=r"^the column 'seed' holds numbers in mass_summary and text in effects"
    ):
        motif_report(summary, effects.astype({"seed": str}))
    pd.testing.assert_frame_equal(
        motif_report(summary, effects.astype({"seed": str}).astype({"seed": int})), report
    )
    assert verdict_changes(report, text.astype({"seed": int})).empty


def test_claim_text_refuses_an_unknown_claim_by_name():
    """Audit 138: an unknown claim id failed with a bare ``KeyError: 'D9'``."""
    from hooked_attnres.analysis import CLAIMS, claim_text

    with pytest.raises(ValueError, match=r"^claim must be one of \('M1', .*got 'D9'"):
        claim_text("D9")
    assert all(claim_text(claim) for claim in CLAIMS)  # the control: every claim has a text


def test_criteria_refuse_thresholds_outside_their_range_by_name():
    """Audit 145: ``Criteria(min_effect_fraction=-1)`` was taken, and made every harm
    "large" (harm >= -clean); every threshold of docs/study.md's criteria is a fraction,
    ratio, mass or deviation >= 0, and the accuracy drop and D3's mass are at most 1
    (accuracy and mass are fractions). The bounds themselves are taken."""
    from hooked_attnres.analysis import Criteria
    from hooked_attnres.analysis.motifs import CRITERIA_RANGES

    assert set(CRITERIA_RANGES) == set(Criteria.__dataclass_fields__)
    for name in Criteria.__dataclass_fields__:
        with pytest.raises(ValueError, match=rf"^Criteria's {name} must be (>= 0|\[0, 1\]) .*-0.5"):
            Criteria(**{name: -0.5})
        assert getattr(Criteria(**{name: 0}), name) == 0
    for name in ("min_accuracy_drop", "d3_min_mass"):
        with pytest.raises(ValueError, match=rf"^Criteria's {name} must be \[0, 1\] .*1.5$"):
            Criteria(**{name: 1.5})
        assert getattr(Criteria(**{name: 1}), name) == 1
    assert Criteria(d2_effect_ratio=3.0).d2_effect_ratio == 3.0  # ratios above 1 are taken


def test_motif_report_refuses_bands_that_are_not_the_preregistered_thirds():
    """Audit 156: docs/study.md's inputs are "the depth bands (thirds: early, middle, late;
    8 layers: 0-2, 3-5, 6-7; ...) and the group all (every layer of a router type at once)".
    motif_report read the bands by name only: effects whose group "early" masked layer 0
    alone and "middle" layers 1-3 of this 6-layer model (thirds: 0-1, 2-3, 4-5) decided M1
    present from them, a motif of a band the criteria do not define. Refused, naming each
    band's layers and the thirds; the same numbers on the thirds are decided as before."""
    summary, effects = tables({("mlp_res", "early", "embedding"): harmful(-1.0)})
    assert present(motif_report(summary, effects), "M1")  # the thirds of 6 layers
    other = effects.assign(
        layers=effects.layers.mask(effects.group == "early", "0").mask(
            effects.group == "middle", "1,2,3"
        )
    )
    with pytest.raises(
        ValueError,
        match=r"^motif_report reads the pre-registered depth bands \(docs/study\.md: thirds "
        r"of the layers\) and group 'all' of every layer, but the effects' group 'early' "
        r"masked layers \[0\]; the thirds of 6 layers: early \[0, 1\], middle \[2, 3\], late "
        r"\[4, 5\]",
    ):
        motif_report(summary, other)
    # group "all" of layers 0-3 (the mass summary's too) is read as 4 layers, whose thirds
    # the bands are not: nothing is decided on them either
    part = effects.assign(layers=effects.layers.mask(effects.group == "all", "0,1,2,3"))
    with pytest.raises(ValueError, match=r"group .middle. masked layers \[2, 3\]; the thirds of 4"):
        motif_report(summary.assign(layers="0,1,2,3"), part)


def test_verdicts_refuse_a_missing_per_seed_decision_rather_than_count_it_absent():
    """Audit 156: docs/study.md reports each claim as "present in k of n seeds". A report
    whose ``present`` is missing (NaN) for one seed, e.g. an empty cell of a motifs.csv
    read back, counted that seed as absent: M1 present in all three decided seeds read
    "present in 2 of 3 seeds (majority)"; verdict_changes counted a NaN as a change. Text
    decisions ("True" / "False") are no decisions either. Both are refused, naming the
    claim and seed; the decided report gives 3 of 3."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    report = motif_report(
        pd.concat([p[0] for p in parts], ignore_index=True),
        pd.concat([p[1] for p in parts], ignore_index=True),
    )
    m1 = motif_verdicts(report).set_index("claim").loc["M1"]
    assert (m1.k, m1.n, m1.verdict) == (3, 3, "replicated")
    missing = report.astype({"present": object})
    missing.loc[(missing.claim == "M1") & (missing.seed == 1), "present"] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^the report's column 'present' must hold True or False \(a decision\) in every "
        r"row, but 1 row\(s\) hold other values \(first: nan at claim='M1', seed=1\)",
    ):
        motif_verdicts(missing)
    with pytest.raises(ValueError, match=r"^the second report's column 'present' must hold"):
        verdict_changes(report, missing)
    with pytest.raises(
        ValueError,
        match=r"^the report's column 'present' .* 30 row\(s\) .*"
        r"first: 'True' at claim='M1', seed=0",
    ):
        motif_verdicts(report.assign(present=report.present.astype(str)))
    # decisions of the same values in an object column (a concatenation) are read
    assert motif_verdicts(report.astype({"present": object})).equals(motif_verdicts(report))


def test_criterion_2_as_first_written_is_read_exactly_at_a_clean_difference_below_0():
    """Audit 156: docs/study.md reads every comparison "on the exact values the tables hold"
    and a threshold that multiplies a value "as its decimal digits", and criterion 2 as
    first written is ``harm >= 0.05 * clean``. At clean -1 it was computed in floats,
    ``0.05 * -1.0`` is the float -0.05, so a harm of the float -0.05 (below -1/20 exactly:
    the float 0.05 is above 1/20) met it and ``present_as_written`` read True. Decided
    exactly now, as the text (a second reading, with Fractions) decides; an effect interval
    that excludes its own mean is what makes this harm-less motif "harmful" (criterion 1
    reads ci_high)."""
    from fractions import Fraction

    cell = ("mlp_res", "early", "embedding")
    effects = {cell: (0.05, -0.3, -0.1)}
    for band in ("middle", "late"):  # less harm elsewhere: early stays the most harmful band
        effects[("mlp_res", band, "embedding")] = (2.0, 0.0, 3.0)
    row = motif_report(*tables(effects, clean=-1.0)).set_index("claim").loc["M1"]
    assert row.harmful and row.localised and not row.large_by_accuracy
    as_written = Fraction(-0.05) >= Fraction(5, 100) * Fraction(-1.0)
    assert not as_written
    assert bool(row.present_as_written) is as_written
    # a harm exactly at 5 % of clean -20 (the float -1.0) meets it, as written
    effects[cell] = (1.0, -0.3, -0.1)
    row = motif_report(*tables(effects, clean=-20.0)).set_index("claim").loc["M1"]
    assert bool(row.present_as_written) is (Fraction(-1.0) >= Fraction(5, 100) * Fraction(-20.0))
    assert row.present_as_written and not row.present


def test_k_of_n_counts_numpy_booleans_of_an_object_column_as_the_decisions_they_are():
    """Review 160: `require_decisions` admits NumPy booleans in ``present`` (an object
    column, e.g. a seed's missing decision filled with ``row.ci_high < 0``, a NumPy
    comparison), but "k of n" summed them as Python objects, and ``np.True_ + np.True_`` is
    ``np.True_`` (NumPy's boolean sum is "or"): M1 present in all three seeds read "present
    in 1 of 3 seeds (minority)". Counted as the decisions they are: 3 of 3, as the report of
    Python booleans (the independent count: the seeds whose row holds a true decision)."""
    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    report = motif_report(
        pd.concat([p[0] for p in parts], ignore_index=True),
        pd.concat([p[1] for p in parts], ignore_index=True),
    )
    numpy_decisions = report.assign(
        present=pd.Series([np.bool_(v) for v in report.present], index=report.index, dtype=object)
    )
    assert {type(value) for value in numpy_decisions.present} == {np.bool_}
    m1 = report[report.claim == "M1"]
    expected = sum(1 for value in m1.present if value is True)
    assert expected == 3
    for table in (numpy_decisions, report):
        verdict = motif_verdicts(table).set_index("claim").loc["M1"]
        assert (verdict.k, verdict.n, verdict.verdict) == (expected, 3, "replicated")
        assert "present in 3 of 3 seeds (replicated)" in verdict.sentence


def test_present_and_family_read_are_decisions_by_one_rule():
    """Review 170: a report's ``present`` (audit 156, `require_decisions`) and a mass
    summary's ``family_read`` (`require_family_read_column`) are both columns of True /
    False, checked by two rules: ``family_read`` took the numbers 1 / 0 (a CSV column of 1
    and 0), ``present`` refused them. One rule now: a column is accepted or refused alike
    in both places, and an accepted one (1 / 0, NumPy booleans of an object column) gives
    the numbers of the boolean table (motif_verdicts' k of n, verdict_changes, the
    report); NaN, text and other numbers are refused in both."""
    from hooked_attnres.analysis.mass import require_family_read_column

    cell = ("mlp_res", "early", "embedding")
    parts = [tables({cell: harmful(-1.0)}, seed=seed) for seed in range(3)]
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    effects = pd.concat([p[1] for p in parts], ignore_index=True)
    report = motif_report(summary, effects)
    assert report.present.dtype == bool and report.present.nunique() == 2
    verdicts = motif_verdicts(report)
    variants = {
        "bool": lambda c: c,
        "NumPy booleans": lambda c: pd.Series(list(c.to_numpy()), index=c.index, dtype=object),
        "1 / 0": lambda c: c.astype(int),
        "1.0 / 0.0": lambda c: c.astype(float),
        "NaN": lambda c: c.astype(object).where(c.index != c.index[0], float("nan")),
        "text": lambda c: c.astype(str),
        "2": lambda c: c.astype(int).where(c.index != c.index[0], 2),
    }
    accepted = {}
    for name, convert in variants.items():
        outcomes = []
        for table, column, check in (
            (report, "present", motif_verdicts),
            (summary, "family_read", lambda t: require_family_read_column(t, "the test")),
        ):
            try:
                check(table.assign(**{column: convert(table[column])}))
                outcomes.append(True)
            except ValueError as error:
                assert "must hold True or False (a decision)" in str(error), (name, error)
                outcomes.append(False)
        assert outcomes[0] == outcomes[1], (name, outcomes)
        accepted[name] = outcomes[0]
    assert accepted == {
        "bool": True,
        "NumPy booleans": True,
        "1 / 0": True,
        "1.0 / 0.0": True,
        "NaN": False,
        "text": False,
        "2": False,
    }
    for name, convert in variants.items():
        if not accepted[name]:
            continue
        read = report.assign(present=convert(report.present))
        pd.testing.assert_frame_equal(motif_verdicts(read), verdicts)
        assert verdict_changes(report, read).empty and verdict_changes(read, report).empty
        same = summary.assign(family_read=convert(summary.family_read))
        pd.testing.assert_frame_equal(motif_report(same, effects), report)


def test_the_report_counts_d1_cases_as_decisions_whatever_the_column_holds(tmp_path):
    """The report's D1 sentence summed ``present`` as it was: an object column of NumPy
    booleans (which `require_decisions` takes as decisions) sums as NumPy's logical or, so
    "in k of n cases" read 1 for any k >= 1; a NaN read as present. Counted as booleans
    now, after the one check of a column of decisions."""
    import dataclasses

    import numpy as np

    from hooked_attnres.study.report import _conclusion

    result = fake_study(tmp_path, {"hard_cumulative_L8": ([0, 1, 2], [0, 1, 2])})
    motifs = result.motifs.copy()
    d1 = motifs.claim.str.startswith("D1")
    motifs.loc[d1, "present"] = True  # every D1 case present: k = n, counted independently
    n = int(d1.sum())
    assert n > 1

    def d1_line(table):
        lines = _conclusion(dataclasses.replace(result, motifs=table))
        return next(line for line in lines if line.startswith("Across Block AttnRes"))

    assert f" in {n} of {n} cases" in d1_line(motifs)
    as_numpy = motifs.assign(present=pd.Series([np.bool_(v) for v in motifs.present], dtype=object))
    assert d1_line(as_numpy) == d1_line(motifs)
    with pytest.raises(ValueError, match="present"):
        d1_line(motifs.assign(present=motifs.present.astype(object).where(~d1, np.nan)))


@pytest.mark.parametrize("threshold", [0.02, 0.05, 0.1, 0.15, 0.3, 0.7, 1 / 3, 0.6])
def test_custom_thresholds_decide_whole_prompt_ratios_at_the_threshold_as_the_ratios_do(
    threshold,
):
    """Audit 173: criterion 2 (the harm's fraction, the accuracy drop) and D3's mass test
    compare a float with the threshold's float, where D2 and D3's size test read the
    threshold as written. For a value that is a ratio k/n (k of n prompts losing their
    answer, a mass of 3/20) correctly rounded, the float comparison decides as the ratio
    does at the threshold itself and beside it, for any threshold; reading 0.15, 0.3, 0.7
    or 0.6 as written would refuse every tie (the float 0.3 is below 3/10: 3 of 10 prompts
    would not meet a 0.3 drop). For the pre-registered 0.02, 0.05 and 0.10 both readings
    agree (each float is above its decimal). Truth: the ratio as a Fraction."""
    from fractions import Fraction

    from hooked_attnres.analysis.motifs import Criteria, _criterion_2, _d3_present

    criteria = Criteria(
        min_accuracy_drop=threshold, min_effect_fraction=threshold, d3_min_mass=threshold
    )
    written = Fraction(repr(threshold))
    ties = 0
    for n in range(1, 61):
        for k in range(n + 1):
            met = Fraction(k, n) >= written
            ties += Fraction(k, n) == written
            by_accuracy, _ = _criterion_2(0.0, -(k / n), 1.0, criteria)
            _, large = _criterion_2(k / n, 0.0, 1.0, criteria)
            row = pd.Series(dict(mass=k / n, effect=0.0, ci_low=-1.0, ci_high=1.0))
            assert (by_accuracy, large, _d3_present(row, 1.0, criteria)) == (met, met, met)
    assert ties > 0 or threshold == 1 / 3  # 1/3 is written 0.3333333333333333: no k/n ties


def test_the_preregistered_thresholds_compared_as_floats_decide_every_float_as_written():
    """Review 180: docs/study.md says which comparisons read a threshold as its decimal
    digits (D2's ratios, D3's 0.10 x harm) and which compare a value with the threshold's
    float (criterion 2's fraction >= 0.05 and accuracy drop >= 0.02, D3's mass >= 0.10, the
    schedule claim's deviation <= 1e-6), and that for the pre-registered thresholds both
    decide every float alike: the float of 0.05, 0.02 and 0.10 is above its decimal (no
    float lies between, as it is the nearest), the float of 1e-6, read by <=, below it.
    Checked here at the threshold's float and its 20 nearest floats each side, with the
    decimal reading (a Fraction of the digits) as the truth."""
    import math
    from fractions import Fraction

    from hooked_attnres.analysis.motifs import PREREGISTERED, _criterion_2, _d3_present

    def around(threshold):
        values, up, down = [threshold], threshold, threshold
        for _ in range(20):
            up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
            values += [up, down]
        return values

    c = PREREGISTERED
    for value in around(c.min_effect_fraction):
        _, large = _criterion_2(value, 0.0, 1.0, c)
        assert large is (Fraction(value) >= Fraction(repr(c.min_effect_fraction))), value
    for value in around(c.min_accuracy_drop):
        by_accuracy, _ = _criterion_2(0.0, -value, 1.0, c)
        assert by_accuracy is (Fraction(value) >= Fraction(repr(c.min_accuracy_drop))), value
    for value in around(c.d3_min_mass):
        row = pd.Series(dict(mass=value, effect=0.0, ci_low=-1.0, ci_high=1.0))
        assert _d3_present(row, 1.0, c) is (Fraction(value) >= Fraction(repr(c.d3_min_mass)))
    # the schedule claim (report.py: largest <= threshold): no float in (its float, 1e-6]
    written = Fraction(repr(c.schedule_max_deviation))
    for value in around(c.schedule_max_deviation):
        assert (value <= c.schedule_max_deviation) is (Fraction(value) <= written), value
    # each of the four rounds the way that agrees; 0.3 rounds down, and the float 0.3,
    # read by >=, meets it as a float and not as written (a custom threshold)
    assert all(
        Fraction(t) > Fraction(repr(t))
        for t in (c.min_effect_fraction, c.min_accuracy_drop, c.d3_min_mass)
    )
    assert Fraction(c.schedule_max_deviation) < written
    assert Fraction(0.3) < Fraction("0.3")


def test_the_report_tables_headers_read_the_level_of_the_settings(tmp_path):
    """Audit 177's leftover: the effect tables' headers were the fixed text "mass [95% CI]"
    and "effect, all layers [95% CI]", whatever level the study's settings record, and wrote
    it otherwise than the rest of the report ("95 %", `level_text`). They now read the level
    from the settings, as the criteria line and the figures paragraph do."""
    from hooked_attnres.study.report import study_report

    seeds = {"hard_cumulative_L8": ([0], [0])}
    for recorded, level in ((None, "95 %"), ({"confidence": 0.9}, "90 %")):
        text = study_report(fake_study(tmp_path, seeds, settings=recorded))
        headers = [line for line in text.splitlines() if line.startswith("| router | family |")]
        assert headers and all(
            f"| mass [{level} CI] | effect, all layers [{level} CI] |" in line for line in headers
        ), headers
        assert "95% CI" not in text
