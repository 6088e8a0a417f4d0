"""Analyses built on caches and interventions: routing mass, ablation effects with
bootstrap intervals, attribution (ablation and patching effects estimated by gradients),
the mass-versus-effect dissociation, motifs, analytic schedules, the routing lens."""

import warnings

from hooked_attnres.analysis.attribution import (
    RoutingAttribution,
    attribute_routing,
    attribution_patch_routing_weights,
)
from hooked_attnres.analysis.bootstrap import bootstrap_ci, bootstrap_ci_rows
from hooked_attnres.analysis.dissociation import dissociation_report
from hooked_attnres.analysis.effects import (
    METRICS,
    PlannedAblation,
    ablation_effects,
    effect_rows,
    metric_name,
    metric_values,
    plan_ablations,
    run_ablations,
)
from hooked_attnres.analysis.lens import RoutingLens, lens_hook_names, routing_lens
from hooked_attnres.analysis.mass import band_of, family_read, routing_mass, summarize_mass
from hooked_attnres.analysis.motifs import (
    CLAIMS,
    PREREGISTERED,
    Criteria,
    claim_text,
    motif_report,
    motif_verdicts,
    verdict_changes,
    verdict_word,
)
from hooked_attnres.analysis.schedule import (
    RecencySchedule,
    recency_schedule,
    schedule_comparison,
    schedule_deviation,
)

__all__ = [
    "CLAIMS",
    "PREREGISTERED",
    "Criteria",
    "motif_report",
    "motif_verdicts",
    "verdict_changes",
    "verdict_word",
    "claim_text",
    "METRICS",
    "PlannedAblation",
    "RecencySchedule",
    "RoutingLens",
    "RoutingAttribution",
    "ablation_effects",
    "attribute_routing",
    "attribution_patch_routing_weights",
    "band_of",
    "bootstrap_ci",
    "bootstrap_ci_rows",
    "dissociation_report",
    "lens_hook_names",
    "effect_rows",
    "family_read",
    "metric_name",
    "metric_values",
    "plan_ablations",
    "recency_schedule",
    "routing_lens",
    "routing_mass",
    "run_ablations",
    "schedule_comparison",
    "schedule_deviation",
    "summarize_mass",
]


def __getattr__(name: str):
    if (
        name == "Ablation"
    ):  # the plan entry of 0.1; the compiled intervention is interventions.Ablation
        warnings.warn(
            "hooked_attnres.analysis.Ablation is deprecated: plan entries are "
            "PlannedAblation; the compiled mask is hooked_attnres.interventions.Ablation",
            DeprecationWarning,
            stacklevel=2,
        )
        return PlannedAblation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
