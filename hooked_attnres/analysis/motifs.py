"""The seed paper's routing motifs and mass-versus-effect dissociations, as pre-registered tests.

The criteria are those written in ``docs/study.md`` ("Pre-registered criteria", 2026-11-28)
before any condition of the grid was measured; `PREREGISTERED` holds their thresholds and
`motif_report` applies them to the tables every study produces, with the dated
amendments written below them (1: criterion 2's 5 % test needs a positive clean logit
difference, and ``present_as_written`` gives each verdict without it; 2: the schedule
claim's threshold; 3: ``single seed`` instead of ``replicated`` for 1 of 1). Verdicts
are generated from the numbers (`motif_verdicts`), never typed by hand.

Motifs (family, router type, band), present in a seed when the ablation effect there is
(1) harmful with a 95 % interval excluding 0, (2) at least 5 % of the clean logit
difference (if it is positive) or at least 2 accuracy points, and (3) the family's most
harmful band at that router type:

* M1: ``embedding`` through early MLP routers;
* M2: ``current`` through early attention **and** MLP routers (M2-attn, M2-mlp alone);
* M3: ``older`` through late attention routers.

Dissociations (group ``all``): D1 per router type (the top-mass family is not the
top-effect family and their effect intervals are separated); D2 in MLP routers
(embedding mass < 0.5 x current mass while embedding harm >= 2 x current harm, embedding's
interval excluding 0); D3 per router type (``prev_completed`` mass >= 0.10 and its effect
interval contains 0 or its effect is < 10 % of the top family's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import partial
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from hooked_attnres._validation import (
    as_items,
    first_non_finite,
    require_choice,
    require_columns,
    require_decisions,
    require_finite_number,
    require_integer,
    require_keys,
    require_one_row,
    require_same_kind,
)
from hooked_attnres.analysis.effects import require_measured
from hooked_attnres.analysis.mass import (
    default_sweep_mismatch,
    every_layer_mass,
    require_family_read_column,
    require_family_rows,
    require_read_agrees,
    require_summary_and_effects,
)
from hooked_attnres.model.depth import FAMILIES, SUBLAYER_ROUTERS

BANDS = ("early", "middle", "late")
ROUTER_NAMES = {"attn_res": "attention", "mlp_res": "MLP"}
# claim -> (family, router types, band, description)
MOTIFS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "M1": ("embedding", ("mlp_res",), "early", "embedding through early MLP routers"),
    "M2": (
        "current",
        ("attn_res", "mlp_res"),
        "early",
        "current through early attention and MLP routers",
    ),
    "M2-attn": ("current", ("attn_res",), "early", "current through early attention routers"),
    "M2-mlp": ("current", ("mlp_res",), "early", "current through early MLP routers"),
    "M3": ("older", ("attn_res",), "late", "older history through late attention routers"),
}
DISSOCIATIONS = {
    "D1-attn_res": (
        "attention routers: the top-mass family is not the top-effect family, and their "
        "effect intervals are separated"
    ),
    "D1-mlp_res": (
        "MLP routers: the top-mass family is not the top-effect family, and their effect "
        "intervals are separated"
    ),
    # D2 / D3 name their thresholds: `claim_text` writes them from a `Criteria`
    "D2": (
        "MLP routers: embedding has < {d2_mass_ratio}x current's mass and >= "
        "{d2_effect_ratio}x its harm (current's counted as >= 0), embedding's effect "
        "interval excluding 0"
    ),
    "D3-attn_res": (
        "attention routers: prev_completed has >= {d3_min_mass} mass, its effect's interval "
        "contains 0 or |effect| < {d3_max_effect_fraction}x the top harm"
    ),
    "D3-mlp_res": (
        "MLP routers: prev_completed has >= {d3_min_mass} mass, its effect's interval "
        "contains 0 or |effect| < {d3_max_effect_fraction}x the top harm"
    ),
}
CLAIMS = (*MOTIFS, *DISSOCIATIONS)


# each Criteria field's valid range (low, high or None, why), read against docs/study.md
CRITERIA_RANGES: dict[str, tuple[float, Optional[float], str]] = {
    "min_effect_fraction": (0, None, "a fraction of the clean logit difference"),
    "min_accuracy_drop": (0, 1, "a drop of accuracy, a fraction in [0, 1]"),
    "d2_mass_ratio": (0, None, "a ratio of two masses"),
    "d2_effect_ratio": (0, None, "a ratio of two harms"),
    "d3_min_mass": (0, 1, "a routing mass, a fraction in [0, 1]"),
    "d3_max_effect_fraction": (0, None, "a fraction of the top harm"),
    "schedule_max_deviation": (0, None, "a largest absolute deviation"),
}


@dataclass(frozen=True)
class Criteria:
    """Thresholds of the criteria (the defaults are the pre-registered ones).

    Attributes:
        min_effect_fraction: a motif's harm must be at least this fraction of the clean
            logit difference ...
        min_accuracy_drop: ... or the accuracy must fall by at least this much (0.02 = 2
            points).
        d2_mass_ratio: D2: embedding mass below this times current mass.
        d2_effect_ratio: D2: embedding harm at least this times current harm.
        d3_min_mass: D3: prev_completed mass at least this.
        d3_max_effect_fraction: D3: or its |effect| below this fraction of the top harm.
        schedule_max_deviation: the schedule claim (a recency-wrapped vanilla model routes
            as the analytic schedule predicts) holds when the largest ``|measured -
            predicted|`` family mass is at most this (``docs/study.md``, amendment 2).

    Every threshold is a finite number in its range (`CRITERIA_RANGES`), else
    ``ValueError``: each is a fraction, ratio, mass or deviation that is never negative
    (``min_effect_fraction=-1`` made every harm "large" without a word), and the two read
    against a fraction in [0, 1] (an accuracy drop, a routing mass) are at most 1 (above
    it no model could meet them).
    """

    min_effect_fraction: float = 0.05
    min_accuracy_drop: float = 0.02
    d2_mass_ratio: float = 0.5
    d2_effect_ratio: float = 2.0
    d3_min_mass: float = 0.10
    d3_max_effect_fraction: float = 0.10
    schedule_max_deviation: float = 1e-6

    def __post_init__(self) -> None:
        # every threshold a finite number, kept as the Python number (D2 reads its ratios
        # exactly, as written: an infinite one has no digits)
        for name in self.__dataclass_fields__:
            value = require_finite_number(f"Criteria's {name}", getattr(self, name))
            low, high, why = CRITERIA_RANGES[name]
            if value < low or (high is not None and value > high):
                span = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"Criteria's {name} must be {span} ({why}), got {value!r}")
            object.__setattr__(self, name, value)


PREREGISTERED = Criteria()
# the level of every interval the criteria read ("95 % percentile-bootstrap intervals")
PREREGISTERED_CONFIDENCE = 0.95


def _effect_rows(effects: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One model's ``metric`` rows indexed by ``(router, group, family)``; refuses a table
    without them, with several rows of a cell, or without a cell the verdicts read (every
    family at both sublayer router types in each band and ``all``)."""
    chosen = effects[effects.metric == metric]
    if chosen.empty:
        raise ValueError(
            f"the effects table has no {metric!r} rows; run ablation_effects with "
            f"metrics including {metric!r} (the pre-registered criteria read 'logit_diff' "
            "and, for criterion 2's 2 points, 'accuracy')"
        )
    require_one_row(
        chosen,
        ("router", "group", "family"),
        "the effects table",
        "pass one model seed at a time (motif_report splits by a 'seed' column)",
    )
    chosen = chosen.set_index(["router", "group", "family"])
    needed = [(r, g, f) for r in SUBLAYER_ROUTERS for g in (*BANDS, "all") for f in FAMILIES]
    missing = [cell for cell in needed if cell not in chosen.index]
    if missing:
        raise ValueError(
            f"the {metric!r} effects lack the (router, group, family) rows {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}; the verdicts read every family at both "
            "router types in each band and 'all': pass the whole ablation_effects table"
        )
    return chosen


