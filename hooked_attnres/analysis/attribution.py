"""Attribution over routing: every ablation or patch of routing weights, estimated from
one forward and one backward pass (attribution patching, AtP), then verified exactly.

**Mask-and-renormalise ablation** (`attribute_routing`). Masking a family at a router sets
its logits to ``-inf``; the router's weights jump from ``w`` to the exact renormalised
``w_masked = softmax(logits with the family at -inf)``. With ``g = d metric / d w`` (the
gradient at the clean run with respect to that router's ``hook_weights``), the linear
estimate of the metric's change is::

    estimate = sum over the cell's routers and positions of  g . (w_masked - w)

The softmax itself is not linearised (``w_masked`` is exact); what is linear is the rest of
the network from the routing weights to the metric. A cell that masks several routers
(a depth band) gets the sum of its routers' estimates: the first-order change when every
router's weights move by ``eps (w_masked - w)`` on top of what they compute (interactions
between the routers of a cell are second order and ignored, as in AtP).

``method="norm"`` (AtP*-style refinement) propagates exactly through the nonlinearity right
after the router, the sublayer's RMSNorm (``ln1``/``ln2``/``ln_final``; it is scale
invariant, so renormalising weights that move the router's output in length is far from
linear there): with ``y`` the norm's ``hook_normalized`` output and ``g_y`` the gradient
there, ``estimate = g_y . (RMSNorm(sum_i w_masked_i V_i) - y)``, from the same backward pass.

**Patching routing weights** (`attribution_patch_routing_weights`): the estimate of
`hooked_attnres.patching.get_act_patch_routing_weights` (the clean weights of one router
patched into the corrupted run): ``metric(corrupted) + g_corrupted . (w_clean - w_corrupted)``.

Both are first-order estimates: they rank cells for a fraction of the cost of the exact
sweep, and `RoutingAttribution.verify_top` re-runs the largest ones exactly. Where routing
is saturated (a weight near 1 that the ablation moves to 0) or a sublayer's output depends
on its input in an all-or-nothing way, the estimate can be far off; ``docs/analysis.md``
has the validation numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres._precision import stat_dtype, sum_where, widened
from hooked_attnres._validation import (
    require_bool,
    require_choice,
    require_finite_number,
    require_integer,
    require_selection,
)
from hooked_attnres.analysis.bootstrap import as_numpy, check_bootstrap
from hooked_attnres.analysis.effects import (
    Metric,
    PlannedAblation,
    cell_rows,
    check_metrics,
    effect_rows,
    metric_name,
    metric_values,
    plan_ablations,
    probe_rows,
    reads_answer_only,
    run_ablations,
)
from hooked_attnres.analysis.mass import layers_text
from hooked_attnres.interventions.checks import check_count, require_eval
from hooked_attnres.interventions.routing import (
    batch_mean_hooks,
    mask_logits,
    require_whole_batch_means,
)
from hooked_attnres.interventions.selection import check_routers
from hooked_attnres.model.depth import FAMILIES, SUBLAYER_ROUTERS, RouterSite
from hooked_attnres.model.norms import (
    any_hook_attached,
    backward_hook_places,
    hook_signature,
    is_observed,
    rms_normalize,
)
from hooked_attnres.model.passes import padding_of
from hooked_attnres.model.routing import weighted_sum
from hooked_attnres.model.weights import WeightsSignature
from hooked_attnres.patching import (
    _check,
    _check_cache,
    _check_metric,
    _column,
    _scalar,
    _site_rows,
)
from hooked_attnres.tasks.base import TaskBatch, require_task_batch

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

METHODS = ("linear", "norm")
# metrics whose gradient is zero almost everywhere
NOT_DIFFERENTIABLE = {
    "accuracy": "accuracy is piecewise constant (its gradient is zero almost everywhere), so "
    "it has no attribution; use metrics='logit_diff' or 'logprob' here, and "
    "ablation_effects(..., metrics=('accuracy',)) or verify_top for exact accuracy effects"
}


# --- checks --------------------------------------------------------------------------


def _check_methods(method: Union[str, Sequence[str]]) -> list[str]:
    methods = require_selection(
        "method", [method] if isinstance(method, str) else method, why=f"name one of {METHODS}"
    )
    if any(m not in METHODS for m in methods):
        raise ValueError(f"method must be one of {METHODS} (or a list of them), got {method!r}")
    return methods


def _check_differentiable(metrics: Sequence[Metric]) -> None:
    for metric in metrics:
        if isinstance(metric, str) and metric in NOT_DIFFERENTIABLE:
            raise ValueError(NOT_DIFFERENTIABLE[metric])


def _check_answer_only(metrics: Sequence[Metric], batch: TaskBatch, logits: Tensor) -> None:
    """Refuse a callable metric that reads logits at positions other than the answer
    positions (`reads_answer_only`): attribution has the logits there only."""
    with torch.no_grad():
        for metric in metrics:
            if callable(metric) and not reads_answer_only(metric, batch, logits):
                if not logits[probe_rows(batch).to(logits.device)].isfinite().all(-1).any():
                    raise ValueError(
                        f"metric {metric_name(metric)!r} cannot be told to read the logits "
                        "at batch.answer_pos only: the logits are not finite at every prompt "
                        "it was tried on (the model's forward pass overflowed? run it in "
                        "float32, model.to(torch.float32), or bfloat16)"
                    )
                raise ValueError(
                    f"metric {metric_name(metric)!r} reads logits at positions other than "
                    "batch.answer_pos (e.g. answer_pos - 1, the last position or a mean over "
                    "positions); attribution computes the logits at the answer positions "
                    "only, so it would read other numbers there. Read "
                    "logits[arange(batch), batch.answer_pos] only, or measure exact effects "
                    "with ablation_effects(..., fast=False)"
                )


# --- capturing one run ---------------------------------------------------------------


@contextmanager
def _frozen_parameters(model: HookedAttnRes) -> Iterator[None]:
    """Parameters need no gradient: the backward computes activation gradients only."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@dataclass
