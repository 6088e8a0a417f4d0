"""The study's Markdown report, generated from its tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from hooked_attnres.model.depth import FAMILIES

if TYPE_CHECKING:
    from hooked_attnres.study.run import StudyResult


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def study_report(result: StudyResult) -> str:
    """A Markdown report: accuracy, mass and effects per router type, dissociation, schedule."""
    lines = [
        "# Routing mass versus causal effect",
        "",
        "Mask-and-renormalise ablation of each source family per router type; effects are "
        "mean changes of the answer-minus-contrast logit difference over held-out probe "
        "prompts, with 95 % bootstrap intervals over prompts.",
        "",
        "## Accuracy",
        "",
        "| condition | seed | accuracy | logit diff | prompts |",
        "|---|---|---|---|---|",
    ]
    for row in result.accuracy.itertuples():
        lines.append(
            f"| {row.condition} | {row.seed} | {_fmt(row.accuracy)} | {_fmt(row.logit_diff, 2)} "
            f"| {row.n_prompts} |"
        )
    effects = result.effects[result.effects.metric == "logit_diff"]
    for (condition, seed), diss in result.dissociation.groupby(["condition", "seed"], sort=False):
        lines += [
            "",
            f"## {condition}, seed {seed}",
            "",
            "| router | family | mass [95% CI] | effect, all layers [95% CI] | "
            + " | ".join(f"effect, {b}" for b in _band_names(effects))
            + " |",
            "|---|---|---|---|" + "---|" * len(_band_names(effects)),
        ]
        mass = result.mass_summary
        mass = mass[(mass.condition == condition) & (mass.seed == seed) & (mass.band == "all")]
        eff = effects[(effects.condition == condition) & (effects.seed == seed)]
        for router in ("attn_res", "mlp_res"):
            for family in FAMILIES:
                m = mass[(mass.router == router) & (mass.family == family)]
                e = eff[(eff.router == router) & (eff.family == family)].set_index("group")
                if m.empty or e.empty:
                    continue
                m = m.iloc[0]
                cells = [f"{_fmt(e.loc[b, 'effect'], 2)}" for b in _band_names(effects)]
                lines.append(
                    f"| {router} | {family} | "
                    f"{_fmt(m.mass)} [{_fmt(m.ci_low)}, {_fmt(m.ci_high)}] | "
                    f"{_fmt(e.loc['all', 'effect'], 2)} [{_fmt(e.loc['all', 'ci_low'], 2)}, "
                    f"{_fmt(e.loc['all', 'ci_high'], 2)}] | " + " | ".join(cells) + " |"
                )
        lines += [
            "",
            "| router | mass ranking | effect ranking | Spearman | top mass = top effect | "
            "appreciable mass, no detectable effect |",
            "|---|---|---|---|---|---|",
        ]
        for row in diss.itertuples():
            lines.append(
                f"| {row.router} | {', '.join(row.mass_ranking)} | "
                f"{', '.join(row.effect_ranking)} | "
                f"{_fmt(row.spearman, 2)} | {'yes' if row.top_mass_is_top_effect else '**no**'} | "
                f"{', '.join(row.appreciable_mass_no_effect) or '-'} |"
            )
    if not result.schedule.empty:
        worst = result.schedule.groupby("seed").max_abs_deviation.max()
        lines += [
            "",
            "## Recency-wrapped baseline against the analytic schedule",
            "",
            "Largest |measured - predicted| family mass over routers, layers and prompts: "
            + ", ".join(f"seed {s}: {v:.1e}" for s, v in worst.items())
            + ".",
        ]
    if result.seeds_summary.n_seeds.max() > 1:
        lines += [
            "",
            "## Across seeds (logit-diff effect, all layers)",
            "",
            "| condition | router | family | seeds | mass (sd) | effect (sd) "
            "| seeds with CI excluding 0 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result.seeds_summary.itertuples():
            lines.append(
                f"| {row.condition} | {row.router} | {row.family} | {row.n_seeds} | "
                f"{_fmt(row.mass)} ({_fmt(row.mass_sd)}) | {_fmt(row.effect, 2)} "
                f"({_fmt(row.effect_sd, 2)}) | {row.seeds_excluding_zero} |"
            )
    return "\n".join(lines) + "\n"


def _band_names(effects: pd.DataFrame) -> list[str]:
    return [g for g in ("early", "middle", "late") if g in set(effects.group)]