def _all_layer_mass(mass_summary: pd.DataFrame) -> pd.Series:
    """The mass of every (sublayer router type, family) over all layers, indexed by both.
    Refuses a summary that lacks one (never a silent 0: `routing_mass` gives every family
    a row at every router, mass 0 where it is absent)."""
    table = mass_summary
    if "band" in table.columns:
        table = table[table.band == "all"]
        if table.empty:
            raise ValueError(
                "mass_summary has a 'band' column but no band 'all' rows (bands found: "
                f"{sorted(set(mass_summary.band))}); pass summarize_mass(mass, by=('router', "
                "'family')), or summarize mass.assign(band='all') as the study does"
            )
    require_one_row(
        table,
        ("router", "family"),
        "mass_summary",
        "pass one seed's summary over all layers (band 'all')",
    )
    require_family_rows(table, SUBLAYER_ROUTERS, "mass_summary")
    return table.set_index(["router", "family"]).mass


def _families_read(mass_summary: pd.DataFrame, effects: pd.DataFrame) -> pd.Series:
    """Whether some router of each sublayer type reads each family, indexed by (router,
    family): the summary's ``family_read`` (the one rule, as `dissociation_report`), so
    that D1 and D3 rank only families the router type has (an unread family's harm 0, its
    ablation masking nothing, topped the ranking where every read family's ablation
    helps). A summary without the column (a ``mass_summary.csv`` written before audit 53)
    is read as every family read when each has mass or an ablation that masked a router
    for it (a mass > 0 has a source, and an ablation masks only sources a router reads; a
    read family's mass underflows to 0 where its weight does), and refused otherwise;
    effects that masked routers for an unread family are refused (tables of different
    models)."""
    table = mass_summary
    if "band" in table.columns:
        table = table[table.band == "all"]
    table = table[table.router.isin(SUBLAYER_ROUTERS)]
    chosen = effects[(effects.metric == "logit_diff") & (effects.group == "all")]
    if "family_read" not in table.columns:
        read = table.set_index(["router", "family"]).mass > 0
        if "n_masked_routers" in chosen.columns:
            masked = chosen.set_index(["router", "family"]).n_masked_routers > 0
            read |= masked.reindex(read.index, fill_value=False)
        if bool(read.all()):
            return read
    require_family_read_column(table, "motif_report (D1 and D3 rank the families read)")
    read = table.set_index(["router", "family"]).family_read.astype(bool)
    if "n_masked_routers" in effects.columns:
        for router in SUBLAYER_ROUTERS:
            masked = chosen[chosen.router == router].set_index("family").n_masked_routers
            require_read_agrees(read.loc[router], masked, f"router {router!r}")
    return read


def _check_inputs(mass_summary: pd.DataFrame, effects: pd.DataFrame) -> None:
    require_summary_and_effects(mass_summary, effects, extra=("clean",))
    require_measured(effects, "motif_report")
    if "confidence" in effects.columns:
        levels = sorted(set(effects.confidence.astype(float)))
        if any(abs(level - PREREGISTERED_CONFIDENCE) > 1e-12 for level in levels):
            raise ValueError(
                f"the effects table holds {levels} intervals; the pre-registered criteria "
                f"read 95 % intervals (criterion 1, D1-D3): run ablation_effects with "
                f"confidence={PREREGISTERED_CONFIDENCE}"
            )
    groups = set(effects.group)
    needed = {*BANDS, "all"} - groups
    if needed:
        raise ValueError(
            f"the effects table needs the groups {sorted({*BANDS, 'all'})} (depth "
            f"bands and 'all'); it lacks {sorted(needed)}: run ablation_effects("
            "groups={**depth_bands(n_layers), 'all': range(n_layers)}) (a model needs at "
            "least 3 layers for the three bands)"
        )


def _require_finite(logit: pd.DataFrame, accuracy: pd.DataFrame, mass: pd.Series) -> None:
    """Refuse NaN / infinite numbers among those the verdicts read: a comparison with NaN
    is False, so an interval of one prompt (NaN) would read as "absent", and NaN in one
    band would decide localisation by the order of the bands (Python's ``max``)."""
    routers = list(SUBLAYER_ROUTERS)
    groups = [*BANDS, "all"]
    read = logit[
        logit.index.get_level_values("router").isin(routers)
        & logit.index.get_level_values("group").isin(groups)
    ]
    chosen = accuracy[
        accuracy.index.get_level_values("router").isin(routers)
        & accuracy.index.get_level_values("group").isin(groups)
    ]
    cells = [
        (read, ["effect", "ci_low", "ci_high", "clean"], "logit_diff"),
        (chosen, ["effect"], "accuracy"),
    ]
    for table, columns, metric in cells:
        values = table[columns].to_numpy(dtype=float)
        found = first_non_finite(values)
        if found is not None:
            row, column = found
            router, group, family = table.index[row]
            # the count as it is (int() read 1.5 as 1 and failed on NaN: audit 196)
            count = table.n_prompts.iloc[row] if "n_prompts" in table.columns else None
            prompts = f" from {np.asarray(count).tolist()!r} prompt(s)" if pd.notna(count) else ""
            raise ValueError(
                f"the {metric} effects hold a non-finite {columns[column]} "
                f"({values[row, column]}) at router={router!r}, group={group!r}, "
                f"family={family!r}{prompts}; the pre-registered verdicts compare these "
                "numbers and cannot be decided from NaN (a bootstrap interval needs at least "
                "2 prompts): run ablation_effects on more prompts, or find what made the "
                "metric non-finite"
            )
    masses = mass.loc[[(r, f) for r in routers for f in FAMILIES]]
    found = first_non_finite(masses)
    if found is not None:
        router, family = masses.index[found[0]]
        raise ValueError(
            f"mass_summary holds a non-finite mass at router={router!r}, family={family!r}; "
            "the dissociations cannot be decided from it: recompute summarize_mass of a "
            "routing_mass table without NaN"
        )