class _Capture:
    """What one run with the graph kept records at one router: its logits and weights
    ``[batch, pos, n_sources]`` (weights in the graph), and for ``method="norm"`` its
    sources (``n_sources`` x ``[batch, pos, d_model]``) and the following norm's
    ``hook_normalized`` output ``[batch, pos, d_model]`` (in the graph); in a bfloat16 /
    float16 model also that output recomputed in float32 without rounding
    (``normalized_unrounded``, made when first needed)."""

    logits: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    sources: Optional[list[Tensor]] = None
    normalized: Optional[Tensor] = None
    normalized_unrounded: Optional[Tensor] = None  # bf16 / fp16: the clean one, float32


@contextmanager
def _capturing(
    model: HookedAttnRes, sites: Sequence[RouterSite], need_norm: bool
) -> Iterator[dict[RouterSite, _Capture]]:
    """Record what the estimates need at every router while the block runs: logits and
    weights through their hooks (the weights start the graph at the first router), and
    for ``method="norm"`` the norm's ``hook_normalized`` and the router's input sources
    (a module pre-hook, so that no stacked copy is made; through ``hook_sources`` only
    where another hook already watches it, as that hook may edit them)."""
    places = backward_hook_places(model)
    if places:
        raise ValueError(
            f"a backward hook is attached to the model at {places}; the attribution's "
            "backward pass would run it, and a backward hook that returns a tensor replaces "
            "the gradient the estimates are made of (the exact ablation and patching it "
            "estimates run forward only, unaffected by it). Remove the backward hooks "
            "(model.reset_hooks(), or leave bwd_hooks out of model.hooks(...)) for the "
            "attribution; forward hooks may stay."
        )
    captures = {site: _Capture() for site in sites}
    hooks, handles = [], []
    for site, capture in captures.items():
        router = model.router(site)
        norm = model.norm_after(site)
        edited = [router.hook_weights] + (
            [router.hook_out, norm.hook_scale, norm.hook_normalized] if need_norm else []
        )
        for point in edited:
            if is_observed(point):
                raise ValueError(
                    f"a hook is already attached to {point.name}; attribution takes the "
                    "weights to be softmax(hook_logits) feeding the router's output unchanged "
                    "(and method='norm' its output normalised by the norm unchanged), so it "
                    "cannot account for hooks there. Remove them, or attach them to "
                    "hook_logits / hook_sources (which attribution sees)."
                )
        if need_norm and (router._forward_hooks or norm._forward_pre_hooks):
            # PyTorch module hooks around the hook points: one on the router's output or
            # the norm's input puts another tensor between hook_out and hook_normalized
            raise ValueError(
                f"a PyTorch forward hook is attached to the router {site.prefix} or a forward "
                f"pre-hook to the norm that reads it ({norm.hook_normalized.name}'s module); "
                "method='norm' recomputes the norm's input as the router's weighted sum, so "
                "it cannot account for what such a hook does. Remove them, or use "
                "method='linear' (exact through any forward hook)."
            )

        def on_logits(logits, hook, capture=capture):
            capture.logits = logits.detach()

        def on_weights(weights, hook, capture=capture):
            if not weights.requires_grad:  # the first router: start the graph here
                weights = weights.detach().requires_grad_()
            capture.weights = weights
            return weights

        hooks += [(site.hook("logits"), on_logits), (site.hook("weights"), on_weights)]
        if need_norm:

            def on_input(module, args, capture=capture):
                capture.sources = [source.detach() for source in args[0]]

            def on_sources(sources, hook, capture=capture):
                capture.sources = list(sources.detach().unbind(dim=-2))

            def on_normalized(normalized, hook, capture=capture):
                capture.normalized = normalized

            handles.append(router.register_forward_pre_hook(on_input))
            if is_observed(router.hook_sources):
                hooks.append((site.hook("sources"), on_sources))
            norm_hook = norm.hook_normalized.name
            assert norm_hook is not None  # named by the model's setup()
            hooks.append((norm_hook, on_normalized))
    try:
        with model.hooks(fwd_hooks=hooks):
            yield captures
    finally:
        for handle in handles:
            handle.remove()


def _gradients(
    values: Tensor, captures: dict[RouterSite, _Capture], need_norm: bool, retain: bool
) -> dict[RouterSite, tuple[Tensor, Optional[Tensor]]]:
    """``{site: (d sum(values) / d weights, d sum(values) / d normalized or None)}``; a
    tensor the metric does not depend on gets zeros."""
    sites = list(captures)
    inputs: list[Tensor] = []
    for site in sites:
        capture = captures[site]
        assert capture.weights is not None, f"{site} did not run"
        inputs.append(capture.weights)
        if need_norm:
            assert capture.normalized is not None
            inputs.append(capture.normalized)
    found = torch.autograd.grad(values.sum(), inputs, retain_graph=retain, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found, strict=True)]
    out = {}
    step = 2 if need_norm else 1
    for index, site in enumerate(sites):
        out[site] = (grads[step * index], grads[step * index + 1] if need_norm else None)
    return out


