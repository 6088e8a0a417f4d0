"""Activation patching of depth routing, with TransformerLens conventions.

Same argument order as ``transformer_lens.patching`` -- ``(model, corrupted_tokens,
clean_cache, patching_metric)`` -- the metric maps patched logits ``[batch, pos, d_vocab]``
(float32 in a bfloat16 / float16 model: `hooked_attnres._precision.widened`) to a scalar,
the result is a tensor whose axes are listed in each docstring, a tqdm bar shows progress,
and the model must be in eval mode. Each patched run starts at the patched layer from the
corrupted run's cached depth state, so a sweep costs a fraction of one full forward pass
per cell.

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    result = get_act_patch_routing_weights(model, corrupted_tokens, clean_cache, metric)
    # result[r, l]: metric when router type r of layer l uses the clean routing weights

`get_act_patch_depth_state(_by_pos)` patch the whole depth state entering a layer (every
source routers read), the replacement for TransformerLens's ``get_act_patch_resid_pre`` in
routed layouts, where ``hook_resid_pre`` is only the current source. `router_patch_index`
makes TransformerLens's own ``generic_activation_patch`` reach router hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres._precision import widened
from hooked_attnres._tl import get_act_name
from hooked_attnres._validation import require_choice, require_selection
from hooked_attnres.interventions.checks import check_cache_mask, check_cached, require_eval
from hooked_attnres.interventions.selection import check_routers, unread_commit
from hooked_attnres.model.cache import require_cached, state_source_names
from hooked_attnres.model.depth import (
    COMMIT_HOOKS,
    SUBLAYER_ROUTERS,
    DepthState,
    RouterSite,
    sublayer_index,
)
from hooked_attnres.model.norms import is_observed

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

# the public names (docs/analysis.md); Metric, PatchSetter (type aliases) and
# layer_pos_patch_setter (the sweeps' default setter; the docs use TransformerLens's own) are
# not exported
__all__ = [
    "DEPTH_STATE_SUBLAYERS",
    "depth_state_name",
    "get_act_patch_committed_blocks_by_pos",
    "get_act_patch_depth_state",
    "get_act_patch_depth_state_by_pos",
    "get_act_patch_routing_weights",
    "get_act_patch_routing_weights_by_pos",
    "router_patch_index",
]

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
# (corrupted activation, index, clean activation) -> patched activation, as in
# transformer_lens.patching.generic_activation_patch
PatchSetter = Callable[[Tensor, Any, Tensor], Tensor]


def _check_run(model: HookedAttnRes, corrupted_tokens: Tensor) -> None:
    """Eval mode and ``[batch, pos]`` tokens."""
    require_eval(model, "activation patching")
    if not isinstance(corrupted_tokens, Tensor):
        raise TypeError(
            f"corrupted_tokens must be a [batch, pos] tensor of token ids, got "
            f"{type(corrupted_tokens).__name__}"
        )
    if corrupted_tokens.ndim != 2:
        raise ValueError(
            f"corrupted_tokens must be [batch, pos], got shape {tuple(corrupted_tokens.shape)}"
        )


def _check(
    model: HookedAttnRes,
    corrupted_tokens: Tensor,
    routers: Union[None, str, Sequence[str]] = None,
) -> tuple[str, ...]:
    """Eval mode, a routed model, ``[batch, pos]`` tokens; returns the checked router types."""
    _check_run(model, corrupted_tokens)
    return check_routers(model, routers)


def _check_cache(
    model: HookedAttnRes,
    clean_cache,
    corrupted_tokens: Tensor,
    needed: Sequence[str],
    attention_mask: Optional[Tensor] = None,
) -> None:
    """The clean cache holds every hook a cell patches, with the corrupted run's
    ``[batch, pos]``, this model's sources per router and ``d_model``, (an
    ``ActivationCache``) its routing layout, and (a cache of `run_with_cache`, which
    records it) the sweep's ``attention_mask`` (`check_cache_mask`)."""
    check_cached(
        model,
        clean_cache,
        needed,
        "the clean cache",
        batch_pos=tuple(corrupted_tokens.shape),  # type: ignore[arg-type]
    )
    check_cache_mask(clean_cache, attention_mask, "the clean cache", "the sweep")