def _one_seed(mass_summary: pd.DataFrame, effects: pd.DataFrame, criteria: Criteria) -> list[dict]:
    _check_inputs(mass_summary, effects)
    logit = _effect_rows(effects, "logit_diff")
    # criterion 2's "or at most -0.02 accuracy": without these rows it could never hold
    accuracy = _effect_rows(effects, "accuracy")
    mass = _all_layer_mass(mass_summary)
    # D1 and D3 pair that mass with the effects of group "all": of the same layers
    every_layer_mass(
        mass_summary[mass_summary.router.isin(SUBLAYER_ROUTERS)],
        effects,
        "motif_report (D1 and D3 pair the mass over every layer with the effects of group 'all')",
    )
    # the criteria's bands are the thirds of the layers, "all" every layer: a group named
    # "early" of other layers decided the motifs of a band the criteria do not define
    mismatch = default_sweep_mismatch(effects)
    if mismatch is not None:
        raise ValueError(
            "motif_report reads the pre-registered depth bands (docs/study.md: thirds of "
            "the layers) and group 'all' of every layer, but "
            f"{mismatch}: run ablation_effects(groups={{**depth_bands(n_layers), 'all': "
            "range(n_layers)}) (the study's sweep)"
        )
    _require_finite(logit, accuracy, mass)
    # after the finiteness check: a NaN mass is no "mass 0" (it was refused as a summary
    # without family_read)
    read = _families_read(mass_summary, effects)
    cleans = sorted(set(logit.clean.astype(float)))
    if len(cleans) > 1:
        raise ValueError(
            f"the logit_diff effects hold {len(cleans)} different clean logit differences "
            f"({cleans[:3]}...): one model on one prompt set has one; pass one "
            "ablation_effects table per model and prompt set (criterion 2 compares the harm "
            "with it)"
        )
    clean = cleans[0]
    rows: list[dict] = []

    def cell(router: str, group: str, family: str) -> pd.Series:
        return logit.loc[(router, group, family)]

    def motif_part(family: str, router: str, band: str) -> dict:
        here = cell(router, band, family)
        harms = {b: -float(cell(router, b, family).effect) for b in BANDS}
        acc = float(accuracy.loc[(router, band, family)].effect)
        harmful = bool(here.ci_high < 0)
        fraction = float(-here.effect / clean) if clean > 0 else np.nan
        by_accuracy, large = _criterion_2(fraction, acc, clean, criteria)
        # as first written (before amendment 1), any harm met 5 % of a clean <= 0; read
        # exactly, as written (0.05 * -1.0 is the float -0.05, which a harm of the float
        # -0.05, below -1/20 exactly, met)
        by_size = (
            bool(fraction >= criteria.min_effect_fraction)
            if clean > 0
            else bool(
                -_exactly(here.effect)
                >= _as_written(criteria.min_effect_fraction) * _exactly(clean)
            )
        )
        localised = harms[band] >= max(harms.values())
        return dict(
            effect=float(here.effect),
            ci_low=float(here.ci_low),
            ci_high=float(here.ci_high),
            clean=clean,
            effect_fraction=fraction,
            accuracy_effect=acc,
            harmful=harmful,
            large=large,
            large_by_accuracy=by_accuracy,
            localised=localised,
            # every band tied for the most harm, joined by | (as D1's tied families): the
            # first of a tie alone named another band than a present motif's
            largest_band="|".join(b for b in BANDS if harms[b] == max(harms.values())),
            present=harmful and large and localised,
            present_as_written=harmful and (by_size or by_accuracy) and localised,
        )

    for claim, (family, routers, band, _) in MOTIFS.items():
        parts = [motif_part(family, router, band) for router in routers]
        row = dict(
            claim=claim,
            kind="motif",
            family=family,
            router="+".join(routers),
            band=band,
            present=all(p["present"] for p in parts),
            present_as_written=all(p["present_as_written"] for p in parts),
        )
        if len(parts) == 1:
            row.update(
                {k: v for k, v in parts[0].items() if k not in ("present", "present_as_written")}
            )
        else:  # M2: the numbers are those of its parts, M2-attn and M2-mlp
            row.update(clean=clean)
        rows.append(row)

    def family_table(router: str) -> pd.DataFrame:
        out = []
        for family in FAMILIES:
            e = cell(router, "all", family)
            out.append(
                dict(
                    family=family,
                    mass=float(mass.loc[(router, family)]),
                    effect=float(e.effect),
                    ci_low=float(e.ci_low),
                    ci_high=float(e.ci_high),
                    harm=-float(e.effect),
                )
            )
        return pd.DataFrame(out).set_index("family")

    for router in SUBLAYER_ROUTERS:
        whole = family_table(router)
        # the families the router type reads (an unread one's harm 0 is no measured harm)
        table = whole[[bool(read.loc[(router, f)]) for f in whole.index]]
        # ties (amendment 4): every family tied for the top must satisfy D1
        mass_tops = list(table.index[table.mass == table.mass.max()])
        effect_tops = list(table.index[table.harm == table.harm.max()])
        top_mass, top_effect = "|".join(mass_tops), "|".join(effect_tops)
        separated = all(
            bool(table.loc[e, "ci_high"] < table.loc[m, "ci_low"])
            for e in effect_tops
            for m in mass_tops
        )
        rows.append(
            dict(
                claim=f"D1-{router}",
                kind="dissociation",
                router=router,
                top_mass=top_mass,
                top_effect=top_effect,
                separated=separated,
                present=not set(mass_tops) & set(effect_tops) and separated,
            )
        )
        pc = whole.loc["prev_completed"]  # unread: mass 0, so D3 does not hold
        top_harm = float(table.harm.max())
        effect_limit = criteria.d3_max_effect_fraction * top_harm
        rows.append(
            dict(
                claim=f"D3-{router}",
                kind="dissociation",
                router=router,
                family="prev_completed",
                mass=float(pc.mass),
                effect=float(pc.effect),
                ci_low=float(pc.ci_low),
                ci_high=float(pc.ci_high),
                top_effect=top_effect,
                top_harm=top_harm,
                effect_limit=effect_limit,
                present=_d3_present(pc, top_harm, criteria),
            )
        )
    mlp = family_table("mlp_res")
    emb, cur = mlp.loc["embedding"], mlp.loc["current"]
    mass_ok = _d2_mass(emb.mass, cur.mass, criteria)
    effect_ok = _d2_effect(emb.effect, cur.effect, criteria) and bool(emb.ci_high < 0)
    rows.append(
        dict(
            claim="D2",
            kind="dissociation",
            router="mlp_res",
            mass_embedding=float(emb.mass),
            mass_current=float(cur.mass),
            effect_embedding=float(emb.effect),
            effect_current=float(cur.effect),
            ci_high_embedding=float(emb.ci_high),
            present=mass_ok and effect_ok,
        )
    )
    for row in rows:  # amendment 1 changes criterion 2 of the motifs only
        row.setdefault("present_as_written", row["present"])
    order = {claim: i for i, claim in enumerate(CLAIMS)}
    return sorted(rows, key=lambda r: order[r["claim"]])


