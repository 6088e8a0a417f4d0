"""Routing interventions as TransformerLens hook lists.

Every function returns ``[(hook_name, hook_fn), ...]`` for ``model.run_with_hooks``,
``model.hooks`` or ``model.run_with_cache``::

    hooks = mask_sources(model, "embedding", routers="mlp_res", layers="early")
    ablated_logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_attnres.interventions.selection import (
    LayerSpec,
    SourceSpec,
    describe,
    iter_selected,
    position_index,
    resolve_routers,
)
from hooked_attnres.model.depth import router_hook_prefix

Hooks = list[tuple[str, Callable]]


def _positions_mask(positions, n_pos: int, device) -> Optional[Tensor]:
    """``[pos]`` bool mask of the positions an edit applies to (``None``: all)."""
    if positions is None:
        return None
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    mask[position_index(positions, n_pos, device)] = True
    return mask


def mask_logits(logits: Float[Tensor, "batch pos n_sources"], where: Bool[Tensor, "... n_sources"],
                what: str) -> Float[Tensor, "batch pos n_sources"]:
    """``logits`` with ``-inf`` where ``where`` (broadcast) is true: mask-and-renormalise.

    Raises ``ValueError("{what} masks every source at some position ...")`` if a position
    is left with no finite logit, counting ``-inf`` already there (e.g. from another hook
    on the same router), where the softmax would return NaN.
    """
    masked = logits.masked_fill(where, float("-inf"))
    if torch.isneginf(masked).all(dim=-1).any():
        raise ValueError(f"{what} masks every source at some position; the renormalised weights "
                         "would be NaN")
    return masked


def mask_sources(model, sources: SourceSpec, routers=None, layers: LayerSpec = None,
                 bands: Optional[dict] = None, positions=None) -> Hooks:
    """Mask-and-renormalise ablation: the selected sources get weight 0 and the others
    are renormalised to sum to 1 (their logits are set to ``-inf`` before the softmax,
    so ``hook_weights`` shows the renormalised weights).

    Args:
        sources: families, labels and/or indices (see `hooked_attnres.interventions.selection`).
        routers, layers, bands: which routers (default: every attention and MLP router).
        positions: only ablate at these positions (default: all).

    Raises:
        ValueError: if the selection would mask every source of some router (the
            renormalisation is undefined there), naming the router.
    """
    hooks: Hooks = []
    for layer, router, indices in iter_selected(model, sources, routers, layers, bands):
        n_sources = model.routing_layout.n_sources(layer, router)
        if len(indices) == n_sources:
            labels = model.source_labels(layer, router)
            raise ValueError(
                f"masking {sources!r} at {describe(layer, router)} would mask all {n_sources} "
                f"of its sources {labels}; the renormalised weights are undefined there. "
                "Exclude that router (routers= / layers=) or mask fewer sources."
            )
        masked = torch.zeros(n_sources, dtype=torch.bool)
        masked[indices] = True

        def hook(logits: Float[Tensor, "batch pos n_sources"], hook, masked=masked):
            where = masked.to(logits.device)
            pos_mask = _positions_mask(positions, logits.shape[-2], logits.device)
            if pos_mask is not None:
                where = where & pos_mask[:, None]
            # another hook on the same router (e.g. a second mask_sources list) may have
            # masked the rest already
            return mask_logits(logits, where, f"{hook.name}: together with earlier hooks on this "
                               f"router, masking {sources!r}")

        hooks.append((f"{router_hook_prefix(layer, router)}.hook_logits", hook))
    return hooks


def _weights_for(weights, model, layer, router, n_sources: int) -> Union[str, Tensor]:
    if isinstance(weights, str):
        if weights != "uniform":
            raise ValueError(f"weights must be 'uniform', a tensor, a dict or a cache; got {weights!r}")
        return weights
    if isinstance(weights, dict) and (layer, router) in weights:
        weights = weights[(layer, router)]
    elif hasattr(weights, "keys") and not isinstance(weights, Tensor):
        name = f"{router_hook_prefix(layer, router)}.hook_weights"
        if name not in weights:
            raise KeyError(f"the weights source has no {name}")
        weights = weights[name]
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape[-1] != n_sources:
        raise ValueError(
            f"weights for {describe(layer, router)} have {weights.shape[-1]} sources, the router "
            f"has {n_sources} ({model.source_labels(layer, router)})"
        )
    if (weights < 0).any() or not torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-4):
        raise ValueError(f"weights for {describe(layer, router)} must be non-negative and sum to 1")
    return weights


def set_weights(model, weights, routers=None, layers: LayerSpec = None,
                bands: Optional[dict] = None, positions=None) -> Hooks:
    """Replace routing weights.

    Args:
        weights: ``"uniform"``; a tensor ``[n_sources]`` or ``[batch, pos, n_sources]``
            (one router's shape, so usually with a single router selected); a dict
            ``{(layer, router): tensor}``; or an ``ActivationCache`` / dict of another run
            holding ``hook_weights`` (routing patching, e.g. clean weights into a
            corrupted run).
        routers, layers, bands: which routers (default: every attention and MLP router).
        positions: only replace at these positions (default: all).
    """
    hooks: Hooks = []
    for layer, router in resolve_routers(model, routers, layers, bands):
        n_sources = model.routing_layout.n_sources(layer, router)
        value = _weights_for(weights, model, layer, router, n_sources)

        def hook(current: Float[Tensor, "batch pos n_sources"], hook, value=value):
            new = (torch.full_like(current, 1.0 / current.shape[-1]) if isinstance(value, str)
                   else value.to(current.device, current.dtype).expand_as(current))
            pos_mask = _positions_mask(positions, current.shape[-2], current.device)
            if pos_mask is None:
                return new.clone()
            return torch.where(pos_mask[:, None], new, current)

        hooks.append((f"{router_hook_prefix(layer, router)}.hook_weights", hook))
    return hooks


def _replacement(value, current: Tensor, index: int, name: str) -> Tensor:
    """What replaces ``current[..., index, :]`` (``[batch, pos, d_model]``)."""
    source = current[..., index, :]
    if isinstance(value, str):
        if value == "zero":
            return torch.zeros_like(source)
        if value == "mean":
            return source.mean(dim=0, keepdim=True).expand_as(source)
        raise ValueError(f"value must be 'zero', 'mean', a tensor or a cache, got {value!r}")
    if hasattr(value, "keys") and not isinstance(value, Tensor):
        return value[name][..., index, :].to(source.device, source.dtype)
    return torch.as_tensor(value).to(source.device, source.dtype).expand_as(source)


def patch_sources(model, sources: SourceSpec, value="zero", routers=None, layers: LayerSpec = None,
                  bands: Optional[dict] = None, positions=None) -> Hooks:
    """Replace depth sources as *one router* sees them (local patching).

    Edits ``hook_sources`` of each selected router, so only that router's mix changes;
    the stored blocks, and every other router, are untouched.

    Args:
        sources: families, labels and/or indices.
        value: ``"zero"``; ``"mean"`` (the mean over the batch, per position); a tensor
            broadcastable to ``[batch, pos, d_model]``; or a cache of another run (its
            ``hook_sources`` at the same router, e.g. clean sources into a corrupted run).
        positions: only patch at these positions (default: all).
    """
    hooks: Hooks = []
    for layer, router, indices in iter_selected(model, sources, routers, layers, bands):
        name = f"{router_hook_prefix(layer, router)}.hook_sources"

        def hook(stacked: Float[Tensor, "batch pos n_sources d_model"], hook, indices=indices,
                 name=name):
            out = stacked.clone()
            pos_mask = _positions_mask(positions, stacked.shape[1], stacked.device)
            for index in indices:
                new = _replacement(value, stacked, index, name)
                out[..., index, :] = new if pos_mask is None else torch.where(
                    pos_mask[:, None], new, stacked[..., index, :])
            return out

        hooks.append((name, hook))
    return hooks


def commit_hook_name(model, label: str) -> str:
    """The hook through which every reader sees source ``label`` (``"embedding"`` or a
    committed block such as ``"block_2"``, ``"attn_3"``, ``"mlp_3"``)."""
    if not isinstance(label, str):
        raise ValueError(f"global patching takes source labels such as 'embedding' or 'block_1', "
                         f"not {label!r}; indices and families name different blocks at different routers")
    if label == "embedding":
        return "hook_embed"
    layout = model.routing_layout
    for layer in range(model.cfg.n_layers):
        for sublayer, hook in (("attn", "hook_committed_mid"), ("mlp", "hook_committed_block")):
            if layout.committed_label(layer, sublayer) == label:
                return f"blocks.{layer}.{hook}"
    raise ValueError(
        f"{label!r} is not a committed source of this model; global patching takes 'embedding' "
        "or a committed block label (see model.source_labels); families name different blocks "
        "at different routers, and 'current' is the running stream (patch hook_resid_* instead)"
    )


def patch_committed(model, labels: Union[str, list[str]], value="zero", positions=None) -> Hooks:
    """Replace committed sources for *every* later reader (global patching).

    ``"embedding"`` patches ``hook_embed`` (the token embedding wherever it is used, so
    in the cumulative layout also the start of the stream); a block label patches the
    hook where that block is committed (``blocks.{l}.hook_committed_block``, or
    ``blocks.{l}.hook_committed_mid`` for an ``attn_{l}`` source), so every router that
    reads the block afterwards reads the patched value. Families and indices are refused:
    they name different blocks at different routers (use `patch_sources` for that).

    Args:
        labels: one label or a list.
        value: ``"zero"``, ``"mean"`` (over the batch), a tensor broadcastable to
            ``[batch, pos, d_model]``, or a cache of another run (its value of the same hook).
        positions: only patch at these positions (default: all).
    """
    hooks: Hooks = []
    for label in [labels] if isinstance(labels, (str, int)) else list(labels):
        name = commit_hook_name(model, label)

        def hook(block: Float[Tensor, "batch pos d_model"], hook, name=name):
            if isinstance(value, str) and value == "zero":
                new = torch.zeros_like(block)
            elif isinstance(value, str) and value == "mean":
                new = block.mean(dim=0, keepdim=True).expand_as(block)
            elif isinstance(value, str):
                raise ValueError(f"value must be 'zero', 'mean', a tensor or a cache, got {value!r}")
            elif hasattr(value, "keys") and not isinstance(value, Tensor):
                new = value[name].to(block.device, block.dtype)
            else:
                new = torch.as_tensor(value).to(block.device, block.dtype).expand_as(block)
            pos_mask = _positions_mask(positions, block.shape[1], block.device)
            return new.clone() if pos_mask is None else torch.where(pos_mask[:, None], new, block)

        hooks.append((name, hook))
    return hooks
