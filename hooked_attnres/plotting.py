"""Plotly figures for routing and mass-versus-effect analyses.

Every function returns a ``plotly.graph_objects.Figure``; `save_html` writes a
self-contained file (plotly.js inlined, so it opens offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hooked_attnres.model.depth import FAMILIES, ROUTERS

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

FAMILY_COLORS = {
    "embedding": "#1f77b4",
    "older": "#2ca02c",
    "prev_completed": "#ff7f0e",
    "current": "#d62728",
}
ROUTER_TITLES = {
    "attn_res": "attention routers",
    "mlp_res": "MLP routers",
    "final_res": "final router",
}


def save_html(fig: go.Figure, path: Union[str, Path]) -> Path:
    """Write ``fig`` as a self-contained HTML file (works offline); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def routing_heatmap(
    mass: pd.DataFrame,
    routers: Optional[Sequence[str]] = None,
    title: str = "Routing mass by family",
) -> go.Figure:
    """Layer x family heatmap of mean routing mass, one panel per router type.

    Args:
        mass: `hooked_attnres.analysis.routing_mass` output (per prompt; averaged here).
        routers: which router types (default: those in ``mass``, sublayer routers only).
    """
    routers = [r for r in (routers or ("attn_res", "mlp_res")) if r in set(mass.router)]
    fig = make_subplots(
        rows=1,
        cols=len(routers),
        subplot_titles=[ROUTER_TITLES[r] for r in routers],
        shared_yaxes=True,
        horizontal_spacing=0.08,
    )
    for col, router in enumerate(routers, start=1):
        table = (
            mass[mass.router == router]
            .groupby(["layer", "family"])
            .mass.mean()
            .unstack("family")
            .reindex(columns=list(FAMILIES))
        )
        fig.add_trace(
            go.Heatmap(
                z=table.to_numpy(),
                x=list(FAMILIES),
                y=[f"layer {l}" for l in table.index],
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                showscale=col == len(routers),
                colorbar=dict(title="mass"),
                hovertemplate="%{y}, %{x}: %{z:.3f}<extra>" + router + "</extra>",
                text=np.round(table.to_numpy(), 2),
                texttemplate="%{text}",
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=120 + 40 * mass.layer.nunique(), width=420 * len(routers))
    return fig


def source_heatmap(
    model: HookedAttnRes,
    cache,
    router: str = "attn_res",
    positions: Union[str, int] = "all",
    title: Optional[str] = None,
) -> go.Figure:
    """Layer x source heatmap of routing weights from a cache (cells of sources a layer
    does not have are blank).

    Args:
        model, cache: a routed model and ``run_with_cache`` output.
        router: ``"attn_res"`` or ``"mlp_res"``.
        positions: ``"all"`` (mean over batch and positions) or one position.
    """
    columns: list[str] = []
    rows = []
    sites = model.sites(router)
    for site in sites:
        weights = cache[site.hook("weights")]
        weights = weights.mean(dim=(0, 1)) if positions == "all" else weights[:, positions].mean(0)
        labels = model.source_labels(site)
        for label in labels:
            if label not in columns:
                columns.append(label)
        rows.append(dict(zip(labels, weights.tolist(), strict=True)))
    order = [c for c in columns if c not in ("current",)] + ["current"]
    z = np.array([[row.get(c, np.nan) for c in order] for row in rows])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=order,
            y=["final" if site.is_final else f"layer {site.layer}" for site in sites],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            colorbar=dict(title="weight"),
            text=np.round(z, 2),
            texttemplate="%{text}",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=title or f"Routing weights, {ROUTER_TITLES[router]}",
        height=120 + 40 * len(rows),
        width=140 + 80 * len(order),
    )
    return fig


def _merged(
    mass_summary: pd.DataFrame, effects: pd.DataFrame, metric: str, group: str
) -> pd.DataFrame:
    chosen = effects[(effects.metric == metric) & (effects.group == group)]
    if chosen.empty:
        raise ValueError(f"no effects for metric={metric!r}, group={group!r}")
    return mass_summary.merge(chosen, on=["router", "family"], suffixes=("_mass", ""))


