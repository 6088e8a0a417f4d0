"""The study's plotly figures, built from its tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hooked_attnres import plotting

if TYPE_CHECKING:
    from hooked_attnres.study.run import StudyResult


def study_figures(result: StudyResult) -> dict:
    """Plotly figures of a study: routing heatmaps and mass-vs-effect bars and scatter per
    condition and seed."""
    figures = {}
    for (condition, seed), mass in result.mass.groupby(["condition", "seed"]):
        tag = f"{condition}_seed{seed}"
        summary = result.mass_summary
        summary = summary[
            (summary.condition == condition) & (summary.seed == seed) & (summary.band == "all")
        ]
        effects = result.effects[
            (result.effects.condition == condition) & (result.effects.seed == seed)
        ]
        figures[f"routing_{tag}"] = plotting.routing_heatmap(
            mass, title=f"Routing mass at the answer position: {condition}, seed {seed}"
        )
        figures[f"mass_effect_{tag}"] = plotting.mass_effect_bars(
            summary, effects, title=f"Mass vs ablation effect: {condition}, seed {seed}"
        )
        figures[f"scatter_{tag}"] = plotting.mass_effect_scatter(
            summary, effects, title=f"Mass vs |effect|: {condition}, seed {seed}"
        )
        figures[f"bands_{tag}"] = plotting.effect_bands(
            effects, title=f"Ablation effect per depth band: {condition}, seed {seed}"
        )
    return figures