def _criterion_2(
    fraction: float, accuracy_effect: float, clean: float, criteria: Criteria
) -> tuple[bool, bool]:
    """A motif's criterion 2 (``(by_accuracy, large)``): the harm at least
    ``min_effect_fraction`` of a positive clean logit difference, on the ``fraction`` the
    sentence prints (`_percent_text`; ``-effect >= 0.05 * clean`` rounds otherwise, and
    "5.0 %" read as met beside a motif absent for its size), or the accuracy down by
    ``min_accuracy_drop`` or more. Amendment 1 (docs/study.md): "5 % of the clean logit
    difference" is undefined for a model that does not prefer the answer (clean <= 0):
    only the accuracy criterion can hold there."""
    by_accuracy = bool(accuracy_effect <= -criteria.min_accuracy_drop)
    by_size = clean > 0 and bool(fraction >= criteria.min_effect_fraction)
    return by_accuracy, bool(by_size or by_accuracy)


def _d3_present(row: Any, top_harm: float, criteria: Criteria) -> bool:
    """D3 of ``row`` (``mass``, ``effect``, ``ci_low``, ``ci_high`` of prev_completed):
    mass at least ``d3_min_mass``, and an interval containing 0 or ``|effect|`` below
    ``d3_max_effect_fraction`` times ``top_harm`` (`_d3_below`, exactly)."""
    no_effect = bool(row.ci_low <= 0 <= row.ci_high) or _d3_below(row.effect, top_harm, criteria)
    return bool(row.mass >= criteria.d3_min_mass) and no_effect


def _d3_below(effect: float, top_harm: float, criteria: Criteria) -> bool:
    """D3's size test: ``|effect|`` below ``d3_max_effect_fraction`` times ``top_harm``,
    compared exactly as D2's (`_as_written`): in floats, ``0.1 * 0.7`` rounds to
    0.06999999999999999, and an effect of that size, below 0.07 exactly, was decided not
    below (the stored ``effect_limit`` column stays that float product)."""
    limit = _as_written(criteria.d3_max_effect_fraction) * _exactly(top_harm)
    return bool(abs(_exactly(effect)) < limit)


def _exactly(number: Any) -> Any:
    """A float (or a printed `Decimal`) as the exact number it is (a `Fraction`; an
    infinity, which no table the verdicts read holds, stays the float it is, compared
    exactly as it is)."""
    value = float(number)
    if not math.isfinite(value):
        return value
    return Fraction(number) if isinstance(number, Decimal) else Fraction(value)


def _as_written(threshold: float) -> Any:
    """A criterion's ratio or threshold as written (its ``repr``'s digits, exactly: 0.1 is
    1/10, not the float nearest it): the one reading of a threshold, by D2's and D3's exact
    comparisons, by `printed_deciding`'s reader (beside a printed number) and by
    `claim_text` (whether a threshold's short text writes it). An infinite threshold (no
    `Criteria`'s, but `printed_beside`'s) stays the float it is, as `_exactly` keeps an
    infinite value (``Fraction("inf")`` raised)."""
    value = float(threshold)
    return Fraction(repr(value)) if math.isfinite(value) else value


def _d2_mass(embedding: float, current: float, criteria: Criteria = PREREGISTERED) -> bool:
    """D2's mass test: the embedding's MLP-router mass below ``d2_mass_ratio`` (0.5) times
    current's, compared exactly, the ratio as written (as a reader reads the sentence's
    printed numbers, `printed_deciding`): in floats, ``0.123 * current`` rounded, and an
    embedding mass below it exactly was decided absent, its sentence reading as met."""
    return bool(_exactly(embedding) < _as_written(criteria.d2_mass_ratio) * _exactly(current))


def _d2_effect(embedding: float, current: float, criteria: Criteria = PREREGISTERED) -> bool:
    """D2's size test on the two effects: the embedding's harm at least ``d2_effect_ratio``
    (2) times current's (current's counted as >= 0), compared exactly as `_d2_mass`; its
    interval is tested apart."""
    ratio = _as_written(criteria.d2_effect_ratio)
    return bool(-_exactly(embedding) >= ratio * max(-_exactly(current), Fraction(0)))


def same_top_family(top_mass: str, top_effect: str) -> bool:
    """Whether one family is on top of both the mass and the effect ranking of a D1 row
    (``top_mass`` / ``top_effect`` name every family tied for the top, joined by ``|``;
    `motif_report`'s ``top_effect`` is the top of the harm ranking)."""
    return bool(set(top_mass.split("|")) & set(top_effect.split("|")))