def _require_separable(
    values: Float[Tensor, " batch"],
    captures: dict[RouterSite, _Capture],
    need_norm: bool,
    grads: dict[RouterSite, tuple[Tensor, Optional[Tensor]]],
    retain: bool,
    name: str,
) -> None:
    """Refuse a pass whose prompts are coupled: the metric of one prompt depending on
    another prompt's routing weights, through a hook that mixes the prompts of a pass
    (a batch mean, ``x.roll(1, 0)``) or a callable metric that does (values minus their
    batch mean). The estimates take the gradient of the *summed* metric at each prompt's
    weights as that prompt's own; coupled, it holds the other prompts' changes too
    (the cell means stay first-order right, the per-prompt estimates and intervals do
    not).

    The probe: one more backward, of the metric summed over the prompts ``S`` of even
    Thue-Morse colour (``j`` with an even number of 1 bits). For prompts that do not
    interact its gradient is ``grads``' at the prompts of ``S`` (the same arithmetic:
    equal to the bit in practice) and exactly 0 at the others; a coupling between a
    prompt of ``S`` and one outside it (in either direction) shows. The colouring has
    no period, so a mix of every prompt, or of each with the one ``d`` places on (a
    roll), always crosses it; a coupling confined to prompts of one colour (only
    prompts 0 and 3, say) is not seen."""
    n = len(values)
    chosen = [bin(j).count("1") % 2 == 0 for j in range(n)]
    scales = torch.tensor(chosen, dtype=values.dtype, device=values.device)
    probed = _gradients(values * scales, captures, need_norm, retain)
    worst, largest = 0.0, 0.0
    for site, pair in probed.items():
        for got, plain in zip(pair, grads[site], strict=True):
            if got is None or plain is None:
                continue
            expected = plain * scales.to(plain.dtype).reshape(-1, *[1] * (plain.ndim - 1))
            worst = max(worst, float((got - expected).abs().nan_to_num(0.0).max()))
            for side in (expected, got):  # a summed metric that is constant: plain is 0
                largest = max(largest, float(side.abs().nan_to_num(0.0).max()))
    # the margin is for a backward kernel whose sum for one prompt depends on the others'
    if worst > 64 * torch.finfo(values.dtype).eps * largest:
        raise ValueError(
            f"the prompts of a pass are coupled: metric {name!r} of one prompt depends on "
            "another prompt's routing weights (a hook attached to the model mixes the "
            "prompts of a pass, e.g. a mean over the batch, or the callable metric does, "
            "e.g. values minus their batch mean; relative size of the coupling "
            f"{worst / largest:.2g}). The one backward pass of the summed metric would put "
            "the other prompts' changes in each prompt's estimate: the per-prompt "
            "estimates and their intervals would not be each prompt's own. Make the hook "
            "act on each prompt alone (a batch statistic as a fixed tensor from a cache of "
            "a run of the whole batch), return per-prompt values that read only that "
            "prompt's logits, or measure the exact effects with ablation_effects"
        )


def _router_estimate(
    method: str,
    model: HookedAttnRes,
    site: RouterSite,
    capture: _Capture,
    grads: tuple[Tensor, Optional[Tensor]],
    new_weights: Float[Tensor, "batch pos n_sources"],
) -> Float[Tensor, "batch pos"]:
    """First-order change of the metric per prompt and position when one router's weights
    become ``new_weights`` (float32, or float64 in a float64 model)."""
    assert capture.weights is not None
    weights = capture.weights.detach()
    if method == "linear":
        return (grads[0] * (new_weights - weights)).sum(-1)
    assert capture.sources is not None and capture.normalized is not None
    assert grads[1] is not None
    sources = capture.sources
    parts = [source.to(weights.dtype) for source in sources]
    eps = model.norm_after(site).eps
    if sources[0].dtype == weights.dtype:  # float32 / float64: the model's own numbers
        out = weighted_sum(parts, new_weights.movedim(-1, 0))
        change = rms_normalize(out, eps) - capture.normalized.detach()
    else:
        # bfloat16 / float16: both normalised outputs in the routing dtype, unrounded.
        # Rounding the new one to the model's dtype before subtracting the model's
        # (rounded) output made each element of a small change a difference of two
        # 8-bit numbers (docs/analysis.md: 4x the linear method's rounding error)
        if capture.normalized_unrounded is None:
            clean_out = weighted_sum(parts, weights.movedim(-1, 0))
            capture.normalized_unrounded = rms_normalize(clean_out, eps)
        out = weighted_sum(parts, new_weights.movedim(-1, 0))
        change = rms_normalize(out, eps) - capture.normalized_unrounded
    return (grads[1].to(weights.dtype) * change).sum(-1)