def _check_metric(metric: Any) -> None:
    """Refuse a ``patching_metric`` that is not callable (a metric's name, ``"logit_diff"``,
    as `ablation_effects` takes): ``TypeError`` before any pass (it failed with "'str'
    object is not callable" after the corrupted run)."""
    if not callable(metric):
        raise TypeError(
            f"patching_metric must be a function of the logits [batch, pos, d_vocab] "
            f"returning a scalar, got the {type(metric).__name__} {metric!r:.80} (a metric's "
            "name is taken by ablation_effects, not here); e.g. lambda logits: "
            "batch.logit_diff(logits).mean() for a TaskBatch batch"
        )


def _scalar(value) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (Tensor, int, float)):
        raise TypeError(
            f"patching_metric must return a scalar tensor or a number, got {type(value).__name__}"
        )
    value = torch.as_tensor(value)
    if value.ndim != 0:
        raise ValueError(f"patching_metric must return a scalar, got shape {tuple(value.shape)}")
    return value.detach()


def layer_pos_patch_setter(corrupted: Tensor, index: Any, clean: Tensor) -> Tensor:
    """Patch the whole activation (``index`` is ``None``) or one position (``index`` an int
    on axis 1 of a ``[batch, pos, ...]`` activation)."""
    clean = clean.to(corrupted.device, corrupted.dtype)
    if index is None:
        return clean.clone()
    patched = corrupted.clone()
    patched[:, index] = clean[:, index]
    return patched


def _patch_cells(
    model: HookedAttnRes,
    corrupted_tokens: Tensor,
    clean_cache,
    metric: Metric,
    targets: list[tuple[tuple, str, int]],
    shape: tuple[int, ...],
    desc: str,
    by_pos: bool,
    patch_setter: PatchSetter = layer_pos_patch_setter,
    patch_state: bool = False,
    attention_mask: Optional[Tensor] = None,
    states_read: Optional[dict[str, list[str]]] = None,
) -> Tensor:
    """The one patching driver: ``targets`` are ``(result index, hook name, start
    sublayer)``; each gives one cell (``by_pos=False``: setter index ``None``, the whole
    activation) or one cell per position (``by_pos=True``: the position is appended to
    the result index, to ``shape`` and to ``desc`` as ``" by pos"``, and is the setter
    index). Each cell runs the corrupted pass from its start sublayer (the sublayer whose
    hook it patches, from the corrupted run's cached depth state) with the hook's
    activation replaced by ``patch_setter(corrupted, setter index, clean)``.

    With ``patch_state=True`` no hook is attached: ``hook name`` is the clean-cache entry
    holding the depth state entering the start sublayer (``hook_sources``, stacked on
    axis -2, or one ``[batch, pos, d_model]`` tensor in layout ``"none"``), and the run
    starts from the corrupted state with every source replaced by
    ``patch_setter(corrupted source, setter index, clean source)``; ``states_read`` maps
    such a ``hook name`` to the cache entries that hold the state's sources as stored
    (`_stored_state_names`), which are read, stacked, instead of it where given.

    ``attention_mask`` (``[batch, pos]``, 1 at real tokens) is passed to the corrupted
    run and to every patched run (padded prompts; the clean cache must come from a run
    with the same mask: a cache of `run_with_cache` records its mask, and another one is
    refused).

    Returns a float32 ``shape`` tensor on the model's device (NaN where no cell was given;
    ``[*shape, pos]`` with ``by_pos``)."""
    cells: list[tuple[tuple, str, int, Any]]
    if by_pos:
        n_pos = corrupted_tokens.shape[-1]
        cells = [
            ((*index, pos), name, start, pos)
            for index, name, start in targets
            for pos in range(n_pos)
        ]
        shape, desc = (*shape, n_pos), f"{desc} by pos"
    else:
        cells = [(index, name, start, None) for index, name, start in targets]
    _check_metric(metric)
    mask = model._validate_attention_mask(
        attention_mask, tuple(corrupted_tokens.shape), corrupted_tokens.device
    )
    names = list(dict.fromkeys(name for _, name, _, _ in cells))
    states_read = states_read or {}
    read = [part for name in names for part in states_read.get(name, [name])]
    _check_cache(model, clean_cache, corrupted_tokens, read, mask)
    stacked = {
        name: torch.stack([clean_cache[part] for part in parts], dim=-2)
        for name, parts in states_read.items()
        if name in names
    }
    states = model.depth_states(corrupted_tokens, sublayers=True, attention_mask=attention_mask)
    out = torch.full(shape, float("nan"), device=model.W_E.device)
    for index, name, start, setter_index in tqdm(cells, desc=desc, dynamic_ncols=True):
        clean = stacked[name] if name in stacked else clean_cache[name]
        if patch_state:
            state = _patched_state(states[start], clean, setter_index, patch_setter, name)
            entry = _watched_entry(model, start)
            if entry is None:
                logits = model.forward_from(state, start, attention_mask=attention_mask)
            else:
                # the clean current source is read after the hooks there ran in the clean
                # run: it replaces what they make of the corrupted one, after them (as
                # TransformerLens's resid_pre patching does), not before them, where
                # they would edit it a second time (audit 163)
                state = dataclasses.replace(state, current=states[start].current)
                current = clean.unbind(dim=-2)[-1] if clean.ndim == 4 else clean

                def patch_current(activation, hook, current=current, setter_index=setter_index):
                    return patch_setter(activation, setter_index, current)

                patch_current._state_patch = True  # type: ignore[attr-defined]
                with model.hooks(fwd_hooks=[(entry, patch_current)]):
                    logits = model.forward_from(state, start, attention_mask=attention_mask)
        else:

            def patch(activation, hook, clean=clean, setter_index=setter_index):
                return patch_setter(activation, setter_index, clean)

            with model.hooks(fwd_hooks=[(name, patch)]):
                logits = model.forward_from(states[start], start, attention_mask=attention_mask)
        # the metric is given float32 logits in a bfloat16 / float16 model: its own arithmetic
        # on them (a logit difference, a batch mean) rounded each cell to 8 bits (1.8e-3 on
        # 0.24, a tiny cumulative model)
        out[index] = _scalar(metric(widened(logits))).float().to(out.device)
    return out


