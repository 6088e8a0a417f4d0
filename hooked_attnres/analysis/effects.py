"""Causal effect of ablating source families: per router type and depth group.

An *ablation* masks one family (mask-and-renormalise) at every router of one type inside
one group of layers. `ablation_effects` measures a task metric with and without it, per
prompt, and reports the mean change with a bootstrap interval over prompts.

Speed (``fast=True``): the clean run's depth state entering every sublayer is computed
once per chunk of prompts; an ablation whose first masked router is at sublayer ``s``
(``2 * layer`` for attention, ``2 * layer + 1`` for the MLP) starts there
(``model.forward_from(state_s, s)``) instead of from the embedding, and computes logits
only at the answer position (``logit_positions``: the last layer's queries, MLP and
unembedding run there only). Ablations that start at the same sublayer can run together
in one batch, each copy of the prompts with its own mask (see ``max_rows``). Ablations
that mask nothing (the family does not exist at
those routers) cost nothing: their metric is the clean one. ``fast=False`` runs one full
forward pass per ablation, no-ops included (the reference the fast path is tested
against). ``max_rows`` caps the rows of one batched pass; on CPU one large pass of many
copies is slower than the copies one by one, so by default (``None``) each copy runs
alone, which also makes every ablation's result independent of which others are run with
it (`RoutingAttribution.verify_top` re-runs a subset and gets the same bits).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres._precision import widened
from hooked_attnres._validation import as_items, one_or_list, require_bool, require_selection
from hooked_attnres.analysis.bootstrap import as_numpy, bootstrap_ci_rows, check_bootstrap
from hooked_attnres.analysis.mass import layers_text
from hooked_attnres.interventions.checks import check_count, require_eval
from hooked_attnres.interventions.routing import (
    Ablation,
    batched_mask_hooks,
    require_whole_batch_means,
)
from hooked_attnres.interventions.selection import check_bands, check_routers, depth_bands
from hooked_attnres.model.depth import FAMILIES, DepthState, RouterSite
from hooked_attnres.model.norms import any_hook_attached
from hooked_attnres.tasks.base import TaskBatch, require_task_batch

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

METRICS = ("logit_diff", "logprob", "accuracy")


MetricFn = Callable[[TaskBatch, Tensor], Tensor]
Metric = Union[str, MetricFn]


def metric_name(metric: Metric) -> str:
    """The name of a metric in a table: the string itself, or a callable's ``__name__``."""
    return metric if isinstance(metric, str) else getattr(metric, "__name__", repr(metric))


def check_metrics(metrics: Union[Metric, Sequence[Metric]]) -> list[Metric]:
    """Metrics as a list (a single one may be given bare): names from `METRICS` or
    callables ``fn(batch, logits) -> [batch]``; raises ``ValueError`` for unknown names,
    an empty list, a name given twice (`require_selection`) or different callables of one
    name (two lambdas: the tables key metrics by name; the error says to name them)."""
    metrics = (
        [metrics] if isinstance(metrics, str) or callable(metrics) else as_items("metrics", metrics)
    )
    names = [metric_name(m) for m in metrics]
    for index, metric in enumerate(metrics):
        # different: not equal (one name as two str objects, or obj.method taken twice, is
        # one metric given twice, which require_selection refuses as a repeat)
        shared = [m for m in metrics[:index] if metric_name(m) == names[index] and m != metric]
        if shared:
            # the tables key metrics by name: two lambdas were refused as a metric given twice
            raise ValueError(
                f"metrics has different callables named {names[index]!r}; the tables and "
                "per-prompt results are keyed by a metric's name, so their rows could not be "
                "told apart. Give each callable its own __name__ (define it with def, or set "
                "fn.__name__ = 'my_metric')"
            )
    require_selection(
        "metrics",
        metrics,
        names,
        why="a name of METRICS or a callable fn(batch, logits) -> [batch]",
    )
    unknown = [m for m in metrics if not callable(m) and m not in METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown}; metrics are {METRICS} or callables "
            "fn(batch, logits) -> [batch]"
        )
    return metrics


