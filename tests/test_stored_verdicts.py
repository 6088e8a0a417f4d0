"""The stored study results against the pre-registered criteria, decided independently.

Audit 112: the criteria of docs/study.md ("Pre-registered criteria", amendments 1-4, the
exact reading of thresholds, and the note of audit 100 on the families a router type
reads) are implemented here a second time, from the text alone and without
`hooked_attnres.analysis`, on the stored inputs of every stored study
(``docs/results/{grid,paperlike}/effects.csv`` and ``mass_summary.csv``). Every stored
per-seed decision (``motifs.csv``: ``present`` and ``present_as_written``), every k/n and
verdict word (``verdicts.csv``) and the robustness list (``robustness.csv`` against
``fresh_motifs.csv``) must be what the text decides. The duplication of the criteria is
the point: a second reading that agrees with the code on the published numbers.
"""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STUDIES = ("grid", "paperlike")
BANDS = ("early", "middle", "late")
FAMILIES = ("embedding", "older", "prev_completed", "current")
ROUTERS = ("attn_res", "mlp_res")
MOTIFS = {  # claim: (family, router type, band), docs/study.md's motif table
    "M1": ("embedding", "mlp_res", "early"),
    "M2-attn": ("current", "attn_res", "early"),
    "M2-mlp": ("current", "mlp_res", "early"),
    "M3": ("older", "attn_res", "late"),
}


def exact(x: float) -> Fraction:
    """The exact value a table holds (thresholds are written as their decimal digits)."""
    return Fraction(float(x))


def decide_one_model(effects: pd.DataFrame, mass: pd.DataFrame, as_written: bool) -> dict:
    """{claim: present} of one model; ``as_written``: criterion 2 without amendment 1."""
    ld = {
        (r.router, r.group, r.family): r
        for r in effects[effects.metric == "logit_diff"].itertuples()
    }
    acc = {
        (r.router, r.group, r.family): exact(r.effect)
        for r in effects[effects.metric == "accuracy"].itertuples()
    }
    mass_all = {(r.router, r.family): exact(r.mass) for r in mass[mass.band == "all"].itertuples()}
    (clean,) = {exact(r.clean) for r in ld.values()}
    out = {}
    for claim, (family, router, band) in MOTIFS.items():
        row = ld[(router, band, family)]
        harm = -exact(row.effect)
        harmful = exact(row.ci_high) < 0
        by_logits = harm >= Fraction(5, 100) * clean and (as_written or clean > 0)
        large = by_logits or acc[(router, band, family)] <= Fraction(-2, 100)
        localised = harm >= max(-exact(ld[(router, b, family)].effect) for b in BANDS)
        out[claim] = harmful and large and localised
    out["M2"] = out["M2-attn"] and out["M2-mlp"]
    for router in ROUTERS:
        # the families the router type reads: some mass, or an ablation that masked a router
        read = [
            f
            for f in FAMILIES
            if mass_all[(router, f)] > 0 or ld[(router, "all", f)].n_masked_routers > 0
        ]
        masses = {f: mass_all[(router, f)] for f in read}
        harms = {f: -exact(ld[(router, "all", f)].effect) for f in read}
        top_mass = {f for f in read if masses[f] == max(masses.values())}
        top_effect = {f for f in read if harms[f] == max(harms.values())}
        out[f"D1-{router}"] = not (top_mass & top_effect) and all(
            exact(ld[(router, "all", e)].ci_high) < exact(ld[(router, "all", m)].ci_low)
            for e in top_effect
            for m in top_mass
        )
        prev = ld[(router, "all", "prev_completed")]
        contains_0 = exact(prev.ci_low) <= 0 <= exact(prev.ci_high)
        small = abs(exact(prev.effect)) < Fraction(10, 100) * max(harms.values())
        out[f"D3-{router}"] = mass_all[(router, "prev_completed")] >= Fraction(10, 100) and (
            contains_0 or small
        )
    emb, cur = ld[("mlp_res", "all", "embedding")], ld[("mlp_res", "all", "current")]
    out["D2"] = (
        mass_all[("mlp_res", "embedding")] < Fraction(1, 2) * mass_all[("mlp_res", "current")]
        and -exact(emb.effect) >= 2 * max(-exact(cur.effect), Fraction(0))
        and exact(emb.ci_high) < 0
    )
    return out


