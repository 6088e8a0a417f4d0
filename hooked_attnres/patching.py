"""Activation patching of depth routing, with TransformerLens conventions.

Same argument order as ``transformer_lens.patching`` -- ``(model, corrupted_tokens,
clean_cache, patching_metric)`` -- the metric maps patched logits ``[batch, pos, d_vocab]``
to a scalar, the result is a tensor whose axes are listed in each docstring, a tqdm bar
shows progress, and the model must be in eval mode. Each patched run starts at the
patched layer from the corrupted run's cached depth state, so a sweep costs a fraction
of one full forward pass per cell.

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    result = get_act_patch_routing_weights(model, corrupted_tokens, clean_cache, metric)
    # result[r, l]: metric when router type r of layer l uses the clean routing weights
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres.interventions.checks import check_cached
from hooked_attnres.interventions.selection import check_routers
from hooked_attnres.model.depth import COMMIT_HOOKS, SUBLAYER_ROUTERS, RouterSite

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
# (corrupted activation, index, clean activation) -> patched activation, as in
# transformer_lens.patching.generic_activation_patch
PatchSetter = Callable[[Tensor, Any, Tensor], Tensor]


def _check(
    model: HookedAttnRes, corrupted_tokens: Tensor, routers: Union[str, Sequence[str]] = ()
) -> tuple[str, ...]:
    """Eval mode, a routed model, ``[batch, pos]`` tokens; returns the checked router types."""
    if model.training:
        raise ValueError("activation patching requires the model in eval mode (model.eval())")
    routers = check_routers(model, routers)
    if not isinstance(corrupted_tokens, Tensor):
        raise TypeError(
            f"corrupted_tokens must be a [batch, pos] tensor of token ids, got "
            f"{type(corrupted_tokens).__name__}"
        )
    if corrupted_tokens.ndim != 2:
        raise ValueError(
            f"corrupted_tokens must be [batch, pos], got shape {tuple(corrupted_tokens.shape)}"
        )
    return routers


def _check_cache(clean_cache, corrupted_tokens: Tensor, needed: Sequence[str], model=None) -> None:
    """The clean cache holds every hook a cell patches, with the corrupted run's [batch, pos]
    (and, given the model, its sources per router, ``d_model`` and routing layout)."""
    if model is not None:
        check_cached(
            model,
            clean_cache,
            needed,
            "the clean cache",
            batch_pos=tuple(corrupted_tokens.shape),  # type: ignore[arg-type]
        )
        return
    missing = [name for name in needed if name not in clean_cache]
    if missing:
        raise KeyError(
            f"the clean cache lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}; run "
            "model.run_with_cache(clean_tokens) without a names_filter that drops them"
        )
    clean_shape = tuple(clean_cache[needed[0]].shape[:2])  # every patched hook is [batch, pos, ...]
    if clean_shape != tuple(corrupted_tokens.shape):
        raise ValueError(
            f"the clean cache has [batch, pos] = {list(clean_shape)} ({needed[0]}) but "
            "corrupted_tokens "
            f"has {list(corrupted_tokens.shape)}; patch prompts pairwise, with equal lengths"
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
    cells: list[tuple[tuple, str, int, Any]],
    shape: tuple[int, ...],
    desc: str,
    patch_setter: PatchSetter = layer_pos_patch_setter,
) -> Tensor:
    """The one patching driver: ``cells`` are ``(result index, hook name, start sublayer,
    setter index)``; each cell runs the corrupted pass from its start sublayer (the
    sublayer whose hook it patches, from the corrupted run's cached depth state) with the
    hook's activation replaced by ``patch_setter(corrupted, setter index, clean)``.
    Returns a float32 ``shape`` tensor on the model's device (NaN where no cell was given)."""
    _check_cache(
        clean_cache, corrupted_tokens, list(dict.fromkeys(name for _, name, _, _ in cells)), model
    )
    states = model.depth_states(corrupted_tokens, sublayers=True)
    out = torch.full(shape, float("nan"), device=corrupted_tokens.device)
    for index, name, start, setter_index in tqdm(cells, desc=desc, dynamic_ncols=True):
        clean = clean_cache[name]

        def patch(activation, hook, clean=clean, setter_index=setter_index):
            return patch_setter(activation, setter_index, clean)

        with model.hooks(fwd_hooks=[(name, patch)]):
            logits = model.forward_from(states[start], start)
        out[index] = _scalar(metric(logits)).float().to(out.device)
    return out


def _site_rows(model: HookedAttnRes, routers: Sequence[str]) -> list[tuple[int, RouterSite]]:
    """``(row, site)`` of the result's router axis; the final router sits in column 0."""
    return [(row, site) for row, router in enumerate(routers) for site in model.sites(router)]


def _column(site: RouterSite) -> int:
    """The site's column on the result's layer axis (the final router, which has no layer,
    sits in column 0)."""
    return 0 if site.layer is None else site.layer


@torch.no_grad()
def get_act_patch_routing_weights(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
) -> Float[Tensor, "router layer"]:
    """Patch each router's clean routing weights (all positions) into the corrupted run.

    Returns:
        ``[len(routers), n_layers]``; for ``"final_res"`` only column 0 is filled (the rest
        NaN).
    """
    routers = _check(model, corrupted_tokens, routers)
    cells = [
        ((row, _column(site)), site.hook("weights"), site.sublayer, None)
        for row, site in _site_rows(model, routers)
    ]
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        cells,
        (len(routers), model.cfg.n_layers),
        "patch routing weights",
    )