def _watched_entry(model: HookedAttnRes, sublayer: int) -> Optional[str]:
    """``blocks.{l}.hook_resid_pre`` where a pass started at ``sublayer`` (an attention
    sublayer, ``2 * l``) runs it on the state's current source before anything reads it,
    and a hook watches it (`is_observed`); ``None`` otherwise."""
    layer, is_mlp = divmod(sublayer, 2)
    if is_mlp or layer >= model.cfg.n_layers:
        return None
    point = model.blocks[layer].hook_resid_pre
    return point.name if is_observed(point) else None


def _patched_state(
    state: DepthState, clean: Tensor, setter_index: Any, patch_setter: PatchSetter, name: str
) -> DepthState:
    """``state`` with every source patched from ``clean`` (the stacked clean state)."""
    clean_sources = list(clean.unbind(dim=-2)) if clean.ndim == 4 else [clean]
    if len(clean_sources) != state.n_sources:
        raise ValueError(
            f"{name} holds {len(clean_sources)} sources but the depth state there has "
            f"{state.n_sources}; the clean cache must come from the same model"
        )
    sources = [
        patch_setter(source, setter_index, clean_source)
        for source, clean_source in zip(state.sources, clean_sources, strict=True)
    ]
    # replace keeps the state's record (the sublayer it enters, the padding of its pass)
    return dataclasses.replace(state, blocks=sources[:-1], current=sources[-1])


def _site_rows(model: HookedAttnRes, routers: Sequence[str]) -> list[tuple[int, RouterSite]]:
    """``(row, site)`` of the result's router axis; the final router sits in column 0."""
    return [(row, site) for row, router in enumerate(routers) for site in model.sites(router)]


def _column(site: RouterSite) -> int:
    """The site's column on the result's layer axis (the final router, which has no layer,
    sits in column 0)."""
    return 0 if site.layer is None else site.layer


def _patch_routing_weights(
    model: HookedAttnRes,
    corrupted_tokens: Tensor,
    clean_cache,
    patching_metric: Metric,
    routers: Sequence[str],
    attention_mask: Optional[Tensor],
    by_pos: bool,
) -> Tensor:
    """`get_act_patch_routing_weights` (``[len(routers), n_layers]``) or, with ``by_pos``,
    `get_act_patch_routing_weights_by_pos` (``[len(routers), n_layers, pos]``): each
    router's ``hook_weights`` patched from the clean cache, the final router in layer
    column 0."""
    routers = _check(model, corrupted_tokens, routers)
    targets = [
        ((row, _column(site)), site.hook("weights"), site.sublayer)
        for row, site in _site_rows(model, routers)
    ]
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        targets,
        (len(routers), model.cfg.n_layers),
        "patch routing weights",
        by_pos,
        attention_mask=attention_mask,
    )