def motif_report(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    criteria: Criteria = PREREGISTERED,
    by: Union[str, Sequence[str], None] = None,
) -> pd.DataFrame:
    """Every pre-registered claim, per model seed (and per any other grouping column).

    Args:
        mass_summary: `summarize_mass` by ``(router, family)`` over every layer, or the
            study's summary by ``(router, band, family)`` (its ``band == "all"`` rows are
            used). Every family needs a row at both sublayer router types; a summary
            without band ``"all"`` rows or with a row missing is refused. D1 and D3 rank
            the families its ``family_read`` says a router type reads (a summary without
            the column: every family, if each has mass or an ablation that masked a
            router for it; else refused). Its ``layers`` must be those of the effects'
            group ``all`` (`require_same_layers`; a summary without the column, e.g. the
            stored ``mass_summary.csv`` files, only beside the study's sweep of groups).
        effects: `ablation_effects` with the groups ``early``, ``middle``, ``late`` (the
            default depth bands) and ``all``, and the metrics ``logit_diff`` and
            ``accuracy`` (criterion 2's 2 points; a table without it is refused), one clean
            logit difference per model. With ``by`` columns, every model of
            ``mass_summary`` must be in ``effects`` and no row may lack its label.
        criteria: the thresholds (default: the pre-registered ones).
        by: columns that identify one model, present in both tables (one name is that
            column; default: those of ``condition`` and ``seed`` that exist).

    Returns:
        One row per model and claim (`CLAIMS`): ``claim``, ``kind`` (motif /
        dissociation), ``present`` and the numbers it was decided from (effects with
        intervals, the clean logit difference, masses, the top-mass / top-effect
        families, ...), plus the ``by`` columns. A D1 / D3 row's ``top_effect`` is the
        family with the largest harm (``-effect``), as pre-registered; it is not
        `dissociation_report`'s ``top_abs_effect`` (largest ``|effect|``). The table's
        ``attrs["criteria"]`` is ``criteria`` (`motif_verdicts` writes its sentences by it).
    """
    by = _by_columns(by)
    if by is None:
        by = [
            c for c in ("condition", "seed") if c in effects.columns and c in mass_summary.columns
        ]
    if not by:
        return _decided_by(pd.DataFrame(_one_seed(mass_summary, effects, criteria)), criteria)
    for name, table in (("effects", effects), ("mass_summary", mass_summary)):
        _require_labels(table, by, name)
    # seeds 0 and '0' (a table read back from a CSV): "the effects table lacks seed 0"
    require_same_kind((("mass_summary", mass_summary), ("effects", effects)), by)
    measured = set(effects[by].itertuples(index=False, name=None))
    unmeasured = [
        dict(zip(by, key, strict=True))
        for key in dict.fromkeys(mass_summary[by].itertuples(index=False, name=None))
        if key not in measured
    ]
    if unmeasured:  # its claims would silently drop out of "k of n seeds"
        raise ValueError(
            f"mass_summary has models that the effects table lacks: {unmeasured[:3]}; pass "
            "the ablation_effects of every model summarised (or leave the model out of both)"
        )
    rows = []
    for key, part in effects.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        selector = np.ones(len(mass_summary), dtype=bool)
        for column, value in zip(by, key, strict=True):
            selector &= (mass_summary[column] == value).to_numpy()
        mass = mass_summary[selector]
        if mass.empty:
            raise ValueError(f"mass_summary has no rows for {dict(zip(by, key, strict=True))}")
        for row in _one_seed(mass, part, criteria):
            rows.append({**dict(zip(by, key, strict=True)), **row})
    return _decided_by(pd.DataFrame(rows), criteria)


def _decided_by(report: pd.DataFrame, criteria: Criteria) -> pd.DataFrame:
    """``report`` recording the criteria its verdicts were decided by (``attrs``), which
    `motif_verdicts` reads its sentences by."""
    report.attrs["criteria"] = criteria
    return report


def _by_columns(by: Any) -> Optional[list[str]]:
    """``by`` as a list of column names: one name is that column (``by="seed"`` was read
    letter by letter, "lacks the column 's'"), as `summarize_mass` reads it; ``None``
    stays ``None`` (the default columns); a value that is no list is refused by name."""
    if by is None:
        return None
    return [by] if isinstance(by, str) else as_items("by", by)


def _require_labels(table: pd.DataFrame, columns: list[str], what: str) -> None:
    """Refuse a table without a ``condition`` / ``seed`` column, or with a missing (NaN)
    label in one or labels that mix text and numbers (`require_keys`): pandas' ``groupby``
    drops NaN rows, so that model would silently leave the count of seeds, and takes ``0``
    and ``'0'`` for two models (one seed counted twice, one condition split in two)."""
    for column in columns:
        if column not in table.columns:
            raise ValueError(f"{what} lacks the column {column!r} that identifies a model")
    require_keys(table, columns, what)


def verdict_word(k: int, n: int) -> str:
    """``replicated`` (k = n >= 2), ``majority`` (n/2 < k < n), ``minority`` (0 < k <=
    n/2) or ``absent`` (k = 0): the pre-registered summary of "present in k of n seeds";
    ``single seed`` (k = n = 1; amendment 3 of ``docs/study.md``: one seed replicates
    nothing). ``k`` and ``n`` are integers (`require_integer`: ``k=2.5`` was "majority",
    ``k=True`` "minority")."""
    k, n = require_integer("k", k, 0), require_integer("n", n, 1)
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == n == 1:
        return "single seed"
    if k == n:
        return "replicated"
    if k == 0:
        return "absent"
    return "majority" if k > n / 2 else "minority"


def motif_verdicts(
    report: pd.DataFrame,
    by: Union[str, Sequence[str], None] = None,
    criteria: Optional[Criteria] = None,
) -> pd.DataFrame:
    """Claims across seeds: one row per claim (and per ``by`` group, default
    ``condition`` when present) with ``k`` (seeds where present), ``n``, ``verdict``
    (`verdict_word`) and ``sentence`` (generated from the numbers, each printed with the
    digits that put it on its side of the threshold that decided it, and naming that
    threshold).

    ``criteria``: the `Criteria` the report was decided by; default the one `motif_report`
    recorded in ``report.attrs["criteria"]``, else (a table read from a file, or joined from
    reports of different criteria) `PREREGISTERED`. Another one than the recorded one is
    refused, and so is a report whose stored decisions (criterion 2's ``large``, D2, D3)
    those criteria contradict: its sentences would print numbers on the wrong side of the
    thresholds they name."""
    require_columns(report, ("claim", "present"), "report", "motif_report(...)")
    by = _by_columns(by)
    if by is None:
        by = [c for c in ("condition",) if c in report.columns]
    # a missing decision (NaN) summed as absent: "present in 2 of 3 seeds" of 3 of 3
    require_decisions(report, "present", [*by, "claim", "seed"], "the report")
    criteria = _report_criteria(report, criteria)
    _require_labels(report, [*by, *(["seed"] if "seed" in report.columns else [])], "the report")
    rows = []
    groups = report.groupby(by, sort=False) if by else [((), report)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        seeds = list(dict.fromkeys(part.seed)) if "seed" in part.columns else None
        for claim in CLAIMS:
            rows_claim = part[part.claim == claim]
            if rows_claim.empty:
                continue
            if seeds is None and len(rows_claim) > 1:
                raise ValueError(
                    f"the report has {len(rows_claim)} rows for {claim} and no 'seed' column "
                    "to tell them apart; pass motif_report of tables with a 'seed' column"
                )
            # n counts seeds: a seed twice, or a seed without this claim, would miscount it
            if seeds is not None and sorted(rows_claim.seed.tolist()) != sorted(seeds):
                repeated = sorted(set(rows_claim.seed[rows_claim.seed.duplicated()].tolist()))
                lacking = [s for s in seeds if s not in set(rows_claim.seed)]
                problems = [f"seed(s) {repeated} have several"] if repeated else []
                problems += [f"seed(s) {lacking} have none"] if lacking else []
                raise ValueError(
                    f"{dict(zip(by, key, strict=True)) or 'the report'}: claim {claim} needs one "
                    f"row per seed, but {' and '.join(problems)}; pass "
                    "motif_report's table of each model once, unfiltered"
                )
            # counted as booleans (each True or False, `require_decisions`): an object
            # column's NumPy booleans summed as "or" (np.True_ + np.True_ is np.True_)
            k, n = int(rows_claim.present.to_numpy(dtype=bool).sum()), len(rows_claim)
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "claim": claim,
                    "k": k,
                    "n": n,
                    "verdict": verdict_word(k, n),
                    "sentence": _sentence(claim, part, k, n, criteria),
                }
            )
    return pd.DataFrame(rows)