def decide(directory: Path) -> pd.DataFrame:
    effects = pd.read_csv(directory / "effects.csv")
    mass = pd.read_csv(directory / "mass_summary.csv")
    rows = []
    for (condition, seed), model_effects in effects.groupby(["condition", "seed"], sort=False):
        model_mass = mass[(mass.condition == condition) & (mass.seed == seed)]
        amended = decide_one_model(model_effects, model_mass, as_written=False)
        written = decide_one_model(model_effects, model_mass, as_written=True)
        for claim in amended:
            rows.append((condition, seed, claim, amended[claim], written[claim]))
    return pd.DataFrame(
        rows, columns=["condition", "seed", "claim", "present", "present_as_written"]
    )


def word(k: int, n: int) -> str:
    """The pre-registered words, with amendment 3 (one seed replicates nothing)."""
    if k == 0:
        return "absent"
    if k == n:
        return "single seed" if n == 1 else "replicated"
    return "majority" if 2 * k > n else "minority"


# every merge is one row to one row: a row stored twice in place of another's (the other
# missing) kept the lengths equal and was matched twice, unnoticed (audit 113)
ONE_TO_ONE = "one_to_one"


def check_decisions(directory: Path) -> None:
    """The stored ``motifs.csv`` and ``verdicts.csv`` of ``directory`` are what the text
    decides from its ``effects.csv`` and ``mass_summary.csv``."""
    mine = decide(directory)
    stored = pd.read_csv(directory / "motifs.csv")
    assert len(stored) == len(mine) == 10 * mine.groupby(["condition", "seed"]).ngroups
    both = stored.merge(
        mine, on=["condition", "seed", "claim"], suffixes=("", "_text"), validate=ONE_TO_ONE
    )
    assert len(both) == len(stored)
    for column in ("present", "present_as_written"):
        differ = both[both[column].astype(bool) != both[f"{column}_text"]]
        assert differ.empty, differ[["condition", "seed", "claim", column, f"{column}_text"]]

    counts = mine.groupby(["condition", "claim"]).present.agg(["sum", "count"]).reset_index()
    verdicts = pd.read_csv(directory / "verdicts.csv")
    merged = verdicts.merge(counts, on=["condition", "claim"], validate=ONE_TO_ONE)
    assert len(merged) == len(verdicts) == len(counts)
    assert list(merged.k) == list(merged["sum"])
    assert list(merged.n) == list(merged["count"])
    assert list(merged.verdict) == [
        word(k, n) for k, n in zip(merged["sum"], merged["count"], strict=True)
    ]


def check_robustness(directory: Path) -> None:
    """The stored ``robustness.csv`` lists every decision of ``motifs.csv`` that
    ``fresh_motifs.csv`` (the second prompt set) changes, and only those."""
    first = pd.read_csv(directory / "motifs.csv")
    second = pd.read_csv(directory / "fresh_motifs.csv")
    both = first.merge(
        second,
        on=["condition", "seed", "claim"],
        suffixes=("_first", "_second"),
        validate=ONE_TO_ONE,
    )
    assert len(both) == len(first) == len(second)
    changed = both[both.present_first != both.present_second]
    key = ["condition", "seed", "claim", "present_first", "present_second"]
    listed = pd.read_csv(directory / "robustness.csv")
    assert sorted(map(tuple, changed[key].values.tolist())) == sorted(
        map(tuple, listed[key].values.tolist())
    )


@pytest.mark.parametrize("study", STUDIES)
def test_every_stored_decision_is_the_preregistered_texts(study):
    check_decisions(RESULTS / study)


@pytest.mark.parametrize("study", STUDIES)
def test_the_stored_robustness_list_is_every_decision_the_second_prompt_set_changes(study):
    check_robustness(RESULTS / study)


@pytest.mark.parametrize("table", ["motifs.csv", "verdicts.csv", "fresh_motifs.csv"])
def test_a_row_stored_twice_in_place_of_another_is_caught(tmp_path, table):
    """Audit 113: a table with one row stored twice and another missing has the right
    length, and each merge matched the twice-stored row twice: the checks passed (e.g.
    ``verdicts.csv`` without one claim's verdict). Every merge is one to one now."""
    shutil.copytree(RESULTS / "paperlike", tmp_path, dirs_exist_ok=True)
    rows = pd.read_csv(tmp_path / table)
    rows.iloc[[1]] = rows.iloc[[0]].to_numpy()  # row 0 twice, row 1 gone
    rows.to_csv(tmp_path / table, index=False)
    check = check_robustness if table == "fresh_motifs.csv" else check_decisions
    with pytest.raises(pd.errors.MergeError, match="not a one-to-one merge"):
        check(tmp_path)