@torch.no_grad()
def get_act_patch_routing_weights(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "router layer"]:
    """Patch each router's clean routing weights (all positions) into the corrupted run.

    Args:
        routers: router types, one row each (a string is one router).
        attention_mask: ``[batch, pos]``, 1 at real tokens and 0 at padding (padded
            prompts; left padding needs it), used by the corrupted run and every patched
            run. The clean cache must come from a run with the same mask
            (``model.run_with_cache(clean_tokens, attention_mask=mask)``; a cache made with
            another mask, or without one where this one marks padding, is refused: the
            cache records its ``attention_mask``). Without it the tokens are taken as
            unpadded, as in ``model(tokens)``.

    Returns:
        ``[len(routers), n_layers]``; for ``"final_res"`` only column 0 is filled (the rest
        NaN).
    """
    return _patch_routing_weights(
        model, corrupted_tokens, clean_cache, patching_metric, routers, attention_mask, by_pos=False
    )


@torch.no_grad()
def get_act_patch_routing_weights_by_pos(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "router layer pos"]:
    """Patch the clean routing weights of one router at one position.

    Args:
        routers: as in `get_act_patch_routing_weights`.
        attention_mask: as in `get_act_patch_routing_weights`.

    Returns:
        ``[len(routers), n_layers, pos]`` (final router in layer column 0).
    """
    return _patch_routing_weights(
        model, corrupted_tokens, clean_cache, patching_metric, routers, attention_mask, by_pos=True
    )


@torch.no_grad()
def get_act_patch_committed_blocks_by_pos(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    sublayer: str = "mlp",
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "layer pos"]:
    """Patch the clean committed block of each layer at one position, for every later
    router that reads it.

    Args:
        sublayer: ``"mlp"`` patches the blocks committed after a layer's MLP
            (``blocks.{l}.hook_committed_block``: every layout that commits blocks);
            ``"attn"`` those committed after its attention (``blocks.{l}.hook_committed_mid``:
            only where every sublayer commits, the ``full`` layout and ``attnres_mode="full"``).
        attention_mask: as in `get_act_patch_routing_weights`.

    Returns:
        ``[n_layers, pos]``; rows of layers that commit no block there are NaN, and so is
        the row of a block no router reads (the cumulative layout's block committed after
        the last layer, a snapshot of the final stream: patching it changes nothing, so
        its row read the unpatched metric, as if the block did not matter; patch
        ``hook_resid_post`` of the last layer for the final stream).
    """
    _check(model, corrupted_tokens)
    sublayer = require_choice("sublayer", sublayer, tuple(COMMIT_HOOKS))
    layout = model.routing_layout
    labels = {layer: layout.committed_label(layer, sublayer) for layer in range(model.cfg.n_layers)}
    names = {  # the commit hooks of the blocks some router reads
        layer: layout.commit_hooks()[label]
        for layer, label in labels.items()
        if label is not None and layout.commit_readers(label)
    }
    if not names:
        unread = any(label is not None for label in labels.values())
        raise ValueError(
            f"no layer of this {model.cfg.attnres_layout!r} model commits a block after its "
            f"{sublayer} sublayer that a router reads ("
            + (
                f"its only one is committed after the last layer: {unread_commit(model)})"
                if unread
                else f"there is no blocks.*.{COMMIT_HOOKS[sublayer]}; pass sublayer='mlp' "
                "for the blocks committed after the MLP sublayers)"
            )
        )
    # committed at the end of the sublayer: the run starts at that sublayer
    targets = [((layer,), name, sublayer_index(layer, sublayer)) for layer, name in names.items()]
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        targets,
        (model.cfg.n_layers,),
        f"patch committed blocks ({sublayer})",
        by_pos=True,
        attention_mask=attention_mask,
    )


# --- depth-state patching: the replacement for residual patching in routed layouts ---------
DEPTH_STATE_SUBLAYERS = ("attn", "mlp")


def depth_state_name(model: HookedAttnRes, layer: int, sublayer: str = "attn") -> str:
    """The clean-cache entry that holds the depth state entering ``layer``'s attention
    (``sublayer="attn"``) or MLP (``"mlp"``) router: its ``hook_sources`` (every source,
    stacked on axis -2), or ``hook_resid_pre`` / ``hook_resid_mid`` in layout ``"none"``.
    ``layer`` is read as `RoutingLayout.layer_index` reads it in every layout (a negative one
    counts from the end; a bool, a float or one out of range raises ``ValueError``).
    ``hook_sources`` is the router's own copy, the state only where no hook edited it:
    the depth-state sweeps read the stored sources where the cache has them
    (`_stored_state_names`)."""
    sublayer = require_choice("sublayer", sublayer, DEPTH_STATE_SUBLAYERS)
    layer = model.routing_layout.layer_index(layer)  # every layout alike ("none" had no check)
    if not model.routing_layout.has_routers:
        return get_act_name("resid_pre" if sublayer == "attn" else "resid_mid", layer)
    return model.site(layer, SUBLAYER_ROUTERS[sublayer == "mlp"]).hook("sources")