def mass_effect_bars(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    group: str = "all",
    title: Optional[str] = None,
) -> go.Figure:
    """Per router type: routing mass (top) and ablation effect (bottom) of each family,
    with bootstrap-interval whiskers.

    Args:
        mass_summary: `summarize_mass(mass, by=("router", "family"))`.
        effects: `ablation_effects` output; rows with ``metric`` and ``group`` are shown.
    """
    merged = _merged(mass_summary, effects, metric, group)
    routers = [r for r in ROUTERS if r in set(merged.router)]
    fig = make_subplots(
        rows=2,
        cols=len(routers),
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=[ROUTER_TITLES[r] for r in routers] + [""] * len(routers),
    )
    for col, router in enumerate(routers, start=1):
        part = (
            merged[merged.router == router]
            .set_index("family")
            .reindex(list(FAMILIES))
            .dropna(subset=["mass"])
        )
        colors = [FAMILY_COLORS[f] for f in part.index]
        fig.add_trace(
            go.Bar(
                x=list(part.index),
                y=part.mass,
                marker_color=colors,
                showlegend=False,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=part.ci_high_mass - part.mass,
                    arrayminus=part.mass - part.ci_low_mass,
                ),
                hovertemplate="%{x}: mass %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Bar(
                x=list(part.index),
                y=part.effect,
                marker_color=colors,
                showlegend=False,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=part.ci_high - part.effect,
                    arrayminus=part.effect - part.ci_low,
                ),
                hovertemplate="%{x}: effect %{y:.3f}<extra></extra>",
            ),
            row=2,
            col=col,
        )
    fig.update_yaxes(title_text="routing mass", row=1, col=1)
    fig.update_yaxes(title_text=f"ablation effect ({metric})", row=2, col=1)
    fig.update_layout(
        title=title or f"Mass vs causal effect ({metric}, group {group})",
        height=650,
        width=380 * len(routers) + 80,
    )
    return fig


def mass_effect_scatter(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    group: str = "all",
    title: Optional[str] = None,
) -> go.Figure:
    """Routing mass (x) against |ablation effect| (y) per family and router type, with
    both intervals; points far from the diagonal trend are dissociations."""
    merged = _merged(mass_summary, effects, metric, group)
    symbols = {"attn_res": "circle", "mlp_res": "square", "final_res": "diamond"}
    fig = go.Figure()
    for (router, family), row in merged.set_index(["router", "family"]).iterrows():
        size = abs(row.effect)
        low, high = sorted((abs(row.ci_low), abs(row.ci_high)))
        if row.ci_low <= 0 <= row.ci_high:
            low = 0.0
        fig.add_trace(
            go.Scatter(
                x=[row.mass],
                y=[size],
                mode="markers",
                name=f"{family} ({ROUTER_TITLES[router]})",
                marker=dict(
                    color=FAMILY_COLORS.get(family, "gray"), symbol=symbols[router], size=12
                ),
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[row.ci_high_mass - row.mass],
                    arrayminus=[row.mass - row.ci_low_mass],
                ),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[max(high - size, 0)],
                    arrayminus=[max(size - low, 0)],
                ),
            )
        )
    fig.update_layout(
        title=title or f"Routing mass vs |effect| ({metric})",
        xaxis_title="routing mass",
        yaxis_title=f"|ablation effect| ({metric})",
        height=500,
        width=700,
    )
    return fig


def effect_bands(
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    groups: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> go.Figure:
    """Ablation effect of each family per depth group (x) and router type (panel), with
    bootstrap whiskers: where in depth each family matters (the paper's motifs).

    Args:
        effects: `ablation_effects` output.
        groups: the groups to show, in order (default: every group except ``"all"``).
    """
    chosen = effects[effects.metric == metric]
    if chosen.empty:
        raise ValueError(f"no effects for metric={metric!r}")
    groups = (
        list(groups)
        if groups is not None
        else [g for g in dict.fromkeys(chosen.group) if g != "all"]
    )
    routers = [r for r in ROUTERS if r in set(chosen.router)]
    fig = make_subplots(
        rows=1,
        cols=len(routers),
        shared_yaxes=True,
        subplot_titles=[ROUTER_TITLES[r] for r in routers],
    )
    for col, router in enumerate(routers, start=1):
        part = chosen[(chosen.router == router) & chosen.group.isin(groups)]
        for family in FAMILIES:
            rows = part[part.family == family].set_index("group").reindex(groups)
            fig.add_trace(
                go.Bar(
                    x=groups,
                    y=rows.effect,
                    name=family,
                    marker_color=FAMILY_COLORS[family],
                    legendgroup=family,
                    showlegend=col == 1,
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=rows.ci_high - rows.effect,
                        arrayminus=rows.effect - rows.ci_low,
                    ),
                    hovertemplate=family + " %{x}: %{y:.3f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(title_text=f"ablation effect ({metric})", row=1, col=1)
    fig.update_layout(
        barmode="group",
        title=title or f"Ablation effect per depth group ({metric})",
        height=450,
        width=460 * len(routers) + 120,
    )
    return fig