def metric_values(
    batch: TaskBatch, logits: Float[Tensor, "batch pos d_vocab"], metric: Metric
) -> Float[Tensor, " batch"]:
    """Per-prompt metric ``[batch]`` (float32; float64 in a float64 model, but for
    ``accuracy``, float32 in every model: `TaskBatch.correct`) read at
    ``batch.answer_pos``: ``logit_diff`` (answer - contrast), ``logprob`` (of the answer) or
    ``accuracy`` (1 if the argmax is the answer, else 0; ``1 / k`` where the answer ties
    ``k - 1`` other tokens for the largest finite logit; NaN where the argmax is undefined:
    a NaN logit or an infinite tie, `TaskBatch.correct`), or a callable ``metric(batch, logits)``
    that returns one float per prompt ``[batch]``; a callable is given the logits in
    float32 for a bfloat16 / float16 model (exactly; its own arithmetic on 8-bit logits
    would round each value: a hand-written logit difference was 3.8e-4 off in bfloat16).
    ``logits`` may cover the answer positions only (``[batch, 1, d_vocab]`` with
    ``answer_pos`` all 0, as the fast sweep passes them).

    Raises:
        ValueError: an unknown metric name, or a callable whose result is not ``[batch]``
            (a scalar such as a batch mean is refused: the tables average per-prompt values
            and bootstrap over prompts).
    """
    if callable(metric):
        values = metric(batch, widened(logits))
        if (
            not isinstance(values, Tensor)
            or tuple(values.shape) != (len(batch),)
            or not values.is_floating_point()
        ):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"metric {metric_name(metric)!r} must return one float per prompt, a tensor of "
                f"shape [batch] = [{len(batch)}]; got {got}. Return per-prompt values (not "
                "their mean): the tables average them and bootstrap over prompts"
            )
        return widened(values)
    if metric == "logit_diff":
        return batch.logit_diff(logits)  # widened
    if metric == "logprob":
        return batch.answer_logprob(logits)  # widened
    if metric == "accuracy":
        return batch.correct(logits).float()
    raise ValueError(f"metric must be one of {METRICS} or a callable, got {metric!r}")


PROBE_PROMPTS = 8  # prompts `reads_answer_only` tries a callable metric on


def probe_rows(batch: TaskBatch) -> Tensor:
    """``[k]`` rows of ``batch`` to try a callable metric on: the first `PROBE_PROMPTS`
    and the first prompt of every other answer position."""
    positions = batch.answer_pos.tolist()
    first = {p: i for i, p in reversed(list(enumerate(positions)))}
    rows = sorted(set(range(min(len(batch), PROBE_PROMPTS))) | set(first.values()))
    return torch.tensor(rows, dtype=torch.long, device=batch.answer_pos.device)


