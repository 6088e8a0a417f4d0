"""The study's figures, built from its tables: one per paper claim and task, every seed and
condition of the task side by side (the wrapped vanilla baseline beside the AttnRes
conditions), plus the routing mass of each condition."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from hooked_attnres import plotting
from hooked_attnres.analysis.motifs import MOTIFS, printed_beside
from hooked_attnres.study.conditions import get_condition
from hooked_attnres.study.report import require_study_result

if TYPE_CHECKING:
    from hooked_attnres.study.run import StudyResult


# effects are shown in percent of the clean logit difference only if every model of a task
# has at least this clean difference (in logits); otherwise in logits
MIN_CLEAN_FOR_PERCENT = 1.0


def conditions_by_task(result: StudyResult) -> dict[str, list[str]]:
    """The studied conditions grouped by task, AttnRes conditions first, the vanilla
    baseline last."""
    out: dict[str, list[str]] = {}
    for condition in dict.fromkeys(result.accuracy.condition):
        out.setdefault(get_condition(condition).task, []).append(condition)
    return {
        task: sorted(names, key=lambda n: get_condition(n).kind == "vanilla")
        for task, names in out.items()
    }


def study_figures(result: StudyResult) -> dict[str, go.Figure]:
    """``{name: figure}``: per task, one figure per motif (M1, M2, M3: the family's effect
    per depth band), one per router type for the dissociations (mass and effect of every
    family), and the routing-mass heatmap of each condition's first seed."""
    require_study_result(result, "study_figures")
    figures: dict[str, go.Figure] = {}
    for task, conditions in conditions_by_task(result).items():
        effects = result.effects[result.effects.condition.isin(conditions)]
        mass_summary = result.mass_summary[result.mass_summary.condition.isin(conditions)]
        # percent of the clean logit difference only where every model of the task clearly
        # prefers the answer: a model at chance has a clean difference near 0 (0.004 in the
        # grid), and percent of it would magnify noise a hundredfold and flatten the shared
        # axis for every other model
        clean = effects[effects.metric == "logit_diff"].groupby(["condition", "seed"]).clean.first()
        unclear = clean[clean < MIN_CLEAN_FOR_PERCENT]
        relative = unclear.empty
        unit = (
            ""
            if relative
            else f" (in logits: {unclear.index[0][0]} seed {unclear.index[0][1]} has a clean "
            # on its side of the 1-logit rule: 0.9969 printed "1.00" as the reason for logits
            f"logit difference of {printed_beside(unclear.iloc[0], MIN_CLEAN_FOR_PERCENT, 2)})"
        )
        for claim in ("M1", "M2", "M3"):
            family, routers, band, what = MOTIFS[claim]
            figures[f"{task}_{claim}"] = plotting.effects_by_seed(
                effects,
                family,
                routers,
                columns=conditions,
                relative=relative,
                title=f"{claim} ({what}), task {task}: effect of masking {family} per band{unit}",
            )
        for router in ("attn_res", "mlp_res"):
            figures[f"{task}_mass_effect_{router}"] = plotting.mass_effect_by_seed(
                mass_summary,
                effects,
                router,
                columns=conditions,
                relative=relative,
                title=(
                    f"D1-D3, task {task}, {plotting.ROUTER_TITLES[router]}: routing mass "
                    f"and ablation effect (all layers) of every family{unit}"
                ),
            )
        for condition in conditions:
            mass = result.mass[result.mass.condition == condition]
            seed = int(mass.seed.min())
            figures[f"routing_{condition}"] = plotting.routing_heatmap(
                mass[mass.seed == seed],
                title=f"Routing mass at the answer position: {condition}, seed {seed}",
            )
    return figures
