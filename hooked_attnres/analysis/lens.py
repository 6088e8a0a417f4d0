"""The routing lens: a logit lens over depth states and router inputs.

TransformerLens's logit lens reads ``ln_final(hook_resid_*) @ W_U`` at every layer. With
depth routing the model's readout is not always ``ln_final(current)``: in the ``kimi``
and ``full`` layouts a final router mixes every depth source first. The routing lens
asks, at every layer, what the model's own readout would produce from the sources that
exist there:

* **state readout** (``RoutingLens.logits``): for the depth state entering each layer
  (and, with ``incl_mid``, each MLP sublayer), ``ln_final(current) @ W_U`` in the
  ``none`` and ``cumulative`` layouts (TransformerLens's logit lens), and
  ``ln_final(final_router(sources)) @ W_U`` in ``kimi`` and ``full``. The last entry is
  the model's readout, so it equals the model's logits in every layout; ``ln_final`` is
  applied by the lens (without its hooks), so a run that edited its ``hook_scale`` or
  ``hook_normalized`` is refused.
* **router readout** (``RoutingLens.router_logits``): ``ln_final(hook_out) @ W_U`` for every
  router, i.e. what each router feeds its sublayer, read as if it were the final stream.
  The final router's entry equals the logits too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooked_attnres._tl import ActivationCache, as_slice, get_act_name
from hooked_attnres._validation import require_bool, require_bools
from hooked_attnres.model.cache import (
    AttnResActivationCache,
    require_cached,
    require_one_position_axis,
    state_source_names,
)
from hooked_attnres.model.depth import RouterSite

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes


@dataclass
class RoutingLens:
    """Result of `routing_lens`; ``*pos`` is ``pos`` after ``positions`` (absent for an
    integer position), and ``batch`` is absent for a cache without a batch axis
    (``run_with_cache(..., remove_batch_dim=True)``).

    Attributes:
        logits: ``[n_states, batch, *pos, d_vocab]``, the readout of each depth state.
        labels: the state labels, as TransformerLens's ``accumulated_resid``:
            ``"{l}_pre"`` (entering layer ``l``), ``"{l}_mid"`` (entering its MLP, with
            ``incl_mid``), ``"final_post"`` (after the last layer: the model's logits).
        router_logits: ``[n_routers, batch, *pos, d_vocab]``, the readout of each router's
            ``hook_out`` (empty in layout ``"none"`` and with ``routers=False``).
        sites: the `RouterSite` of each ``router_logits`` entry, in forward order.
    """

    logits: Float[Tensor, "state batch *pos d_vocab"]
    labels: list[str]
    router_logits: Float[Tensor, "router batch *pos d_vocab"]
    sites: list[RouterSite] = field(default_factory=list)

    @property
    def router_labels(self) -> list[str]:
        """``str(site)`` of each router entry, e.g. ``"attn_res layer 3"``."""
        return [str(site) for site in self.sites]


def lens_hook_names(model: HookedAttnRes, incl_mid: bool = False) -> list[str]:
    """The hooks `routing_lens` reads (what ``run_with_cache(names_filter=...)`` must keep);
    ``ln_final.hook_normalized`` is read only to check that the run did not edit
    ``ln_final`` (a cache of a pass without other hooks attached may lack it)."""
    incl_mid = require_bool("incl_mid", incl_mid)  # read by truthiness, "no" was True
    layout = model.routing_layout
    n_layers = model.cfg.n_layers
    names = [site.hook("out") for site in model.sites()]
    if layout.has_final_router:  # each state's sources as stored (not a router's copy)
        for layer in range(n_layers):
            for point in (2 * layer, 2 * layer + 1) if incl_mid else (2 * layer,):
                names += state_source_names(model, point)
    else:
        for layer in range(n_layers):
            names.append(get_act_name("resid_pre", layer))
            if incl_mid:
                names.append(get_act_name("resid_mid", layer))
        names.append(get_act_name("resid_post", n_layers - 1))
    names.append(model.ln_final.hook_normalized.name)  # to check that the run did not edit it
    return list(dict.fromkeys(names))


@torch.no_grad()
def routing_lens(
    model: HookedAttnRes,
    input: Union[Int[Tensor, "batch pos"], ActivationCache],
    incl_mid: bool = False,
    positions=None,
    routers: bool = True,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> RoutingLens:
    """The routing lens of a run, from token ids (one cached forward pass) or a cache.

    Args:
        model: the model (in eval mode, as for any TransformerLens analysis).
        input: token ids ``[batch, pos]``, or the `AttnResActivationCache` of a run.
        incl_mid: also read the state entering each MLP sublayer.
        positions: the positions to read (TransformerLens ``Slice`` semantics: ``None``
            all, an int one position, dropping the axis; a list or slice); vocabulary
            logits are large, so pass ``-1`` for the next-token prediction only.
        routers: also read every router's ``hook_out``.
        attention_mask: ``[batch, pos]``, 1 at real tokens, for padded token ids (the
            run's rotary positions and keys skip the padding, as in
            ``model(tokens, attention_mask=...)``). A cache carries the mask of its run:
            with a cache, make it with the mask instead
            (``model.run_with_cache(tokens, attention_mask=mask)``).

    Returns:
        A `RoutingLens`; ``logits[-1]`` equals the run's logits (to float rounding). The
        earlier entries are ``ln_final`` (its RMS recomputed per vector, its hooks not
        fired) of the states below, the lens by definition.

    Raises:
        KeyError: a cache without the hooks the lens reads (`lens_hook_names`; without the
            routers' ``hook_out`` for ``routers=False``), naming them.
        ValueError: a cache of another model, of a ``logit_positions`` run, or given with
            an ``attention_mask``; a run (the cache's, or the lens's own pass with hooks
            attached) whose ``ln_final`` output is not its input over its own RMS (an
            edit of ``ln_final.hook_scale`` or ``hook_normalized``: the last entry would
            not be its logits; ``KeyError`` for a cache without ``ln_final.hook_normalized``
            of a pass with other hooks attached, which cannot show it).
    """
    incl_mid, routers = require_bools(incl_mid=incl_mid, routers=routers)  # "no" was True
    if isinstance(input, ActivationCache):
        if attention_mask is not None:
            raise ValueError(
                "routing_lens reads a cache as its run made it; an attention_mask cannot "
                "change that run. Pass the mask to the run: routing_lens(model, tokens, "
                "attention_mask=mask), or model.run_with_cache(tokens, attention_mask=mask)"
            )
        if input.model is not model:
            raise ValueError("the cache comes from another model; pass that model")
        cache = input
        if not isinstance(cache, AttnResActivationCache):
            cache = AttnResActivationCache(cache.cache_dict, model, cache.has_batch_dim)
        # ln_final's output: needed only to check for an edit (`_require_norm_output`)
        output = model.ln_final.hook_normalized.name
        needed = [name for name in lens_hook_names(model, incl_mid) if name != output]
        if not routers:  # the routers' inputs are read for router_logits only
            inputs = {site.hook("out") for site in model.sites() if not site.is_final}
            needed = [name for name in needed if name not in inputs]
        require_cached(cache.cache_dict, needed, "routing_lens's cache")
        cache._require_batch_or_position_axis("routing_lens")
        require_one_position_axis(model, cache.cache_dict, needed, "routing_lens")
    else:
        _, cache = model.run_with_cache(
            input, names_filter=lens_hook_names(model, incl_mid), attention_mask=attention_mask
        )
    # the lens applies ln_final itself: the run's must have output what it recomputes
    cache._require_norm_output("routing_lens", 2 * model.cfg.n_layers, recompute=True)
    pos_slice = as_slice(positions, "positions")
    cache._require_cached_positions(pos_slice, "positions")  # named as routing_lens's
    stack, labels = cache.accumulated_resid(
        incl_mid=incl_mid, pos_slice=pos_slice, return_labels=True, routed=True
    )
    # the run's padding, as the stack's rows: with eps = 0 an all-zero padding row (a
    # padding query's attention output) is finite, as in the run, not 0 / 0
    real = cache._stack_padding(stack, pos_slice)
    logits = _readout(model, stack, real)
    sites = model.sites() if routers else []
    if sites:
        outs = torch.stack([pos_slice.apply(cache[site.hook("out")], dim=-2) for site in sites])
        router_logits = _readout(model, outs, real)
    else:
        router_logits = logits.new_zeros((0, *logits.shape[1:]))
    return RoutingLens(logits, labels, router_logits, sites)


def _readout(
    model: HookedAttnRes,
    stack: Float[Tensor, "entry ... d_model"],
    real: Optional[Bool[Tensor, "*rows"]] = None,
) -> Float[Tensor, "entry ... d_vocab"]:
    """``ln_final(x) @ W_U + b_U`` for every vector (norm statistics per vector);
    ``real``: the run's padding as the stack's ``...`` rows (`norms.padding_eps`)."""
    flat = stack.reshape(1, -1, stack.shape[-1])
    mask = None
    if real is not None and tuple(real.shape) == tuple(stack.shape[1:-1]):
        mask = real.to(stack.device).expand(stack.shape[:-1]).reshape(1, -1)
    normalized = model.ln_final.unhooked(flat, mask)
    return (normalized @ model.W_U + model.b_U).reshape(*stack.shape[:-1], -1)