@torch.no_grad()
def get_act_patch_routing_weights_by_pos(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
) -> Float[Tensor, "router layer pos"]:
    """Patch the clean routing weights of one router at one position.

    Returns:
        ``[len(routers), n_layers, pos]`` (final router in layer column 0).
    """
    routers = _check(model, corrupted_tokens, routers)
    n_pos = corrupted_tokens.shape[-1]
    cells = [
        ((row, _column(site), pos), site.hook("weights"), site.sublayer, pos)
        for row, site in _site_rows(model, routers)
        for pos in range(n_pos)
    ]
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        cells,
        (len(routers), model.cfg.n_layers, n_pos),
        "patch routing weights by pos",
    )


@torch.no_grad()
def get_act_patch_committed_blocks_by_pos(
    model: HookedAttnRes,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    sublayer: str = "mlp",
) -> Float[Tensor, "layer pos"]:
    """Patch the clean committed block of each layer at one position, for every later
    router that reads it.

    Args:
        sublayer: ``"mlp"`` patches the blocks committed after a layer's MLP
            (``blocks.{l}.hook_committed_block``: every layout that commits blocks);
            ``"attn"`` those committed after its attention (``blocks.{l}.hook_committed_mid``:
            only where every sublayer commits, the ``full`` layout and ``attnres_mode="full"``).

    Returns:
        ``[n_layers, pos]``; rows of layers that commit no block there are NaN.
    """
    _check(model, corrupted_tokens)
    if sublayer not in COMMIT_HOOKS:
        raise ValueError(f"sublayer must be 'mlp' or 'attn', got {sublayer!r}")
    layout = model.routing_layout
    found = {layer: layout.commit_hook(layer, sublayer) for layer in range(model.cfg.n_layers)}
    names = {layer: name for layer, name in found.items() if name is not None}
    if not names:
        raise ValueError(
            f"no layer of this {model.cfg.attnres_layout!r} model commits a block after its "
            f"{sublayer} sublayer (blocks.*.{COMMIT_HOOKS[sublayer]} does not exist)"
        )
    n_pos = corrupted_tokens.shape[-1]
    # committed at the end of the sublayer: the run starts at that sublayer
    cells = [
        ((layer, pos), name, 2 * layer + (sublayer == "mlp"), pos)
        for layer, name in names.items()
        for pos in range(n_pos)
    ]
    return _patch_cells(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        cells,
        (model.cfg.n_layers, n_pos),
        f"patch committed blocks ({sublayer}) by pos",
    )
