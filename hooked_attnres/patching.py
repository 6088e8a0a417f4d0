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

from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres.interventions.selection import check_routers
from hooked_attnres.model.depth import SUBLAYER_ROUTERS, router_hook_prefix

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]


def _check(model, corrupted_tokens: Tensor, routers: Union[str, Sequence[str]] = ()) -> tuple[str, ...]:
    """Eval mode, a routed model, ``[batch, pos]`` tokens; returns the checked router types."""
    if model.training:
        raise ValueError("activation patching requires the model in eval mode (model.eval())")
    routers = check_routers(model, routers)
    if corrupted_tokens.ndim != 2:
        raise ValueError(f"corrupted_tokens must be [batch, pos], got shape {tuple(corrupted_tokens.shape)}")
    return routers


def _check_cache(clean_cache, corrupted_tokens: Tensor, needed: Sequence[str]) -> None:
    """The clean cache holds every hook a cell patches, with the corrupted run's [batch, pos]."""
    missing = [name for name in needed if name not in clean_cache]
    if missing:
        raise KeyError(
            f"the clean cache lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}; run "
            "model.run_with_cache(clean_tokens) without a names_filter that drops them"
        )
    clean_shape = tuple(clean_cache[needed[0]].shape[:2])  # every patched hook is [batch, pos, ...]
    if clean_shape != tuple(corrupted_tokens.shape):
        raise ValueError(
            f"the clean cache has [batch, pos] = {list(clean_shape)} ({needed[0]}) but corrupted_tokens "
            f"has {list(corrupted_tokens.shape)}; patch prompts pairwise, with equal lengths"
        )


def _scalar(value) -> Tensor:
    value = torch.as_tensor(value)
    if value.ndim != 0:
        raise ValueError(f"patching_metric must return a scalar, got shape {tuple(value.shape)}")
    return value.detach()


def _run_cells(model, corrupted_tokens, cells, metric: Metric, shape, desc: str) -> Tensor:
    """``cells``: ``(index, start_sublayer, hook_name, hook_fn)``; returns a ``shape`` tensor
    (NaN where no cell was given). Each patched run starts from the corrupted run's state
    at the sublayer of its hook (``2 * layer``: attention, ``2 * layer + 1``: MLP)."""
    states = model.depth_states(corrupted_tokens, sublayers=True)
    out = torch.full(shape, float("nan"))
    for index, start, name, fn in tqdm(cells, desc=desc, dynamic_ncols=True):
        with model.hooks(fwd_hooks=[(name, fn)]):
            logits = model.forward_from(states[start], start)
        out[index] = _scalar(metric(logits)).float().cpu()
    return out


def _router_sublayer(model, layer: Optional[int], router: str) -> int:
    """The sublayer whose router this is (``2 * n_layers`` for the final router)."""
    return 2 * model.cfg.n_layers if layer is None else 2 * layer + (router == "mlp_res")


def _router_rows(model, routers: Sequence[str]):
    """``(row, layer_or_None, router, hook_weights name)`` for the result's router axis."""
    for row, router in enumerate(routers):
        layers = [None] if router == "final_res" else range(model.cfg.n_layers)
        for layer in layers:
            yield row, layer, router, f"{router_hook_prefix(layer, router)}.hook_weights"


@torch.no_grad()
def get_act_patch_routing_weights(
    model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
) -> Float[Tensor, "router layer"]:
    """Patch each router's clean routing weights (all positions) into the corrupted run.

    Returns:
        ``[len(routers), n_layers]``; for ``"final_res"`` only column 0 is filled (the rest
        NaN).
    """
    routers = _check(model, corrupted_tokens, routers)
    rows = list(_router_rows(model, routers))
    _check_cache(clean_cache, corrupted_tokens, [name for *_, name in rows])
    cells = []
    for row, layer, router, name in rows:
        clean = clean_cache[name]

        def patch(weights, hook, clean=clean):
            return clean.to(weights.device, weights.dtype).clone()

        cells.append(((row, 0 if layer is None else layer), _router_sublayer(model, layer, router), name, patch))
    return _run_cells(model, corrupted_tokens, cells, patching_metric,
                      (len(routers), model.cfg.n_layers), "patch routing weights")


@torch.no_grad()
def get_act_patch_routing_weights_by_pos(
    model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, patching_metric: Metric,
    routers: Sequence[str] = SUBLAYER_ROUTERS,
) -> Float[Tensor, "router layer pos"]:
    """Patch the clean routing weights of one router at one position.

    Returns:
        ``[len(routers), n_layers, pos]`` (final router in layer column 0).
    """
    routers = _check(model, corrupted_tokens, routers)
    rows = list(_router_rows(model, routers))
    _check_cache(clean_cache, corrupted_tokens, [name for *_, name in rows])
    n_pos = corrupted_tokens.shape[-1]
    cells = []
    for row, layer, router, name in rows:
        clean = clean_cache[name]
        for pos in range(n_pos):
            def patch(weights, hook, clean=clean, pos=pos):
                weights = weights.clone()
                weights[:, pos] = clean[:, pos].to(weights.device, weights.dtype)
                return weights

            cells.append(((row, 0 if layer is None else layer, pos), _router_sublayer(model, layer, router),
                          name, patch))
    return _run_cells(model, corrupted_tokens, cells, patching_metric,
                      (len(routers), model.cfg.n_layers, n_pos), "patch routing weights by pos")


@torch.no_grad()
def get_act_patch_committed_blocks_by_pos(
    model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, patching_metric: Metric,
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
    hook = {"mlp": "hook_committed_block", "attn": "hook_committed_mid"}.get(sublayer)
    if hook is None:
        raise ValueError(f"sublayer must be 'mlp' or 'attn', got {sublayer!r}")
    names = {layer: f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)}
    names = {layer: name for layer, name in names.items() if name in model.hook_dict}
    if not names:
        raise ValueError(
            f"no layer of this {model.cfg.attnres_layout!r} model commits a block after its "
            f"{sublayer} sublayer (blocks.*.{hook} does not exist)"
        )
    _check_cache(clean_cache, corrupted_tokens, list(names.values()))
    n_pos = corrupted_tokens.shape[-1]
    cells = []
    for layer, name in names.items():
        clean = clean_cache[name]
        for pos in range(n_pos):
            def patch(block, hook, clean=clean, pos=pos):
                block = block.clone()
                block[:, pos] = clean[:, pos].to(block.device, block.dtype)
                return block

            # committed at the end of the sublayer: the run starts at that sublayer
            cells.append(((layer, pos), 2 * layer + (sublayer == "mlp"), name, patch))
    return _run_cells(model, corrupted_tokens, cells, patching_metric,
                      (model.cfg.n_layers, n_pos), f"patch committed blocks ({sublayer}) by pos")