def _patch_depth_state(
    model: HookedAttnRes,
    corrupted_tokens: Tensor,
    clean_cache,
    patching_metric: Metric,
    sublayer: str,
    attention_mask: Optional[Tensor],
    by_pos: bool,
) -> Tensor:
    """`get_act_patch_depth_state` (``[n_layers]``) or, with ``by_pos``,
    `get_act_patch_depth_state_by_pos` (``[n_layers, pos]``): the clean depth state
    entering each layer's ``sublayer`` router (`depth_state_name`) patched in."""
    _check_run(model, corrupted_tokens)
    names = {layer: depth_state_name(model, layer, sublayer) for layer in range(model.cfg.n_layers)}
    targets = [((layer,), names[layer], sublayer_index(layer, sublayer)) for layer in names]
    states_read = {
        name: _stored_state_names(model, clean_cache, name, start) for _, name, start in targets
    }
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        targets,
        (model.cfg.n_layers,),
        f"patch depth state ({sublayer})",
        by_pos,
        patch_state=True,
        attention_mask=attention_mask,
        states_read={name: parts for name, parts in states_read.items() if parts is not None},
    )


def _stored_state_names(
    model: HookedAttnRes, clean_cache, name: str, sublayer: int
) -> Optional[list[str]]:
    """The cache entries to read the clean depth state entering ``sublayer`` from: the
    hooks that hold its sources as stored (`state_source_names`: ``hook_embed``, commit
    hooks, ``hook_resid_*``), what every router from there on reads, where the cache has
    them all; ``None`` (read the router's ``hook_sources``, ``name``) in layout
    ``"none"`` (its ``hook_resid_*`` is the state) and for a cache of a pass with no hook
    but the caching ones (``other_hooks_attached`` False: ``hook_sources`` is then the
    state, bit for bit). A router's ``hook_sources`` is its own copy: a hook of the run on
    it (``patch_sources``, or any hook on that point) edits what that router mixes, not
    the state, so read as the state the edit reached every later router (audit 163). A
    cache without the stored hooks of a pass that had other hooks (or that does not
    record it) is refused (``KeyError`` naming them)."""
    if not model.routing_layout.has_routers:
        return None
    stored = state_source_names(model, sublayer)
    if all(part in clean_cache for part in stored):
        return stored
    if _other_hooks_attached(clean_cache) is False:
        return None
    require_cached(
        clean_cache,
        stored,
        f"the clean cache (its {name} is that router's own copy of its sources, which a hook "
        "of the run that made the cache may have edited, e.g. patch_sources, so it is not "
        "the depth state later routers read; other hooks than the caching ones were "
        "attached in that pass, or the cache does not record it; the state is read from "
        "the hooks that store each source)",
    )
    return stored  # not reached: require_cached raised


def _other_hooks_attached(cache) -> Optional[bool]:
    """``other_hooks_attached`` of a cache (`RunCacheDict`), of its ``cache_dict``, or
    ``None`` (unknown)."""
    found = getattr(cache, "other_hooks_attached", None)
    if found is None:
        found = getattr(getattr(cache, "cache_dict", None), "other_hooks_attached", None)
    return found


@torch.no_grad()
def get_act_patch_depth_state(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    sublayer: str = "attn",
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, " layer"]:
    """Patch the whole clean depth state entering each layer (all positions) into the
    corrupted run: every source that the routers at and after that point read (the
    committed blocks, the embedding source and the current source), not only
    ``hook_resid_pre``. The replacement for ``get_act_patch_resid_pre`` in routed layouts
    (in layout ``"none"`` it is the same thing).

    Args:
        sublayer: ``"attn"``: the state entering the layer's attention router (TransformerLens
            ``resid_pre``); ``"mlp"``: the state entering its MLP router (``resid_mid``).
        attention_mask: as in `get_act_patch_routing_weights`.

    Returns:
        ``[n_layers]``. Every cell equals the clean metric (the rest of the run only sees
        the state), which makes it a check on a normalised metric (1.0 everywhere).
    """
    return _patch_depth_state(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        sublayer,
        attention_mask,
        by_pos=False,
    )


