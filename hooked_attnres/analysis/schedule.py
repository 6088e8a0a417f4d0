"""The analytic routing of a recency-wrapped model, and how far a model is from it.

With every pseudo-query zero, every logit is 0 except the recency bias ``b`` on the
current source, so a router with ``n`` non-current sources puts ``e^b / (e^b + n)`` on
the current source and ``1 / (e^b + n)`` on each other one, whatever the input
(``../shared/design/attnres.md`` section 4). For the Qwen3-0.6B shape (28 layers,
8 blocks, ``b = 3``) the layer-mean current weight is 0.8397; family means are current
0.840, embedding 0.042, prev_completed 0.035, older 0.083.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attnres._precision import float64_device
from hooked_attnres._validation import (
    is_integer,
    require_choice,
    require_columns,
    require_finite_number,
    require_integer,
    require_keys,
)
from hooked_attnres.analysis.mass import (
    family_read,
    integer_layers,
    require_finite_mass,
    require_one_model,
)
from hooked_attnres.config import MODES
from hooked_attnres.interventions.checks import recorded_run
from hooked_attnres.model.cache import require_cached
from hooked_attnres.model.depth import FAMILIES, SUBLAYER_ROUTERS, RoutingLayout
from hooked_attnres.model.passes import padding_of

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes


def _cumulative_layout(n_layers: int, num_blocks: int, mode: str) -> RoutingLayout:
    """The cumulative layout of ``n_layers`` in ``num_blocks`` blocks (``S = ceil(L / N)``)."""
    return RoutingLayout("cumulative", n_layers, math.ceil(n_layers / num_blocks), mode)


@dataclass(frozen=True)
class RecencySchedule:
    """Predicted routing of a zero-query cumulative-layout model.

    Attributes:
        sources: one row per ``(layer, router, source)``; columns ``layer, router,
            source_index, label, family, weight``.
        families: one row per ``(layer, router, family)``; columns ``layer, router,
            family, weight`` (families absent at a router have weight 0).
        family_means: mean over layers of each family's weight; rows ``router`` in
            ``attn_res, mlp_res, all``, columns the four families.
        mode: ``"block"`` or ``"full"`` (a snapshot after every sublayer: ``num_blocks``
            is unused); `layout` is the routing it predicts.
    """

    n_layers: int
    num_blocks: int
    bias: float
    sources: pd.DataFrame
    families: pd.DataFrame
    family_means: pd.DataFrame
    mode: str = "block"

    @property
    def layout(self) -> RoutingLayout:
        """The routing the schedule predicts: the cumulative layout of its shape and mode."""
        return _cumulative_layout(self.n_layers, self.num_blocks, self.mode)

    @property
    def mean_current(self) -> float:
        """Mean weight of the current source over all layers and both routers."""
        return float(self.family_means.loc["all", "current"])

    def weights(self, layer: int, router: str) -> torch.Tensor:
        """Predicted weights ``[n_sources]`` of one router, ``(layer, router)`` read as
        ``model.site`` reads it (`RoutingLayout.site` of `layout`: a negative layer counts
        from the end; a bool, a float, a layer out of range or an unknown router raises
        ``ValueError``; the table's ``==`` read ``True`` as layer 1 and gave an empty tensor
        for the rest)."""
        site = self.layout.site(layer, router)
        sources = self.sources
        rows = sources[(sources.layer == site.layer) & (sources.router == site.kind)]
        return torch.tensor(rows.sort_values("source_index").weight.to_numpy(), dtype=torch.float64)


def recency_schedule(
    n_layers: int, num_blocks: int, bias: float = 3.0, mode: str = "block"
) -> RecencySchedule:
    """Routing weights predicted for a recency-wrapped model (cumulative layout, zero queries).

    Args:
        n_layers: decoder layers ``L``.
        num_blocks: AttnRes blocks ``N`` (``1 <= N <= L``).
        bias: the recency bias ``b`` (a finite number).
        mode: ``"block"`` (default) or ``"full"`` (a snapshot after every sublayer).
    """
    n_layers = require_integer("n_layers", n_layers, 1)
    if not is_integer(num_blocks) or not 1 <= num_blocks <= n_layers:
        raise ValueError(
            f"num_blocks must be an integer in [1, n_layers={n_layers}], got {num_blocks!r}"
        )
    num_blocks = int(num_blocks)
    bias = float(require_finite_number("bias", bias))
    mode = require_choice("mode", mode, MODES)  # RoutingLayout reads any other as "block"
    layout = _cumulative_layout(n_layers, num_blocks, mode)
    source_rows, family_rows = [], []
    for site in layout.sites():
        labels = layout.labels(site)
        n_other = len(labels) - 1
        # the softmax of logits [0] * n_other + [bias], divided through by the larger of
        # e^bias and 1 (math.exp(bias) overflows for a bias >= 710)
        current, other = (1.0, math.exp(-bias)) if bias >= 0 else (math.exp(bias), 1.0)
        denominator = current + n_other * other
        weights = [other / denominator] * n_other + [current / denominator]
        families = layout.families(site)
        family_of = {i: f for f, idx in families.items() for i in idx}
        for index, (label, weight) in enumerate(zip(labels, weights, strict=True)):
            source_rows.append(
                dict(
                    layer=site.layer,
                    router=site.kind,
                    source_index=index,
                    label=label,
                    family=family_of[index],
                    weight=weight,
                )
            )
        for family, indices in families.items():
            family_rows.append(
                dict(
                    layer=site.layer,
                    router=site.kind,
                    family=family,
                    weight=sum(weights[i] for i in indices),
                )
            )
    sources, families = pd.DataFrame(source_rows), pd.DataFrame(family_rows)
    by_router = families.pivot_table(
        index="router", columns="family", values="weight", aggfunc="mean"
    )
    overall = families.groupby("family").weight.mean().rename("all")
    means = pd.concat([by_router, overall.to_frame().T])[list(FAMILIES)]
    return RecencySchedule(n_layers, num_blocks, bias, sources, families, means, mode)


def schedule_deviation(
    model: HookedAttnRes, cache, schedule: RecencySchedule | None = None
) -> float:
    """Largest ``|measured - predicted|`` routing weight over every router, token and source.

    Args:
        model: a cumulative-layout `HookedAttnRes`.
        cache: an ``ActivationCache`` of ``run_with_cache`` (or its
            ``return_cache_object=False`` dict, a `RunCacheDict`) holding every router's
            ``hook_weights`` (``[batch, pos, n_sources]``). The padding its run recorded
            (``attention_mask``, `hooked_attnres.model.cache.record_of`) is left out, at
            the positions a ``pos_slice`` kept (`RunRecord.kept`). A cache that records
            nothing (a plain ``dict``, or a cache object around one) is refused: its
            padding could not be told (until audit 199 it was read as real tokens);
            declare a dict's pass with ``RunCacheDict(tensors, attention_mask=mask)``.
        schedule: the prediction (default: `recency_schedule` of the model's shape and
            configured recency bias).

    Raises:
        ValueError: a schedule of another number of layers (one of more layers, of the
            model's block size, predicts the model's routers alike, and was reported as
            agreeing); a router's cached weights hold NaN or infinity at a token read (no
            deviation can be measured; NaN would otherwise be skipped and the routing
            reported as agreeing); a cache that records no pass (`recorded_run`); hooks
            whose padding cannot be told
            (`hooked_attnres.interventions.checks.require_run_positions`: last filled by
            an earlier pass); a cache whose every position is padding (a ``pos_slice``
            that kept only padding: nothing to compare, and 0.0 would report agreement).
    """
    cfg = model.cfg
    if cfg.attnres_layout != "cumulative":
        raise ValueError(
            f"the recency schedule describes the cumulative layout; this model has "
            f"{cfg.attnres_layout!r}"
        )
    if schedule is None:
        if cfg.attnres_recency_bias is None:
            raise ValueError("this model has no recency bias; pass a schedule explicitly")
        schedule = recency_schedule(
            cfg.n_layers, cfg.attnres_num_blocks, cfg.attnres_recency_bias, cfg.attnres_mode
        )
    if schedule.n_layers != cfg.n_layers:  # as schedule_comparison refuses it
        raise ValueError(
            f"the schedule is for {schedule.n_layers} layers, but the model has "
            f"{cfg.n_layers}; the schedule is for a different shape than the measured model "
            "(a longer one agreed on the model's layers alone: pass recency_schedule of the "
            "model's n_layers and num_blocks, or no schedule)"
        )
    worst = 0.0
    names = [site.hook("weights") for site in model.sites()]
    require_cached(cache, names, "the cache")
    # a cache that records no padding (a plain dict) is refused: its padding positions
    # were read as real tokens (audit 199); so are hooks whose padding cannot be told
    record = recorded_run(cache, "schedule_deviation's cache", names, sliced=False)
    # the padding at the cached positions (a pos_slice's: `RunRecord.kept`)
    real = record.kept(padding_of(record.attention_mask))
    if real is not None and not bool(real.any()):  # torch's max of nothing failed (audit 193)
        raise ValueError(
            "schedule_deviation's cache holds no real token: its run's attention_mask marks "
            "every cached position as padding (only padding was kept), so no routing can be "
            "compared with the schedule (0.0 would report agreement with nothing measured); "
            "cache the whole run, or a pos_slice that keeps a real token"
        )
    for site in model.sites():
        name = site.hook("weights")
        weights = cache[name]  # float64 on the host for a device without it (MPS)
        measured = _real_positions(weights.to(float64_device(weights.device), torch.float64), real)
        assert site.layer is not None  # the cumulative layout has no final router
        predicted = schedule.weights(site.layer, site.kind).to(measured.device)
        if measured.shape[-1] != predicted.shape[0]:
            raise ValueError(
                f"{name} has {measured.shape[-1]} sources but the schedule predicts "
                f"{predicted.shape[0]}; the schedule is for a different shape"
            )
        if not torch.isfinite(measured).all():
            raise ValueError(
                f"{name} holds non-finite routing weights; the deviation from the schedule "
                "cannot be measured (Python's max would skip NaN and report agreement): "
                "find what made the forward pass non-finite"
            )
        worst = max(worst, (measured - predicted).abs().max().item())
    return worst


def _real_positions(
    weights: Float[Tensor, "... n_sources"], real: Optional[Tensor]
) -> Float[Tensor, "... n_sources"]:
    """``weights`` (``[batch, pos, n_sources]``, or ``[pos, n_sources]`` of a one-prompt
    cache without its batch axis) at the real tokens of ``real`` (``[batch, pos]``, the
    cache's recorded padding, `padding_of`), as ``[n_real, n_sources]``; all of them without
    padding."""
    if real is None:
        return weights
    real = real.to(weights.device)
    if weights.shape[:-1] == real.shape:
        return weights[real]
    if real.shape[0] == 1 and weights.shape[:-1] == real.shape[1:]:
        return weights[real[0]]
    return weights


def schedule_comparison(mass: pd.DataFrame, schedule: RecencySchedule) -> pd.DataFrame:
    """Measured family mass next to the analytic prediction, per router and layer.

    Args:
        mass: per-prompt `hooked_attnres.analysis.routing_mass` of a cumulative-layout model.
        schedule: the prediction (`recency_schedule` of the model's shape and bias).

    Returns:
        One row per ``(router, layer, family)``: ``measured`` (mean over prompts),
        ``predicted``, ``max_abs_deviation`` (largest ``|measured - predicted|`` over
        prompts; for a recency-wrapped model ~1e-7, i.e. routing is content-independent).

    Raises:
        ValueError: a NaN or infinite mass at a sublayer router (pandas' mean and max
            would skip it and report agreement); a schedule of another shape: routers the
            one has and the other lacks (another number of layers), or another set of
            families at a router (another block size or mode; the predictions differ: the
            mass table's ``n_sources`` against the schedule's sources); a mass table
            without ``n_sources``; a NaN ``router``, ``layer`` or ``family``, or one
            mixing text and numbers (`require_keys`: the means would leave NaN rows out, and
            a layer ``'0'`` has no prediction, which read as a schedule of another shape);
            a mass table without rows of a sublayer router (empty, or the final router's
            only: it read as a schedule of another shape until audit 147);
            a table of several models (``condition`` / ``seed`` / ``model`` labels,
            `require_one_model`: their rows were averaged into one ``measured``).
    """
    # a NaN router, layer or family: the filter and groupby would leave the row out of
    # its router's mean
    require_columns(mass, ("router", "layer", "family", "mass"), "mass", "routing_mass(...) output")
    require_keys(mass, ("router", "layer", "family"), "the mass table")
    # several models' rows (a study's mass table of several seeds) were averaged into one
    # "measured" (audit 148)
    require_one_model(
        mass, "schedule_comparison", "pass one model's rows (e.g. mass[mass.seed == 0])"
    )
    # the layers by summarize_mass's rule (`integer_layers`): 0.0 is layer 0, 1.5 is refused
    # by name (it was "the schedule has no prediction ...: a different shape")
    mass = integer_layers(mass, "the mass table")
    measured = mass[mass.router.isin(SUBLAYER_ROUTERS)]
    if measured.empty:  # it read as "a different shape" (audit 147)
        held = "is empty" if mass.empty else f"has only the routers {sorted(set(mass.router))}"
        raise ValueError(
            f"the mass table {held}: no rows of the sublayer routers {list(SUBLAYER_ROUTERS)}, "
            "whose mass the schedule predicts, so there is nothing to compare; pass the whole "
            "routing_mass(model, batch) table of a model of the schedule's shape"
        )
    require_finite_mass(measured, "the comparison")
    grouped = measured.groupby(["router", "layer", "family"]).mass
    table = grouped.mean().rename("measured").to_frame()
    predicted = schedule.families.set_index(["router", "layer", "family"]).weight
    missing = table.index.difference(predicted.index)
    if len(missing):
        raise ValueError(
            f"the schedule has no prediction for {list(missing)[:3]}; it is for a "
            "different shape than the measured model"
        )
    unmeasured = (
        predicted.index.droplevel("family")
        .unique()
        .difference(table.index.droplevel("family").unique())
    )
    if len(unmeasured):
        raise ValueError(
            f"the mass table has no rows for the routers {list(unmeasured)[:3]} the schedule "
            f"predicts ({schedule.n_layers} layers); the schedule is for a different shape "
            "than the measured model (pass the whole routing_mass table of a model of the "
            "schedule's shape)"
        )
    table["predicted"] = predicted.reindex(table.index)
    # which families a router reads: routing_mass's n_sources, and the schedule's sources
    # (not mass != 0 / weight > 0, which an underflowed weight fails too); a mismatch means
    # another block size or mode
    keys = [measured.router, measured.layer, measured.family]
    measured_read = family_read(measured, "the comparison").groupby(keys).any()
    sources = schedule.sources.groupby(["router", "layer", "family"]).size()
    predicted_read = sources.reindex(table.index, fill_value=0) > 0
    differs = table.index[measured_read.reindex(table.index) != predicted_read]
    if len(differs):
        raise ValueError(
            f"the schedule ({schedule.n_layers} layers, {schedule.layout.blocks_text()}) and "
            f"the measured model disagree on which source families exist at {list(differs)[:3]}: "
            "the schedule is for a different shape (block size or mode) than the measured "
            "model"
        )
    deviation = (
        measured.mass
        - predicted.reindex(
            pd.MultiIndex.from_frame(measured[["router", "layer", "family"]])
        ).to_numpy()
    ).abs()
    table["max_abs_deviation"] = deviation.groupby(
        [measured.router, measured.layer, measured.family]
    ).max()
    return table.reset_index()