@contextmanager
def _refusing_coupled_means(model: HookedAttnRes, n_prompts: int) -> Iterator[None]:
    """Refuse, while the block runs a pass of ``n_prompts > 1`` prompts, a ``value="mean"``
    intervention (`batch_mean_hooks`) whose mean depends on routing weights the
    attribution moves (its hook point's tensor in the graph: parameters are frozen, so
    only a captured router's weights start one). Such a mean couples the prompts: the
    gradient of the summed metric at one prompt's weights holds the change of every
    prompt's metric, so each per-prompt estimate (and the intervals over them) would be
    of the whole batch, not of its prompt (the cell means stay right; audit 175: 1.1e-3
    off per prompt, largest estimate 0.21). A mean taken before every attributed router (out
    of the graph) couples nothing and is allowed (audit 179: it was refused too)."""
    found = batch_mean_hooks(model) if n_prompts > 1 else []

    def check(tensor: Tensor, hook) -> None:
        if tensor.requires_grad:
            raise ValueError(
                f"an intervention with value='mean' is attached ({hook.name}) and its mean "
                "depends on routing weights this attribution moves: the batch's mean "
                "couples the prompts (moving one prompt's routing moves the mean every "
                "prompt is patched with), so the one backward pass of the summed metric "
                "would put the other prompts' changes in each prompt's estimate: the "
                "per-prompt estimates and their intervals would not be each prompt's own. "
                "Patch with the batch's mean as a fixed [1, pos, d_model] tensor from a "
                "cache of a run of the whole batch (cache[hook].mean(0, keepdim=True) for "
                "patch_committed, cache[hook][:, :, i].mean(0, keepdim=True) for source i "
                "of patch_sources; in a padded batch, the mean over the prompts real at "
                "each position, as 'mean' takes it), attribute only routers after the "
                "mean, or measure the exact effects under the 'mean' patch with "
                "ablation_effects"
            )

    # attached after the interventions already there: sees what the mean hook returns
    with model.hooks(fwd_hooks=[(name, check) for name in dict.fromkeys(found)]):
        yield


def _masked_weights(
    logits: Float[Tensor, "batch pos n_sources"], mask: Sequence[bool], site: RouterSite
) -> Float[Tensor, "batch pos n_sources"]:
    """The exact renormalised weights of mask-and-renormalise ablation (`mask_logits`, so a
    mask that leaves a position nothing, together with hooks already masking there, is
    refused as in the exact sweep)."""
    where = torch.tensor(mask, dtype=torch.bool, device=logits.device)
    return mask_logits(logits, where, f"{site.hook('logits')}: this cell").softmax(dim=-1)


def _scatter_positions(
    per_pos: Float[Tensor, "batch q"], n_pos: int, answer_pos: Tensor
) -> Float[Tensor, "batch pos"]:
    """Per-position values of a router that ran only at the answer positions
    (``logit_positions``) placed back on the full position axis (0 elsewhere)."""
    if per_pos.shape[1] == n_pos:
        return per_pos
    out = per_pos.new_zeros(per_pos.shape[0], n_pos)
    out[torch.arange(per_pos.shape[0], device=per_pos.device), answer_pos] = per_pos[:, 0]
    return out


# --- mask-and-renormalise attribution ------------------------------------------------