def reads_answer_only(
    metric: MetricFn, batch: TaskBatch, answer_logits: Float[Tensor, "batch 1 d_vocab"]
) -> bool:
    """Whether a callable metric reads the logits at ``batch.answer_pos`` only, as the
    fast sweep and attribution need (they compute logits there alone): on the prompts of
    `probe_rows` (the first `PROBE_PROMPTS` and one of every answer position), the metric
    of whole-sequence logits that are NaN everywhere but at the answer positions (which
    hold ``answer_logits [batch, 1, d_vocab]``) must equal its value on ``answer_logits``
    with ``answer_pos`` 0. A metric that reads another position (``answer_pos - 1``, the
    last one, a mean over positions) reads NaN there. Prompts whose answer logits are not
    finite are left out of the comparison (they tell nothing); with no finite one left,
    False (the metric cannot be told to read the answer position only)."""
    index = probe_rows(batch)
    part = batch[index]
    answers = answer_logits[index.to(answer_logits.device)].detach()
    rows = torch.arange(len(part), device=answers.device)
    probe = answers.new_full((len(part), part.tokens.shape[1], answers.shape[-1]), float("nan"))
    probe[rows, part.answer_pos.to(answers.device)] = answers[:, 0]
    at_answer = dataclasses.replace(part, answer_pos=torch.zeros_like(part.answer_pos))
    whole = metric_values(part, probe, metric).detach()
    short = metric_values(at_answer, answers, metric).detach()
    # a prompt whose answer logits are not finite (a float16 overflow) tells nothing: the
    # metric is NaN there whatever it reads (and NaN != NaN made every metric look like
    # one reading other positions); the finite prompts decide, and with none the metric
    # cannot be told to read the answer position only
    told = answers.isfinite().all(-1).all(-1)
    if not told.any():
        return False
    whole, short = whole[told], short[told]
    scale = float(short.abs().max()) if short.isfinite().all() else 1.0
    return torch.allclose(whole, short, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


@dataclass(frozen=True)
class PlannedAblation:
    """One cell of an ablation sweep: a family masked at every router of one type in one
    group of layers (see `plan_ablations`).

    Attributes:
        router: router type.
        group: the name of the layer group (a band, ``"layer 3"``, ``"all"``, ``"final"``).
        layers: the layers of the group.
        family: the masked source family (or a label / index spec).
        ablation: the compiled `hooked_attnres.interventions.Ablation` (its sites and
            masks; routers where the family is every source are in ``ablation.skipped``).
    """

    router: str
    group: str
    layers: tuple[int, ...]
    family: Union[str, int]
    ablation: Ablation

    @property
    def is_noop(self) -> bool:
        return self.ablation.is_noop

    @property
    def start_sublayer(self) -> Optional[int]:
        """The first masked sublayer (`RouterSite.sublayer`; ``None`` for a no-op)."""
        return self.ablation.start_sublayer

    @property
    def start_layer(self) -> Optional[int]:
        """The layer of `start_sublayer` (``n_layers`` for the final router)."""
        return None if self.start_sublayer is None else self.start_sublayer // 2

    @property
    def masks(self) -> tuple[tuple[str, tuple[bool, ...]], ...]:
        """``((hook_logits name, mask), ...)`` of the masked routers."""
        return tuple((site.hook("logits"), mask) for site, mask in self.ablation.masks)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Routers left alone because the family is every source there."""
        return tuple(str(site) for site in self.ablation.skipped)


def _groups(model: HookedAttnRes, groups, bands) -> dict[str, list[int]]:
    n = model.cfg.n_layers
    if groups == "bands":
        return depth_bands(n, bands)
    if groups == "layers":
        return {f"layer {layer}": [layer] for layer in range(n)}
    if groups == "all":
        return {"all": list(range(n))}
    if isinstance(groups, dict):
        if not groups:
            raise ValueError("groups={} names no layer group; give at least one name -> layers")
        return depth_bands(n, groups)
    raise ValueError(
        f"groups must be 'bands', 'layers', 'all' or a dict of name -> layers, got {groups!r}"
    )


def plan_ablations(
    model: HookedAttnRes,
    families: Sequence[Union[str, int]] = FAMILIES,
    routers: Sequence[str] = ("attn_res", "mlp_res"),
    groups: Union[str, dict] = "bands",
    bands: Optional[dict] = None,
) -> list[PlannedAblation]:
    """Every (router type x layer group x family) ablation, compiled to per-router masks.

    Args:
        families: what to mask (families, labels or indices; one ablation each; a single
            one may be given bare).
        routers: router types (a single one may be a string); ``"final_res"`` gets a
            single group ``"final"``.
        groups: ``"bands"`` (depth bands, default thirds), ``"layers"`` (one per layer),
            ``"all"`` (every layer at once), or ``{name: layers}``.
        bands: ``{name: layers}`` for ``groups="bands"`` (default: thirds).

    Raises:
        ValueError: an empty ``families``, ``routers``, ``groups={}`` or ``bands={}`` (a
            sweep without cells), a family or router given twice (its cells twice),
            ``bands`` with another ``groups`` than ``"bands"`` (it would be ignored), an
            unknown family, router or group.
    """
    routers = check_routers(model, routers)
    families = one_or_list("families", families)
    require_selection("families", families)
    check_bands(bands)
    if bands is not None and not (isinstance(groups, str) and groups == "bands"):
        raise ValueError(
            f"bands= applies to groups='bands' only, but groups={groups!r} would ignore it; "
            "pass the bands as groups={name: layers} (or groups='bands', bands=...)"
        )
    layer_groups = _groups(model, groups, bands)
    plan = []
    for router in routers:
        if all(site.is_final for site in model.sites(router)):  # no layers to group
            router_groups: dict[str, list[int]] = {"final": []}
        else:
            router_groups = layer_groups
        for group, layers in router_groups.items():
            for family in families:
                ablation = Ablation.compile(
                    model, family, routers=router, layers=layers or None, on_full="skip"
                )
                plan.append(PlannedAblation(router, group, tuple(layers), family, ablation))
    return plan


def _tile(state: DepthState, copies: int) -> DepthState:
    if copies == 1:
        return state  # forward passes never mutate their input state

    def tile(t: Tensor) -> Tensor:
        return t.repeat(copies, *([1] * (t.ndim - 1)))

    padding = state.padding
    return dataclasses.replace(  # keeps the record of the sublayer the state enters
        state,
        blocks=[tile(b) for b in state.blocks],
        current=tile(state.current),
        padding=tile(padding) if isinstance(padding, Tensor) else padding,
    )


def _same_routed_source(
    ablations: Sequence[PlannedAblation], indices: Sequence[int], state: DepthState
) -> dict[int, int]:
    """Ablations (starting at the sublayer ``state`` enters) that repeat an earlier one
    exactly: ``{duplicate: original}``.

    An ablation that masks one router and keeps a single source there routes exactly that
    source (its weight is exactly 1), so two of them at the same router whose kept sources
    hold equal values give identical passes: masking ``embedding`` or ``current`` at the
    first attention router of a snapshot (cumulative) layout, where ``current`` is still
    a copy of the embedding.
    """
    sources = state.sources
    seen: list[tuple[RouterSite, Tensor, int]] = []
    same_as = {}
    for i in indices:
        masks = ablations[i].ablation.masks
        if len(masks) != 1 or sum(not masked for masked in masks[0][1]) != 1:
            continue
        site, mask = masks[0]
        kept = sources[mask.index(False)]
        original = next(
            (j for other, value, j in seen if other == site and torch.equal(value, kept)), None
        )
        if original is None:
            seen.append((site, kept, i))
        else:
            same_as[i] = original
    return same_as


@torch.no_grad()
def run_ablations(
    model: HookedAttnRes,
    batch: TaskBatch,
    ablations: Sequence[PlannedAblation],
    metrics: Sequence[Metric] = ("logit_diff",),
    fast: bool = True,
    chunk: int = 256,
    max_rows: Optional[int] = None,
    progress: bool = True,
) -> tuple[dict[Metric, np.ndarray], dict[Metric, np.ndarray]]:
    """Per-prompt metrics of the clean run and of every ablation.

    ``fast`` (the module docstring) applies only while no hook is attached to the model:
    hooks already attached (e.g. a surrounding ``model.hooks(...)``) would see, in the
    fast path, copies of the batch and only the answer position after the last
    attention (a hook on ``blocks.{L-1}.hook_mlp_out`` that edits position 0 would edit
    the answer position), so then every ablation runs as a full forward pass, as with
    ``fast=False``: what such a hook sees is what a plain forward pass shows it. The
    same holds for a callable metric that reads logits at positions other than
    ``batch.answer_pos`` (`reads_answer_only`, tried on the prompts of `probe_rows`): the fast
    path computes logits at the answer positions only.

    Returns:
        ``(clean, ablated)``: ``clean[metric]`` is ``[n_prompts]``, ``ablated[metric]`` is
        ``[n_ablations, n_prompts]`` (keyed by the metrics as given).
    """
    metrics = check_metrics(metrics)
    require_task_batch(batch, "run_ablations")
    check_count("chunk", chunk)
    fast = require_bool("fast", fast)  # "False" took the fast path
    progress = require_bool("progress", progress)  # "no" showed the bar
    if max_rows is not None:
        check_count("max_rows", max_rows)
    require_eval(model, "run_ablations")
    require_whole_batch_means(model, len(batch), chunk, "run_ablations")
    fast = fast and not any_hook_attached(model)  # before the sweep attaches its own
    if fast and any(callable(metric) for metric in metrics):
        # the fast path computes logits at the answer positions only: a callable metric
        # that reads any other position runs as full forward passes
        probe = batch[probe_rows(batch)]
        answers = model(probe.tokens, logit_positions=probe.answer_pos)
        fast = all(reads_answer_only(m, probe, answers) for m in metrics if callable(m))
    n = len(batch)
    clean = {m: np.zeros(n) for m in metrics}
    ablated = {m: np.zeros((len(ablations), n)) for m in metrics}
    active = [i for i, a in enumerate(ablations) if not a.is_noop]
    chunks = list(range(0, n, chunk))
    by_start: dict[int, list[int]] = defaultdict(list)
    for i in active:
        start_sublayer = ablations[i].start_sublayer
        assert start_sublayer is not None  # an active ablation masks some router
        by_start[start_sublayer].append(i)
    total = len(chunks) * (len(ablations) if not fast else len(by_start) + 1)
    bar = tqdm(total=total, disable=not progress, desc="ablations", dynamic_ncols=True)
    for start in chunks:
        part = batch[start : start + chunk]
        rows = slice(start, start + len(part))
        if fast:
            # the metrics read the answer position only: logits there, [batch, 1, d_vocab]
            at_answer = dataclasses.replace(part, answer_pos=torch.zeros_like(part.answer_pos))
            states = model.depth_states(part.tokens, sublayers=True)
            logits = model.forward_from(
                states[-1], len(states) - 1, logit_positions=part.answer_pos
            )
            scored = at_answer
        else:
            logits, scored = model(part.tokens), part
        # per-prompt values stay on the model's device until the chunk is done (one copy
        # to the host per chunk and metric)
        clean_now = {metric: metric_values(scored, logits, metric) for metric in metrics}
        pending: dict = {metric: {} for metric in metrics}  # {ablation index: [prompts]}
        if fast:
            bar.update(1)
            per_pass = 1 if max_rows is None else max(1, max_rows // len(part))
            for sublayer, indices in sorted(by_start.items()):
                same_as = _same_routed_source(ablations, indices, states[sublayer])
                indices = [i for i in indices if i not in same_as]
                for group_start in range(0, len(indices), per_pass):
                    group = indices[group_start : group_start + per_pass]
                    hooks = batched_mask_hooks(
                        [ablations[i].ablation for i in group], len(part), part.tokens.device
                    )
                    with model.hooks(fwd_hooks=hooks):
                        out = model.forward_from(
                            _tile(states[sublayer], len(group)),
                            sublayer,
                            logit_positions=part.answer_pos.repeat(len(group)),
                        )
                    for copy, i in enumerate(group):
                        copy_logits = out[copy * len(part) : (copy + 1) * len(part)]
                        for metric in metrics:
                            pending[metric][i] = metric_values(at_answer, copy_logits, metric)
                for duplicate, original in same_as.items():
                    for metric in metrics:
                        pending[metric][duplicate] = pending[metric][original]
                bar.update(1)
        else:
            for i in range(len(ablations)):  # every ablation, no-ops included: the reference loop
                hooks = ablations[i].ablation.hooks()
                out = model.run_with_hooks(part.tokens, fwd_hooks=hooks)
                for metric in metrics:
                    pending[metric][i] = metric_values(part, out, metric)
                bar.update(1)
        for metric in metrics:  # no-op ablations keep the clean values
            values = [pending[metric].get(i, clean_now[metric]) for i in range(len(ablations))]
            block = as_numpy(torch.stack([clean_now[metric], *values]))
            clean[metric][rows] = block[0]
            ablated[metric][:, rows] = block[1:]
    bar.close()
    return clean, ablated


def ablation_effects(
    model: HookedAttnRes,
    batch: TaskBatch,
    families: Sequence[Union[str, int]] = FAMILIES,
    routers: Sequence[str] = ("attn_res", "mlp_res"),
    groups: Union[str, dict] = "bands",
    bands: Optional[dict] = None,
    metrics: Sequence[Metric] = ("logit_diff", "logprob", "accuracy"),
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    fast: bool = True,
    chunk: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Effect of masking each family at each router type and layer group.

    Args:
        model: a routed `HookedAttnRes` (put in eval mode).
        batch: the prompts (a `TaskBatch`; the metric is read at the answer position).
        families, routers, groups, bands: what to ablate (see `plan_ablations`).
        metrics: any of ``"logit_diff"``, ``"logprob"``, ``"accuracy"``, or callables
            ``fn(batch, logits) -> [batch]`` (see `metric_values`; named by ``__name__``).
        n_bootstrap, confidence, seed: the percentile bootstrap over prompts.
        fast: reuse the clean prefix and batch ablations (same results as ``False``;
            while hooks are attached to the model, ``False`` runs: see `run_ablations`).

    Returns:
        One row per (router, group, family, metric): ``router, group, layers, family,
        metric, clean, ablated, effect, ci_low, ci_high, n_masked_routers, skipped,
        n_prompts, confidence`` (the intervals' level). ``effect = mean(ablated - clean)``
        over prompts (negative: the family helped the answer); ``ci_low``/``ci_high``
        bound it. Families a group does not have give ``n_masked_routers = 0`` and effect
        0 exactly.
    """
    metrics = check_metrics(metrics)
    # checked here too, so that the messages name the function called (they named
    # run_ablations, audit 147)
    require_task_batch(batch, "ablation_effects")
    require_eval(model, "ablation_effects")
    # before the sweep, not after it
    n_bootstrap, confidence, seed = check_bootstrap(n_bootstrap, confidence, seed, "n_bootstrap")
    plan = plan_ablations(model, families, routers, groups, bands)
    clean, ablated = run_ablations(
        model, batch, plan, metrics, fast=fast, chunk=chunk, progress=progress
    )
    return pd.DataFrame(effect_rows(plan, clean, ablated, metrics, n_bootstrap, confidence, seed))


def estimate_method(effects: pd.DataFrame, what: str) -> Optional[str]:
    """What the ``effect`` column of ``effects`` holds, read from its ``method`` column (one
    rule, for `require_measured` and the figures' labels): ``None`` for measured effects
    (`ablation_effects`, no ``method`` column; `RoutingAttribution.verify_top`, method
    ``"exact"``), else the method whose first-order estimates it holds (`attribute_routing`:
    ``"linear"`` or ``"norm"``).

    Raises:
        ValueError: (naming ``what``, the reader) a table of several kinds, whose effect
            column one name cannot describe: two methods, estimates beside measured rows,
            or rows without a method (NaN: ablation_effects rows concatenated with
            estimates; `require_measured` failed there with Python's bare ``TypeError``,
            review 182).
    """
    if "method" not in effects.columns:
        return None
    methods = list(dict.fromkeys(effects.method))
    named = [m for m in methods if isinstance(m, str)]
    if len(named) < len(methods):
        raise ValueError(
            f"{what}: effects has rows without a method (NaN, e.g. ablation_effects rows "
            f"concatenated with attribution estimates) beside rows of method(s) {named}: its "
            "effect column would mix measured effects with first-order estimates; pass one "
            "kind (effects[effects.method == 'linear'], or the measured rows alone)"
        )
    if len(methods) > 1:
        raise ValueError(
            f'{what}: effects mixes methods {methods} ("exact": measured by verify_top; '
            '"linear" / "norm": attribute_routing\'s first-order estimates); pass one: '
            f"effects[effects.method == {methods[0]!r}]"
        )
    return None if not methods or methods == ["exact"] else str(methods[0])


def effect_name(method: Optional[str]) -> str:
    """The name of an effect column (`estimate_method`'s ``method``): ``"ablation effect"``
    (measured) or ``"attribution estimate (linear)"``, as the figures label it."""
    return "ablation effect" if method is None else f"attribution estimate ({method})"


def require_measured(effects: pd.DataFrame, what: str) -> None:
    """Refuse a table of attribution *estimates* (`attribute_routing`: a ``method`` column
    other than ``"exact"``, `estimate_method`) where measured effects are needed (the
    pre-registered verdicts, the dissociation)."""
    method = estimate_method(effects, what)
    if method is not None:
        raise ValueError(
            f"{what} needs measured effects (ablation_effects), but this table holds "
            f"attribution estimates (method {[method]}); verify them with "
            "RoutingAttribution.verify_top or run ablation_effects"
        )


def effect_rows(
    plan: Sequence[PlannedAblation],
    clean: dict,
    ablated: dict,
    metrics: Sequence[Metric],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """The rows of `ablation_effects` from `run_ablations`'s ``(clean, ablated)``: one per
    metric x planned ablation, in that order. A row depends only on its own ablation (the
    bootstrap draws the same prompts for every row), so a sub-plan gives the same rows."""
    n_bootstrap, confidence, seed = check_bootstrap(n_bootstrap, confidence, seed, "n_bootstrap")
    rows = []
    for metric in metrics:
        differences = ablated[metric] - clean[metric][None, :]
        rows += cell_rows(
            plan, differences, clean[metric], metric_name(metric), n_bootstrap, confidence, seed
        )
    return rows


def cell_rows(
    plan: Sequence[PlannedAblation],
    differences: np.ndarray,
    clean: np.ndarray,
    metric: str,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """One `ablation_effects` row per planned ablation from per-prompt effects
    ``differences [n_cells, n_prompts]`` (measured, or estimated by attribution) and the
    clean metric ``clean [n_prompts]``: the mean effect with its bootstrap interval."""
    mean, low, high = bootstrap_ci_rows(
        differences, n_bootstrap, confidence, seed, resamples_name="n_bootstrap"
    )
    base = clean.mean()
    return [
        {
            "router": cell.router,
            "group": cell.group,
            "layers": layers_text(cell.layers),
            "family": cell.family,
            "metric": metric,
            "clean": base,
            "ablated": base + differences[i].mean(),
            "effect": mean[i],
            "ci_low": low[i],
            "ci_high": high[i],
            "n_masked_routers": len(cell.ablation.masks),
            "skipped": ";".join(cell.skipped),
            "n_prompts": differences.shape[1],
            "confidence": confidence,
        }
        for i, cell in enumerate(plan)
    ]