def _report_criteria(report: pd.DataFrame, criteria: Optional[Criteria]) -> Criteria:
    """The criteria ``report``'s verdicts were decided by (see `motif_verdicts`); refuses
    ``criteria`` other than the recorded ones and a report its decisions contradict."""
    recorded = report.attrs.get("criteria")
    if criteria is not None and recorded is not None and criteria != recorded:
        raise ValueError(
            f"the report was decided by {recorded}, not the criteria={criteria} given: its "
            "sentences would print the numbers beside thresholds that did not decide them; "
            "pass motif_report's criteria (or none)"
        )
    chosen = criteria if criteria is not None else recorded
    chosen = PREREGISTERED if chosen is None else chosen
    if not isinstance(chosen, Criteria):
        raise TypeError(f"criteria must be a Criteria, got {type(chosen).__name__}")
    for _, row in report.iterrows():
        if _contradicts(row, chosen):
            seed = f" seed {row.seed}" if "seed" in report.columns else ""
            raise ValueError(
                f"the report's {row.claim} row{seed} was not decided by {chosen} (its stored "
                "decision differs from theirs); pass motif_verdicts(report, criteria=...) the "
                "criteria given to motif_report"
            )
    return chosen


def _contradicts(row: pd.Series, criteria: Criteria) -> bool:
    """Whether ``row``'s stored decision differs from the one ``criteria`` give its numbers
    (the tests of `_one_seed` that the row's columns allow redoing; a row of a report
    stored before a column existed is not checked by it)."""
    claim = row.claim
    if claim in MOTIFS and claim != "M2" and not pd.isna(row.get("large_by_accuracy", np.nan)):
        by_accuracy, large = _criterion_2(
            row.effect_fraction, row.accuracy_effect, row.clean, criteria
        )
        return bool(row.large_by_accuracy) != by_accuracy or bool(row.large) != large
    if claim == "D2":
        sizes = _d2_mass(row.mass_embedding, row.mass_current, criteria) and _d2_effect(
            row.effect_embedding, row.effect_current, criteria
        )
        high = row.get("ci_high_embedding", np.nan)
        if pd.isna(high):  # stored before the column: a present D2 needs the sizes met
            return bool(row.present) and not sizes
        return (sizes and bool(high < 0)) != bool(row.present)
    if claim.startswith("D3"):
        limit = row.get("effect_limit", np.nan)
        if pd.isna(limit):
            return False
        return _d3_present(row, row.top_harm, criteria) != bool(row.present) or bool(
            limit != criteria.d3_max_effect_fraction * row.top_harm
        )
    return False


def _fmt_effect(row: pd.Series) -> str:
    """``effect [ci_low, ci_high]`` with 2 decimals, each bound with as many more as put it
    on its side of 0 (the criteria test "ci_high < 0" and "contains 0": "[-0.03, -0.00]"
    read as containing 0 for an interval that excludes it)."""
    low, high = (printed_beside(bound, 0.0, 2, "+f") for bound in (row.ci_low, row.ci_high))
    return f"{printed_readable(row.effect, 2, '+f')} [{low}, {high}]"


def _digits_apart(value: float, other: float) -> str:
    """``value`` with 2 significant digits, or as many as it takes to print it apart from
    ``other`` (0.00252 next to 0.00217: "0.0025" and "0.0022")."""
    for digits in range(2, 17):
        if f"{value:.{digits}g}" != f"{other:.{digits}g}":
            return f"{value:.{digits}g}"
    return repr(value)


def printed_deciding(values, digits: int, decide, spec: str = "f") -> list[str]:
    """``values`` formatted with ``digits`` decimals (``spec``: a format type, ``"f"`` or
    ``"e"``, with any flag before it, ``"+f"``), or with as many more as it takes for
    ``decide`` of the printed numbers to equal ``decide`` of the values: a sentence's
    numbers then show the comparison that decided its verdict, read as a reader reads
    them: each printed number exactly, a criterion's ratio or threshold by its written
    digits (`_as_written`). As many: one more than the first decimal where a number and its
    threshold differ, at most 16; past that (a tie in floats, or a value 1e-20 beside 0),
    ``repr``'s shortest digits, or else each value's exact decimal expansion. The texts
    were checked as floats parsed back, which at a tie let ``repr`` through where exact
    reading decides the other way (-1/6 beside -1/3: "-0.16666666666666666" is below half
    of "-0.3333333333333333", though the floats tie). A NaN is refused: it is on no side
    of a threshold (it was printed ``nan`` after 16 tries). With ``"f"``, a number of
    `SCIENTIFIC_FROM` (1e16) or more in magnitude is printed in scientific notation
    (``"e"``, the same decimals: 1e20 beside 0 with ``"+f"`` and 2 decimals is
    ``"+1.00e+20"``, not every integer digit), its exact expansion without trailing
    zeros."""
    if np.isnan(np.asarray(values, dtype=float)).any():
        raise ValueError(
            f"cannot print {list(values)} for a threshold test: NaN is on no side of a "
            "threshold (a table the verdicts were decided from holds no NaN)"
        )
    flag, kind = spec[:-1], spec[-1]
    kinds = [_readable_kind(value, kind) for value in values]
    want = decide(*values)
    with localcontext() as context:
        context.prec = 2000  # exact for any float's digits
        candidates = [
            [printed_readable(value, places, spec) for value in values]
            for places in range(digits, 17)
        ]
        candidates.append([repr(float(value)) for value in values])
        candidates.append(
            [format(_exact(value, k), f"{flag}{k}") for value, k in zip(values, kinds, strict=True)]
        )
        for texts in candidates:  # read as a reader reads them: exact decimals
            if decide(*(Decimal(text) for text in texts)) == want:
                return texts
    return candidates[-1]


# from this magnitude on, a number `printed_deciding` would print with "f" is printed with
# "e": a float of 1e16 or more is an integer of 17 to 309 digits, every one of them printed
SCIENTIFIC_FROM = 1e16