@dataclass
class RoutingAttribution:
    """The result of `attribute_routing`.

    Attributes:
        table: one row per (method, metric, cell): the columns of
            `hooked_attnres.analysis.ablation_effects` in its row order (per method),
            plus ``estimate`` and ``method``. ``effect`` is the estimate (so the table
            plots like an effect table), ``ablated = clean + estimate``, ``ci_low`` /
            ``ci_high`` a bootstrap interval of the estimate over prompts; ``method``
            says that these are estimates (``"linear"`` or ``"norm"``).
        per_prompt: ``{(method, metric name): [n_cells, n_prompts]}`` estimates.
        by_position: with ``by_position=True``, ``{(method, metric name): [n_cells,
            n_prompts, pos]}``: the estimate of masking the cell's family at that position
            only (summing over positions gives ``per_prompt``).
        plan: the `PlannedAblation` of every cell (the one ablation compiler's masks).
        clean: ``{metric name: [n_prompts]}`` clean metric.
        masked_mass: ``[n_cells]``, the routing weight the ablation removes (the largest
            over the cell's routers of the mean over prompts and over the positions the
            metric reads through: up to the answer position, or the answer position
            alone at the routers after the last attention): near 1 the ablation is
            all-or-nothing and the linear estimate extrapolates furthest.
        seconds: wall time of the attribution.
    """

    table: pd.DataFrame
    per_prompt: dict[tuple[str, str], np.ndarray]
    by_position: Optional[dict[tuple[str, str], np.ndarray]]
    plan: list[PlannedAblation]
    clean: dict[str, np.ndarray]
    masked_mass: np.ndarray
    seconds: float
    model: HookedAttnRes = field(repr=False)
    batch: TaskBatch = field(repr=False)
    metrics: list[Metric] = field(repr=False)
    settings: dict = field(default_factory=dict, repr=False)

    def position_table(self) -> pd.DataFrame:
        """The per-position estimates as a tidy table: ``router, group, layers, family,
        metric, method, pos, estimate`` (mean over prompts)."""
        if self.by_position is None:
            raise ValueError(
                "run attribute_routing(..., by_position=True) for per-position estimates"
            )
        rows = []
        for (method, metric), values in self.by_position.items():
            means = values.mean(axis=1)
            for i, cell in enumerate(self.plan):
                for pos in range(means.shape[1]):
                    rows.append(
                        {
                            "router": cell.router,
                            "group": cell.group,
                            "layers": layers_text(cell.layers),
                            "family": cell.family,
                            "metric": metric,
                            "method": method,
                            "pos": pos,
                            "estimate": means[i, pos],
                        }
                    )
        return pd.DataFrame(rows)

    def verify_top(
        self,
        k: int = 10,
        metric: Optional[str] = None,
        method: Optional[str] = None,
        min_masked_mass: Optional[float] = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Run the exact ablation of the ``k`` cells with the largest ``|estimate|``.

        Args:
            k: how many cells (per metric); 0 with ``min_masked_mass`` verifies the cells
                it selects only.
            metric: rank by this metric only (default: the top ``k`` of each metric).
            method: whose estimates rank the cells (default: the first method computed).
            min_masked_mass: also verify every cell whose ablation removes at least this
                much routing weight at one of its routers (`masked_mass`), whatever its
                estimate: there the ablation is all-or-nothing and a first-order estimate
                can miss a large effect entirely (e.g. 0.9; ``docs/analysis.md``).

        Returns:
            The `ablation_effects` rows of those cells (exact ``clean, ablated, effect,
            ci_low, ci_high``; equal to what `ablation_effects` gives for them, computed by
            the same `run_ablations` and bootstrap) with ``estimate`` (of ``method``),
            ``error = estimate - effect``, ``method = "exact"``, ``estimate_method`` and
            ``verified_because`` (``"top estimate"`` or ``"masked mass"``), sorted by metric
            and ``|estimate|`` (no rows, the same columns, when ``k=0`` and no cell reaches
            ``min_masked_mass``).

        Raises:
            ValueError: besides bad arguments, other hooks or weights than the attribution
                had, and an estimate it ranks (or, with ``min_masked_mass``, a masked mass)
                that is NaN (a pass that was not finite: NaN sorted last, so such cells were
                never verified while others were returned as the largest).
        """
        k = require_integer("k", k, 0)
        progress = require_bool("progress", progress)  # "False" showed the bar
        require_finite_number("min_masked_mass", min_masked_mass, optional=True)
        if min_masked_mass is not None and not 0 < min_masked_mass <= 1:
            raise ValueError(f"min_masked_mass must be in (0, 1], got {min_masked_mass!r}")
        if k == 0 and min_masked_mass is None:
            raise ValueError(
                "k=0 verifies no cell: give k >= 1 for the largest estimates, or "
                "min_masked_mass (e.g. 0.9) with k=0 to verify the all-or-nothing cells only"
            )
        methods = self.settings["methods"]
        method = methods[0] if method is None else method
        if method not in methods:
            raise ValueError(f"method {method!r} was not computed; this result has {methods}")
        names = [metric_name(m) for m in self.metrics]
        chosen = names if metric is None else [metric]
        if metric is not None and metric not in names:
            raise ValueError(f"metric {metric!r} was not computed; this result has {names}")
        far = set()
        if min_masked_mass is not None:
            _require_rankable(self.plan, self.masked_mass, "masked mass")
            far = {int(i) for i in np.flatnonzero(self.masked_mass >= min_masked_mass)}
        top: dict[str, set[int]] = {}
        for name in chosen:
            estimates = self.per_prompt[(method, name)].mean(axis=1)
            if k > 0:
                _require_rankable(self.plan, estimates, f"{method} {name!r} estimate")
            order = np.argsort(-np.abs(estimates), kind="stable")
            top[name] = {int(i) for i in order[:k]}
        cells = sorted(far.union(*top.values()))
        columns = [
            *self.table.columns.drop(["estimate", "method"]),
            *("estimate", "error", "method", "estimate_method", "verified_because"),
        ]
        if not cells:  # k=0 and no cell reaches min_masked_mass
            return pd.DataFrame(columns=columns)
        sub_plan = [self.plan[i] for i in cells]
        metrics = [m for m in self.metrics if metric_name(m) in chosen]
        s = self.settings
        require_eval(self.model, "verify_top")
        if hook_signature(self.model) != s.get("hooks", ()):
            # the exact rows would come from another model than the estimates
            raise ValueError(
                "verify_top runs with other hooks attached to the model than attribute_routing "
                "did (hooks added or removed since, e.g. outside the `with model.hooks(...)` "
                "block of the attribution): its exact effects would not be of the model the "
                "estimates are of. Call verify_top under the same hooks, or run "
                "attribute_routing again"
            )
        changed = s["weights"].change(self.model)
        if changed is not None:
            raise ValueError(
                f"verify_top runs on other weights than attribute_routing did ({changed}: "
                "the model's parameters were edited, reloaded or converted to another dtype "
                "or device since, e.g. load_state_dict of another checkpoint): its exact "
                "effects would not be of the model the estimates are of. Run "
                "attribute_routing again"
            )
        clean, ablated = run_ablations(
            self.model, self.batch, sub_plan, metrics, chunk=s["chunk"], progress=progress
        )
        rows = effect_rows(
            sub_plan, clean, ablated, metrics, s["n_bootstrap"], s["confidence"], s["seed"]
        )
        out = []
        for row, (name, i) in zip(
            rows, [(metric_name(m), i) for m in metrics for i in cells], strict=True
        ):
            if i not in top[name] and i not in far:
                continue
            estimate = float(self.per_prompt[(method, name)][i].mean())
            out.append(
                {
                    **row,
                    "estimate": estimate,
                    "error": estimate - row["effect"],
                    "method": "exact",
                    "estimate_method": method,
                    "verified_because": "top estimate" if i in top[name] else "masked mass",
                }
            )
        table = pd.DataFrame(out, columns=columns)
        table["_order"] = -table["estimate"].abs()
        return (
            table.sort_values(["metric", "_order"], kind="stable")
            .drop(columns="_order")
            .reset_index(drop=True)
        )


def _require_rankable(plan: list[PlannedAblation], values: np.ndarray, what: str) -> None:
    """Refuse to rank cells by ``values`` ``[n_cells]`` when one is NaN: NumPy sorts NaN
    last and ``>=`` is False for it, so such a cell (of unknown size) would never be
    verified while others were returned as the largest."""
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        cell = plan[int(bad[0])]
        raise ValueError(
            f"the {what} of {len(bad)} of {len(values)} cells is not finite (first: router "
            f"{cell.router!r}, group {cell.group!r}, family {cell.family!r}), so the cells "
            "cannot be ranked: the model's forward or backward pass was not finite (a float16 "
            "overflow?). Run the attribution on the model in float32 (model.to(torch.float32)) "
            "or bfloat16, or run ablation_effects on the cells you need"
        )


def attribute_routing(
    model: HookedAttnRes,
    batch: TaskBatch,
    metrics: Union[Metric, Sequence[Metric]] = "logit_diff",
    families: Sequence[Union[str, int]] = FAMILIES,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
    groups: Union[str, dict] = "bands",
    bands: Optional[dict] = None,
    method: Union[str, Sequence[str]] = "linear",
    by_position: bool = False,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 256,
    progress: bool = True,
) -> RoutingAttribution:
    """Estimate the effect of every mask-and-renormalise ablation of `ablation_effects` from
    one forward and one backward pass per chunk of prompts (attribution patching).

    Args:
        model: a routed `HookedAttnRes` in eval mode (any dtype and device; the routing
            math and the estimates are float32, float64 in a float64 model).
        batch: the prompts (a `TaskBatch`; the metric is read at the answer position).
        metrics: ``"logit_diff"``, ``"logprob"``, a callable ``fn(batch, logits) -> [batch]``
            (see `metric_values`), or a list (one backward pass each). ``"accuracy"`` has no
            gradient and is refused.
        families, routers, groups, bands: the cells, exactly as `ablation_effects` /
            `plan_ablations` (the same compiled masks).
        method: ``"linear"`` (gradient x exact weight change), ``"norm"`` (exact through the
            sublayer RMSNorm; same passes, a little more arithmetic), or both as a list.
        by_position: also keep the estimate of masking the family at each position alone.
        n_bootstrap, confidence, seed: the bootstrap over prompts of the estimate.
        chunk: prompts per forward/backward pass (memory: one pass keeps its graph).

    Returns:
        A `RoutingAttribution`: ``.table`` (the `ablation_effects` columns plus ``estimate``
        and ``method``), ``.verify_top(k)`` (exact ablation of the largest estimates).

    Cost: one forward pass with the routers observed (their hooked path) plus one backward
    pass without parameter gradients, about 2.5 F per metric (F = a plain forward pass;
    one more backward while a hook is attached or for a callable metric: the coupling
    probe); ``docs/benchmarks.md`` has the measured number.

    Raises:
        ValueError: a model in train mode or without routers, ``accuracy`` or an unknown
            metric, a callable metric that does not return ``[batch]``, different callable
            metrics of one name, an unknown family, router or group, an unknown method, a
            ``value="mean"`` intervention attached whose mean depends on routing weights
            the attribution moves, while more than one prompt is attributed (it couples
            the prompts: `batch_mean_hooks`; a mean taken before every attributed router
            is allowed), and a hook or callable metric that mixes the prompts of a pass
            (a batch mean, a roll; `_require_separable`'s probe, one more backward per
            metric while a hook is attached or the metric is a callable).
        TypeError: ``by_position`` that is not True or False (``"False"`` was read as True).
    """
    start_time = time.perf_counter()
    require_eval(model, "attribute_routing")
    require_task_batch(batch, "attribute_routing")
    metrics = check_metrics(metrics)
    _check_differentiable(metrics)
    methods = _check_methods(method)
    routers = check_routers(model, routers)  # read once: a generator is empty after
    by_position = require_bool("by_position", by_position)  # "False" was read as True
    progress = require_bool("progress", progress)  # "no" showed the bar
    check_count("chunk", chunk)
    n_bootstrap, confidence, seed = check_bootstrap(n_bootstrap, confidence, seed, "n_bootstrap")
    plan = plan_ablations(model, families, routers, groups, bands)
    need_norm = "norm" in methods
    sites = sorted(
        {site for cell in plan for site, _ in cell.ablation.masks}, key=lambda s: s.sublayer
    )
    names = [metric_name(m) for m in metrics]
    n, n_pos = len(batch), batch.tokens.shape[1]
    per_prompt = {(mt, nm): np.zeros((len(plan), n)) for mt in methods for nm in names}
    positions = (
        {(mt, nm): np.zeros((len(plan), n, n_pos)) for mt in methods for nm in names}
        if by_position
        else None
    )
    clean = {nm: np.zeros(n) for nm in names}
    mass_sums = np.zeros((len(plan), max((len(c.ablation.masks) for c in plan), default=0)))
    # hooks already attached (e.g. a surrounding `model.hooks(...)`) must see what a plain
    # forward pass shows them: every position, not the answer position alone after the
    # last attention (`logit_positions`); then the logits are read at the answer position
    every_position = any_hook_attached(model)
    hooks_during_run = hook_signature(model)  # verify_top must see the same ones
    weights_during_run = WeightsSignature(model)  # and the same weights
    require_whole_batch_means(model, n, chunk, "attribute_routing")
    chunks = list(range(0, n, chunk))
    bar = tqdm(total=len(chunks), disable=not progress, desc="attribution", dynamic_ncols=True)
    for first in chunks:
        with torch.inference_mode(False), torch.enable_grad(), _frozen_parameters(model):
            # copies made outside inference mode: the answer positions index the logits
            # in the graph, and an inference tensor (a batch made, or this call run,
            # under torch.inference_mode) cannot be saved for backward
            part = batch[first : first + chunk]._map(torch.clone)
            rows = slice(first, first + len(part))
            answer_pos = part.answer_pos.to(model.embed.W_E.device)
            at_answer = replace(part, answer_pos=torch.zeros_like(part.answer_pos))
            with (
                _capturing(model, sites, need_norm) as captures,
                _refusing_coupled_means(model, len(part)),
            ):
                if every_position:
                    prompts = torch.arange(len(part), device=answer_pos.device)
                    logits = model(part.tokens)[prompts, answer_pos].unsqueeze(1)
                else:
                    logits = model(part.tokens, logit_positions=answer_pos)
            if not sites:
                # no cell masks anything (every estimate is exactly 0) and no router is
                # captured, so nothing upstream needs a gradient: the metric is checked on
                # a leaf copy of the logits (before, a plan of no-ops was refused as if
                # the metric were detached)
                logits = logits.detach().requires_grad_()
            _check_answer_only(metrics, part, logits)  # a few prompts of each chunk
            for index, metric in enumerate(metrics):
                values = metric_values(at_answer, logits, metric)
                if not values.requires_grad:
                    raise ValueError(
                        f"metric {names[index]!r} does not depend on the logits through a "
                        "gradient (it returns a detached or piecewise-constant value)"
                    )
                clean[names[index]][rows] = as_numpy(values)
                more = index < len(metrics) - 1  # another metric's backward follows
                # the model treats each prompt alone; what the user adds may not
                probe = bool(captures) and len(part) > 1 and (every_position or callable(metric))
                grads = (
                    _gradients(values, captures, need_norm, retain=more or probe)
                    if captures
                    else {}
                )
                if probe:
                    _require_separable(values, captures, need_norm, grads, more, names[index])
                with torch.no_grad():
                    if index == 0:
                        mass_sums += as_numpy(_masked_mass(model, plan, captures, answer_pos))
                    estimates = _chunk_estimates(
                        model, plan, captures, grads, methods, n_pos, answer_pos, by_position
                    )
                for method, (cells, cells_by_pos) in estimates.items():  # one copy per chunk
                    per_prompt[(method, names[index])][:, rows] = as_numpy(cells)
                    if positions is not None:
                        positions[(method, names[index])][:, rows] = as_numpy(cells_by_pos)
        del captures, logits
        bar.update(1)
    bar.close()
    table = _estimate_table(plan, per_prompt, clean, methods, names, n_bootstrap, confidence, seed)
    return RoutingAttribution(
        table=table,
        per_prompt=per_prompt,
        by_position=positions,
        plan=plan,
        clean=clean,
        masked_mass=(mass_sums / n).max(axis=1, initial=0.0),
        seconds=time.perf_counter() - start_time,
        model=model,
        batch=batch,
        metrics=metrics,
        settings=dict(
            methods=methods,
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
            chunk=chunk,
            hooks=hooks_during_run,
            weights=weights_during_run,
        ),
    )


def _chunk_estimates(
    model, plan, captures, grads, methods, n_pos, answer_pos, by_position
) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
    """Every cell's estimate for one chunk and metric, on the model's device:
    ``{method: ([n_cells, batch], [n_cells, batch, pos] or None)}``."""
    router_estimates: dict = {}  # (site, mask, method) -> [batch, pos]
    out = {}
    for method in methods:
        cells = []
        for cell in plan:
            total = None
            for site, mask in cell.ablation.masks:
                key = (site, mask, method)
                if key not in router_estimates:
                    capture = captures[site]
                    new = _masked_weights(capture.logits, mask, site)
                    per_pos = _router_estimate(method, model, site, capture, grads[site], new)
                    router_estimates[key] = _scatter_positions(per_pos, n_pos, answer_pos)
                total = router_estimates[key] if total is None else total + router_estimates[key]
            if total is None:  # masks nothing: exactly 0
                dtype = stat_dtype(model.cfg.dtype)  # no float64 on devices that lack it
                total = torch.zeros(len(answer_pos), n_pos, dtype=dtype, device=answer_pos.device)
            cells.append(total)
        stacked = torch.stack(cells)  # [n_cells, batch, pos]
        out[method] = (stacked.sum(-1), stacked if by_position else None)
    return out


def _masked_mass(model, plan, captures, answer_pos: Int[Tensor, " batch"]) -> Tensor:
    """``[n_cells, max routers per cell]``: each cell's removed weight per masked router,
    averaged over the positions the metric reads through (`_metric_positions`) and summed
    over the chunk's prompts."""
    width = max((len(cell.ablation.masks) for cell in plan), default=0)
    reference = next(iter(captures.values())).weights if captures else None
    sums = torch.zeros(
        len(plan),
        width,
        dtype=None if reference is None else reference.dtype,
        device=None if reference is None else reference.device,
    )
    last_attention = model.routing_layout.last_attention_sublayer
    for i, cell in enumerate(plan):
        for j, (site, mask) in enumerate(cell.ablation.masks):
            weights = captures[site].weights.detach()
            where = torch.tensor(mask, dtype=torch.bool, device=weights.device)
            removed = sum_where(weights, where, dim=-1)  # [batch, pos run]
            read = _metric_positions(site, last_attention, removed.shape[1], answer_pos)
            # selected (`sum_where`): a nan weight at a position the metric does not read
            # (after the answer) made the sum nan
            sums[i, j] = (sum_where(removed, read, dim=-1) / read.sum(-1)).sum()
    return sums


def _metric_positions(
    site: RouterSite, last_attention: int, n_run: int, answer_pos: Int[Tensor, " batch"]
) -> Bool[Tensor, "batch n_run"]:
    """The positions of a router's run (``n_run``: every position, or 1 where it ran at
    the answer position only) whose weights the metric, read at the answer position,
    depends on: up to the answer position at a router that feeds an attention; the
    answer position alone at a router after the last attention (the last MLP's, the
    final router), which acts on each position alone."""
    if n_run == 1:  # ran at the answer position only
        return torch.ones(len(answer_pos), 1, dtype=torch.bool, device=answer_pos.device)
    positions = torch.arange(n_run, device=answer_pos.device)
    if site.sublayer > last_attention:
        return positions[None, :] == answer_pos[:, None]
    return positions[None, :] <= answer_pos[:, None]


def _estimate_table(plan, per_prompt, clean, methods, names, n_bootstrap, confidence, seed):
    rows = []
    for method in methods:
        for name in names:
            estimates = per_prompt[(method, name)]
            for row in cell_rows(plan, estimates, clean[name], name, n_bootstrap, confidence, seed):
                rows.append({**row, "estimate": row["effect"], "method": method})
    return pd.DataFrame(rows)


# --- attribution patching of routing weights ------------------------------------------


def attribution_patch_routing_weights(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
    by_pos: bool = False,
    method: str = "linear",
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Tensor:
    """The attribution-patching estimate of
    `hooked_attnres.patching.get_act_patch_routing_weights` (``by_pos=False``) or
    ``get_act_patch_routing_weights_by_pos`` (``by_pos=True``), with the same arguments and
    result layout, from one forward and one backward pass of the corrupted run.

    For each router: ``metric(corrupted) + g . (w_clean - w_corrupted)`` summed over
    positions (or at each position), with ``g`` the gradient of ``patching_metric`` with
    respect to the corrupted run's ``hook_weights`` (``method="norm"``: exact through the
    sublayer RMSNorm, as in `attribute_routing`).

    Args:
        corrupted_tokens: ``[batch, pos]``.
        clean_cache: a cache of the clean run holding every router's ``hook_weights``.
        patching_metric: logits ``[batch, pos, d_vocab]`` -> a differentiable scalar.
        attention_mask: ``[batch, pos]``, 1 at real tokens and 0 at padding, for padded
            prompts, as in the exact sweeps (the clean cache made with the same mask:
            ``model.run_with_cache(clean_tokens, attention_mask=mask)``; a cache made with
            another mask is refused). Without it the corrupted run attends to the padding
            (the model warns once on left padding).

    Returns:
        ``[len(routers), n_layers]`` or ``[len(routers), n_layers, pos]`` float32 (the final
        router in column 0, other columns NaN), on the model's device: estimated metric
        values of the patched runs.

    Raises:
        TypeError: ``by_pos`` that is not True or False (``"no"`` gave the by-position layout).
    """
    require_eval(model, "attribution patching")
    method = require_choice("method", method, METHODS)
    by_pos = require_bool("by_pos", by_pos)  # "no" gave the by-position layout
    routers = _check(model, corrupted_tokens, routers)
    _check_metric(patching_metric)
    site_rows = _site_rows(model, routers)
    sites = [site for _, site in site_rows]
    mask = model._validate_attention_mask(
        attention_mask, tuple(corrupted_tokens.shape), corrupted_tokens.device
    )
    needed = [site.hook("weights") for site in sites]
    _check_cache(model, clean_cache, corrupted_tokens, needed, mask)
    need_norm = method == "norm"
    with torch.inference_mode(False), torch.enable_grad(), _frozen_parameters(model):
        with _capturing(model, sites, need_norm) as captures:
            logits = model(corrupted_tokens, attention_mask=attention_mask)
        value = patching_metric(widened(logits))  # the logits exact patching gives
        _scalar(value)  # one scalar, as for exact patching
        if not isinstance(value, Tensor) or not value.requires_grad:
            raise ValueError(
                "patching_metric must be differentiable in the logits (got a detached value)"
            )
        grads = _gradients(value.reshape(1), captures, need_norm, retain=False)
        with torch.no_grad():
            n_pos = corrupted_tokens.shape[1]
            shape = (len(routers), model.cfg.n_layers) + ((n_pos,) if by_pos else ())
            out = torch.full(shape, float("nan"), device=model.W_E.device)
            base = value.detach().float()
            real = padding_of(mask)
            for row, site in site_rows:
                capture = captures[site]
                assert capture.weights is not None
                new = torch.as_tensor(clean_cache[site.hook("weights")]).to(
                    capture.weights.device, capture.weights.dtype
                )
                estimate = _router_estimate(method, model, site, capture, grads[site], new)
                if real is not None:
                    # a padding position never reaches a real one (the attention zeroes its
                    # key and value), so patching its weights changes only its own logits;
                    # its weights can be nan in both runs (a hook's edit; with eps 0 they
                    # were 0 / 0 before `padding_eps`), and g * (nan - nan)
                    # made every sum over it nan (the exact sweep: finite). Only a
                    # non-finite estimate is replaced: a metric that reads a padding
                    # position's logits has a finite, non-zero one there, which is kept
                    padding = ~real.to(estimate.device)
                    estimate = torch.where(padding & ~estimate.isfinite(), 0.0, estimate)
                per_pos = estimate.sum(0)
                out[row, _column(site)] = base + (per_pos if by_pos else per_pos.sum()).float()
    return out


__all__ = [
    "METHODS",
    "RoutingAttribution",
    "attribute_routing",
    "attribution_patch_routing_weights",
]
