"""Mass versus causal effect: does the family with the most routing weight matter most?

The seed paper's finding is that the two dissociate. `dissociation_report` checks it per
router type from a mass summary (`summarize_mass` by router and family) and an effect
table (`ablation_effects` with ``groups="all"``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hooked_attnres._validation import first_non_finite, require_finite_number, require_one_row
from hooked_attnres.analysis.effects import require_measured
from hooked_attnres.analysis.mass import (
    require_family_read_column,
    require_family_rows,
    require_read_agrees,
    require_same_layers,
    require_same_models,
    require_summary_and_effects,
)
from hooked_attnres.model.depth import FAMILIES


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either is constant."""
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def dissociation_report(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    appreciable_mass: float = 0.05,
    group: str = "all",
) -> pd.DataFrame:
    """One row per router type comparing routing mass with ablation effect.

    Args:
        mass_summary: `summarize_mass(mass, by=("router", "family"))` of a `routing_mass`
            table (with its ``family_read`` column: which families each router type reads).
        effects: `ablation_effects(..., groups="all")` (or any table with a ``group``
            column; ``group`` selects the rows to use).
        metric: the effect metric to rank by.
        appreciable_mass: the mass from which on a family "carries appreciable mass" (a
            finite number).

    Returns:
        One row per router type of the effects (of ``metric`` and ``group``; the mass of
        other router types, e.g. the final router's beside group ``"all"``, which never
        masks it, is not compared). Columns: ``router``; ``mass_ranking`` /
        ``abs_effect_ranking`` (families, largest first, ties in name order; the effect
        ranked by ``|effect|``); ``spearman`` (rank correlation of mass and ``|effect|``
        over the families present: those some router of the type reads,
        ``family_read``, whatever their mass); ``top_mass``, ``top_abs_effect`` (every
        family tied for the top, joined by ``|``; the top of the ``|effect|`` ranking,
        which may be a family whose ablation helps: the pre-registered D1 of
        `motif_report` ranks by harm instead, its ``top_effect``),
        ``top_mass_is_top_abs_effect`` (one family is on top of both); ``shares`` (for
        every family, its mass and its share of the total ``|effect|``, NaN when every
        effect is 0: there is no total to share;
        ``spearman`` is NaN too, as for any constant ranking);
        ``appreciable_mass_no_effect`` (families with mass >= ``appreciable_mass`` whose
        effect interval contains 0).

    Raises:
        ValueError: an ``appreciable_mass`` that is no finite number, several rows per
            router and family, effects of a router type the mass summary lacks (its row
            was left out without a word until audit 196), a missing family row (in either
            table, at a router type of the effects), a mass summary without a True /
            False ``family_read`` column, effects that masked routers for a family
            ``family_read`` says no router reads (tables of different models), a summary
            of other layers than the effects of ``group`` masked (its ``layers``,
            `require_same_layers`: e.g. the every-layer summary with ``group="early"``),
            tables of other models (`require_same_models`: a ``condition`` / ``seed`` /
            ``model`` label one table lacks), or a NaN / infinite mass, effect or
            interval bound (e.g. the NaN intervals of one prompt).
    """
    require_summary_and_effects(mass_summary, effects)
    require_measured(effects, "dissociation_report")
    require_finite_number("appreciable_mass", appreciable_mass)
    chosen = effects[(effects.metric == metric) & (effects.group == group)]
    if chosen.empty:
        raise ValueError(
            f"no effects for metric={metric!r} and group={group!r}; run "
            "ablation_effects(..., groups='all') with that metric"
        )
    for table, what in ((mass_summary, "mass_summary"), (chosen, "effects")):
        require_one_row(
            table,
            ("router", "family"),
            what,
            "summarize mass by ('router', 'family') and pass the effects of one model / seed",
        )
    # paired by router and family: of one model (seed 0's mass beside seed 1's effects)
    require_same_models(
        (("mass_summary", mass_summary), ("effects", chosen)), "dissociation_report"
    )
    # the effects choose the router types (as in the mass-effect figures): one of theirs
    # without mass dropped out of the report without a word (audit 196); the mass of a
    # router type without effects is not compared (the final router's beside group "all")
    unpaired = sorted(set(chosen.router) - set(mass_summary.router), key=str)
    if unpaired:
        raise ValueError(
            f"dissociation_report: the effects hold the router type(s) {unpaired}, which "
            f"mass_summary lacks (it has {sorted(set(mass_summary.router), key=str)}): "
            "their report row would be left out; pass the mass summary of every router type "
            "of the effects (summarize_mass of routing_mass output has each), or select the "
            "effects to report: effects[effects.router.isin(mass_summary.router)]"
        )
    routers = sorted(set(chosen.router), key=str)
    # the summary's mass must be of the layers the group masked (paired by router only)
    require_same_layers(
        mass_summary[mass_summary.router.isin(routers)],
        effects[effects.metric == metric],
        group,
        "dissociation_report",
    )
    require_family_rows(mass_summary, routers, "mass_summary")
    # a family without an effect row would drop out of the rankings and the top families
    require_family_rows(
        chosen,
        routers,
        "effects",
        remedy="ablation_effects(..., groups='all') with every family (its default families)",
    )
    # which families a router type has: the one rule `family_read` (some router reads a
    # source of the family), not its mass (0 also for a family read with an underflowed
    # weight) nor the effects' masked routers (0 also where masking would leave nothing)
    require_family_read_column(
        mass_summary[mass_summary.router.isin(routers)], "dissociation_report"
    )
    rows = []
    for router in routers:
        mass = mass_summary[mass_summary.router == router].set_index("family")
        effect = chosen[chosen.router == router].set_index("family")
        require_read_agrees(mass.family_read, effect.get("n_masked_routers"), f"router {router!r}")
        present = [f for f in FAMILIES if mass.loc[f, "family_read"]]
        m = np.array([mass.loc[f, "mass"] for f in present], dtype=float)
        e = np.array([abs(effect.loc[f, "effect"]) for f in present], dtype=float)
        bounds = np.array(
            [[effect.loc[f, "ci_low"], effect.loc[f, "ci_high"]] for f in present], dtype=float
        )
        found = first_non_finite(np.column_stack((m, e, bounds)))
        if found is not None:
            family = present[found[0]]
            raise ValueError(
                f"router {router!r}, family {family!r}: a non-finite mass, effect or interval "
                f"bound (mass {mass.loc[family, 'mass']}, effect {effect.loc[family, 'effect']} "
                f"[{effect.loc[family, 'ci_low']}, {effect.loc[family, 'ci_high']}]); the "
                "rankings cannot be computed (NaN would sort to an arbitrary place): a "
                "bootstrap interval needs at least 2 prompts, and the metric must be finite"
            )
        mass_ranking = [f for _, f in sorted(zip(-m, present, strict=True))]
        abs_effect_ranking = [f for _, f in sorted(zip(-e, present, strict=True))]
        # every family tied for the top (as D1's amendment 4): the name order of the
        # rankings must not decide whether one family is on top of both
        mass_tops = [f for f, mi in zip(present, m, strict=True) if mi == m.max()]
        effect_tops = [f for f, ei in zip(present, e, strict=True) if ei == e.max()]
        null = [
            f
            for f in present
            if mass.loc[f, "mass"] >= appreciable_mass
            and effect.loc[f, "ci_low"] <= 0 <= effect.loc[f, "ci_high"]
        ]
        total_effect = e.sum() if e.sum() > 0 else float("nan")
        rows.append(
            {
                "router": router,
                "mass_ranking": mass_ranking,
                "abs_effect_ranking": abs_effect_ranking,
                "spearman": _spearman(m, e),
                "top_mass": "|".join(mass_tops),
                "top_abs_effect": "|".join(effect_tops),
                "top_mass_is_top_abs_effect": bool(set(mass_tops) & set(effect_tops)),
                "shares": {
                    f: {"mass": float(mi), "effect": float(ei / total_effect)}
                    for f, mi, ei in zip(present, m, e, strict=True)
                },
                "appreciable_mass_no_effect": null,
            }
        )
    return pd.DataFrame(rows)