@torch.no_grad()
def get_act_patch_depth_state_by_pos(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    sublayer: str = "attn",
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "layer pos"]:
    """Patch the clean depth state entering each layer at one position: every source the
    routers at and after that point read, at that position (the routed-layout meaning of
    ``get_act_patch_resid_pre``, which patches only the current source).

    Args:
        sublayer: ``"attn"`` (state entering the attention router) or ``"mlp"``.
        attention_mask: as in `get_act_patch_routing_weights`.

    Returns:
        ``[n_layers, pos]``.
    """
    return _patch_depth_state(
        model, corrupted_tokens, clean_cache, patching_metric, sublayer, attention_mask, by_pos=True
    )


# --- TransformerLens's generic_activation_patch over router hooks ------------------------
def router_patch_index(
    model: HookedAttnRes,
    router: str = "attn_res",
    hook: str = "weights",
    index_axis_names: Sequence[str] = ("layer", "pos"),
    n_pos: Union[int, None] = None,
) -> dict[str, Any]:
    """Arguments that make ``transformer_lens.patching.generic_activation_patch`` patch a
    router hook at every layer.

    ``generic_activation_patch`` names the hook of a cell ``get_act_name(activation_name,
    layer)``; router hooks answer to those names through their aliases
    (`RouterSite.alias`: ``get_act_name("attn_res_weights", 3) ==
    "blocks.3.hook_attn_res_weights"``, the hook ``blocks.3.attn_res.hook_weights``)::

        from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter
        result = generic_activation_patch(model, corrupted, clean_cache, metric,
                                          layer_pos_patch_setter,
                                          **router_patch_index(model, "mlp_res", "weights"))
        # result[l, p] == get_act_patch_routing_weights_by_pos(...)[mlp row, l, p]

    ``generic_activation_patch`` runs ``model(corrupted_tokens)`` without an
    ``attention_mask``: for left-padded prompts the padding is attended and the rotary
    positions shift, and the cells are off (0.45 on cells up to 0.57, a 3-layer kimi model,
    float64). Its hooks therefore raise ``ValueError`` when their clean cache records left
    padding (`hooked_attnres.model.hooked_root.padding_checked`; until audit 199 there was
    no error). Right padding is harmless for a metric that reads real tokens (causal
    attention). For left-padded prompts use `get_act_patch_routing_weights_by_pos` (and
    the other sweeps here), which take ``attention_mask``.

    Args:
        router: ``"attn_res"`` or ``"mlp_res"`` (the final router has no layer axis).
        hook: ``"sources"``, ``"scale"``, ``"logits"``, ``"weights"`` or ``"out"``.
        index_axis_names: axes TransformerLens knows (``"layer"``, ``"pos"``; each once,
            ``"layer"`` first); with
            ``"source"`` (its extent varies by layer) an ``index_df`` of the valid
            ``(layer[, pos], source)`` rows is returned instead (needs ``n_pos`` if
            ``"pos"`` is one of the axes) and the result is flattened, one value per row.

    Returns:
        ``{"activation_name": ..., "index_axis_names": ...}`` or
        ``{"activation_name": ..., "index_df": ...}``, to pass as keyword arguments.
    """
    import pandas as pd

    router = require_choice(
        "router",
        router,
        SUBLAYER_ROUTERS,
        why="generic_activation_patch indexes by layer; the final router has none",
    )
    check_routers(model, router)
    name = RouterSite.activation_name(router, hook)
    axes = tuple(index_axis_names)
    require_selection("index_axis_names", axes, why="the result would have no axis")
    if axes[0] != "layer":
        raise ValueError(f"index_axis_names must start with 'layer', got {axes}")
    unknown = set(axes) - {"layer", "pos", "source"}
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; use 'layer', 'pos' and 'source'")
    if "source" not in axes:
        return {"activation_name": name, "index_axis_names": axes}
    if "pos" in axes and n_pos is None:
        raise ValueError("an index with 'pos' and 'source' axes needs n_pos (the sequence length)")
    rows = []
    for site in model.sites(router):
        n_sources = model.routing_layout.n_sources(site)
        positions: Sequence[Optional[int]] = [None]
        if "pos" in axes:
            assert n_pos is not None
            positions = range(n_pos)
        for pos in positions:
            for source in range(n_sources):
                values = {"layer": site.layer, "pos": pos, "source": source}
                rows.append([values[axis] for axis in axes])
    return {"activation_name": name, "index_df": pd.DataFrame(rows, columns=list(axes))}