def printed_readable(value: float, digits: int, spec: str = "f") -> str:
    """``value`` with ``digits`` decimals (``spec`` as in `printed_deciding`: ``"f"``,
    ``"+f"``, ``"e"``), in scientific notation from `SCIENTIFIC_FROM` with ``"f"``: a number
    of a sentence beside no threshold (an effect, a harm), printed by the rule of those
    beside one, without every integer digit of a huge value (``-3e19`` with ``"+f"`` and 2
    decimals: ``"-3.00e+19"``, not ``"-30000000000000000000.00"``)."""
    flag, kind = spec[:-1], spec[-1]
    return format(value, f"{flag}.{digits}{_readable_kind(value, kind)}")


def _readable_kind(value: float, kind: str) -> str:
    """``"e"`` for a finite ``value`` of `SCIENTIFIC_FROM` or more in magnitude asked for
    with ``"f"``, else ``kind``."""
    huge = kind == "f" and math.isfinite(value) and abs(value) >= SCIENTIFIC_FROM
    return "e" if huge else kind


def _exact(value: float, kind: str) -> Decimal:
    """``value``'s exact decimal expansion; for ``"e"`` without trailing zeros (1e20's is
    "1e+20", not "1.00000000000000000000e+20"). Call it with a context precision that
    holds every digit of a float."""
    exact = Decimal(float(value))
    return exact.normalize() if kind == "e" and exact.is_finite() else exact


def _percent_text(fraction: float, threshold: float, spec: str = "f") -> str:
    """``fraction`` in percent, with one decimal or as many more as put it on its side of
    ``threshold`` (a fraction too: criterion 2's ``min_effect_fraction`` for harm / clean,
    ``-min_accuracy_drop`` for an accuracy effect): `printed_beside` the fraction itself,
    its decimal point then moved two places (exact). ``100 * fraction`` rounds again: a
    fraction a float below 0.05 became 5.0, printed "5.0 %" beside a miss. A percent of
    `SCIENTIFIC_FROM` or more (a harm of 1e14 tiny clean differences) is printed in
    scientific notation without trailing zeros ("1e+16", not 17 digits)."""
    text = printed_beside(fraction, threshold, 3, spec)
    percent = Decimal(text).scaleb(2)
    kind = _readable_kind(float(percent), "f")
    with localcontext() as context:
        context.prec = 2000  # exact for any float's digits
        return format(percent.normalize() if kind == "e" else percent, spec[:-1] + kind)


def printed_beside(value: float, threshold: float, digits: int, spec: str = "f") -> str:
    """``value`` as `printed_deciding` prints it beside ``threshold``: on the same side of
    it (below, equal, above) as the value is. An effect of 4.9996 % of the clean
    difference printed "5.0 %" beside criterion 2's 5 %, which it fails. A NumPy
    ``threshold`` is read as the float it holds (a float32 one compared in float32, where
    0.49999999999999994 equals 0.5). A NaN ``threshold`` is refused (``ValueError``: no
    number is on a side of it), as `printed_deciding` refuses a NaN value."""
    threshold = float(threshold)
    if math.isnan(threshold):  # it reached a Decimal comparison: decimal.InvalidOperation
        raise ValueError(
            f"cannot print {value!r} beside the threshold nan: no number is on a side of NaN "
            "(pass the finite threshold the value is tested against)"
        )

    def side(v) -> int:
        # a printed number (a Decimal) is read beside the threshold as written
        written = _as_written(threshold) if isinstance(v, Decimal) else threshold
        return int(v > written) - int(v < written)

    return printed_deciding([value], digits, side, spec)[0]


def claim_text(claim: str, criteria: Criteria = PREREGISTERED) -> str:
    """What a claim id (`CLAIMS`) says, e.g. ``"M1"`` -> ``"embedding through early MLP
    routers"``; D2 and D3 name ``criteria``'s thresholds (the pre-registered ``"< 0.5x
    current's mass"``, ``">= 0.10 mass"``), each written as it reads exactly. Another id
    is refused by name (`require_choice`; it was a bare ``KeyError: 'D9'``)."""
    claim = require_choice("claim", claim, CLAIMS)
    if claim in MOTIFS:
        return MOTIFS[claim][3]
    c = criteria
    return DISSOCIATIONS[claim].format(
        d2_mass_ratio=_threshold_text(c.d2_mass_ratio, 0),
        d2_effect_ratio=_threshold_text(c.d2_effect_ratio, 0),
        d3_min_mass=_threshold_text(c.d3_min_mass, 2),
        d3_max_effect_fraction=_threshold_text(c.d3_max_effect_fraction, 2),
    )


def _threshold_text(threshold: float, digits: int) -> str:
    """A criterion's ``threshold`` with ``digits`` decimals if they write it (as
    `_as_written` reads it: its ``repr``), else its ``repr`` (0.125 with 2: "0.125", not
    "0.12")."""
    text = f"{threshold:.{digits}f}"
    return text if Fraction(text) == _as_written(threshold) else repr(float(threshold))


def _sentence(
    claim: str, report: pd.DataFrame, k: int, n: int, criteria: Criteria = PREREGISTERED
) -> str:
    """ "M1 (...): present in k of n seeds (verdict). seed 0: ...; seed 1: ...": the verdict
    and, per seed, the numbers it was decided from."""
    rows = report[report.claim == claim]
    # without a seed column there is one model (`motif_verdicts` refuses several rows):
    # "the model", not a seed number it was never given ("seed 0" for a seed-2 model)
    seeds = rows.seed.tolist() if "seed" in rows.columns else [None] * len(rows)
    what = claim_text(claim, criteria)
    head = (
        f"{claim} ({what}): present in {k} of {n} seed{'s' if n != 1 else ''} "
        f"({verdict_word(k, n)})"
    )
    details = []
    for seed, (_, row) in zip(seeds, rows.iterrows(), strict=True):
        which = "the model" if seed is None else f"seed {seed}"
        if claim == "M2":
            parts = []
            for part in ("M2-attn", "M2-mlp"):
                match = report[
                    (report.claim == part)
                    & ((report.seed == seed) if "seed" in report.columns else True)
                ]
                parts.append(f"{part} {'yes' if bool(match.present.iloc[0]) else 'no'}")
            details.append(f"{which}: {', '.join(parts)}")
        elif claim in MOTIFS:
            # the clean difference decides criterion 2's clause (clean > 0): beside 0
            clean = printed_beside(row.clean, 0.0, 2)
            share = (
                f"{_percent_text(row.effect_fraction, criteria.min_effect_fraction)} % of "
                f"the clean {clean}"
                if row.clean > 0
                else f"clean logit difference {clean} (the answer is not preferred)"
            )
            # criterion 2 met by accuracy; missing (NaN) in rows of a report stored before
            # the column existed, concatenated with newer ones: bool(NaN) would be True
            by_accuracy = row.get("large_by_accuracy", False)
            if not pd.isna(by_accuracy) and bool(by_accuracy):
                points = _percent_text(row.accuracy_effect, -criteria.min_accuracy_drop, "+f")
                share += f", accuracy {points} points"
            bands = str(row.largest_band).split("|")
            where = (
                f"band {bands[0]}"
                if len(bands) == 1
                else f"bands {', '.join(bands[:-1])} and {bands[-1]} (tied)"
            )
            details.append(
                f"{which}: effect {_fmt_effect(row)} logits = {share}, most harmful {where}"
            )
        elif claim.startswith("D1"):
            if same_top_family(row.top_mass, row.top_effect):
                note = " (the same family)"
            else:
                note = "" if row.separated else " (their effect intervals overlap)"
            details.append(f"{which}: top mass {row.top_mass}, top effect {row.top_effect}{note}")
        elif claim == "D2":
            # each test's numbers with the digits that decide it (an embedding effect of
            # -0.003 against a current one of -0.004 both read "-0.00", which meets 2x)
            masses = printed_deciding(
                [row.mass_embedding, row.mass_current], 3, partial(_d2_mass, criteria=criteria)
            )
            effects = printed_deciding(
                [row.effect_embedding, row.effect_current],
                2,
                partial(_d2_effect, criteria=criteria),
                "+f",
            )
            detail = (
                f"{which}: mass {masses[0]} vs {masses[1]}, effect {effects[0]} vs {effects[1]}"
            )
            # the embedding interval, where it alone decided: the masses and effects
            # printed above would read as met
            others_met = _d2_mass(row.mass_embedding, row.mass_current, criteria) and _d2_effect(
                row.effect_embedding, row.effect_current, criteria
            )
            if not row.present and others_met and row.ci_high_embedding >= 0:
                detail += (
                    ", but embedding's effect interval does not exclude 0 (ci_high "
                    f"{printed_beside(row.ci_high_embedding, 0.0, 2, '+f')})"
                )
            details.append(detail)
        else:
            mass = printed_beside(row.mass, criteria.d3_min_mass, 3)
            detail = (
                f"{which}: mass {mass}, effect {_fmt_effect(row)} (top "
                f"family {row.top_effect}, harm {printed_readable(row.top_harm, 2)})"
            )
            # where the interval excludes 0, the size test decides: its two numbers, with
            # the digits that show the comparison (2 decimals printed -0.00 against "0.10x
            # harm 0.02" both for a seed that passed and one that failed it); missing (NaN)
            # in rows of a report stored before the column existed
            limit = row.get("effect_limit", np.nan)
            if not (row.ci_low <= 0 <= row.ci_high or pd.isna(limit)):
                size = abs(row.effect)
                fraction = _threshold_text(criteria.d3_max_effect_fraction, 2)
                what = f" = {fraction}x the top harm" if row.top_harm else ""
                below = _d3_below(row.effect, row.top_harm, criteria)
                texts = (
                    (_digits_apart(size, limit), _digits_apart(limit, size))
                    if (size < limit) == below  # the stored float limit reads as decided
                    else _d3_exact_texts(size, row.top_harm, criteria)
                )
                detail += f", |effect| {texts[0]} {'<' if below else '>='} {texts[1]}{what}"
            details.append(detail)
    return head + ". " + "; ".join(details) + "."


def _d3_exact_texts(size: float, top_harm: float, criteria: Criteria) -> tuple[str, str]:
    """``size`` and D3's exact limit (``d3_max_effect_fraction`` as written times
    ``top_harm``, `_d3_below`) with as many significant digits as put them on the sides
    `_d3_below` decided: for a near-tie, where the stored float limit reads the other way
    (``0.1 * 0.7`` is the float 0.06999999999999999, equal to an effect below 0.07)."""
    below = _d3_below(size, top_harm, criteria)
    limit = _as_written(criteria.d3_max_effect_fraction) * _exactly(top_harm)
    with localcontext() as context:
        context.prec = 2000  # exact: each is a finite decimal (a float times a decimal)
        exact = (Decimal(size), Decimal(limit.numerator) / Decimal(limit.denominator))
        for digits in range(2, 2000):
            context.prec = digits
            rounded = tuple(+value for value in exact)  # rounding is monotone
            if (rounded[0] < rounded[1]) == below:
                return format(rounded[0], "f"), format(rounded[1], "f")
    return format(exact[0], "f"), format(exact[1], "f")


def verdict_changes(
    first: pd.DataFrame, second: pd.DataFrame, by: Union[str, Sequence[str], None] = None
) -> pd.DataFrame:
    """Per-seed claims whose ``present`` differs between two `motif_report` tables of the
    same models (e.g. two disjoint sets of held-out prompts): the robustness check.

    ``by``: the columns that identify one model, in both tables (as `motif_report`'s
    ``by``, e.g. ``["model", "seed"]``; one name is that column); default those of
    ``condition`` and ``seed`` that both tables have.

    Raises:
        ValueError: a ``by`` column a table lacks; a ``(*by, claim)`` row twice in either
            table (a report concatenated twice: its repeated rows paired with one row of
            the other, so that equal row counts hid a model of the other table that was
            never compared; or models told apart by a column not in ``by``), a NaN label
            or labels mixing text and numbers (`require_keys`), or tables that do not cover
            the same models and claims.
    """
    by = _by_columns(by)
    if by is None:
        by = [c for c in ("condition", "seed") if c in first.columns and c in second.columns]
    keys = list(dict.fromkeys([*by, "claim"]))
    for name, table in (("first", first), ("second", second)):
        require_columns(table, ("claim", "present"), f"the {name} report", "motif_report(...)")
        _require_labels(table, list(by), f"the {name} report")  # by's columns, labelled
        require_keys(table, ["claim"], f"the {name} report")
        # a NaN decision differs from every other (NaN != NaN): a change "found"
        require_decisions(table, "present", keys, f"the {name} report")
        require_one_row(
            table,
            keys,
            f"the {name} report",
            "pass motif_report's table of each model once; for models told apart by another "
            f"column (motif_report's by), name it in by (e.g. by={[*by, 'model']})",
        )
    # seeds 0 and '0' (a report read back from a CSV): pandas' own merge error
    require_same_kind((("the first report", first), ("the second report", second)), keys)
    merged = first[keys + ["present"]].merge(
        second[keys + ["present"]], on=keys, suffixes=("_first", "_second")
    )
    if len(merged) != len(first) or len(merged) != len(second):
        raise ValueError("the two reports do not cover the same models and claims")
    return merged[merged.present_first != merged.present_second].reset_index(drop=True)
