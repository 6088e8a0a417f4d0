"""An independent reference of the three AttnRes layouts, written from ``attnres.md``.

It uses Hugging Face's own Qwen3 modules (attention, MLP, RMSNorm, rotary) for everything
but the routing, and follows the layout descriptions of ``../shared/design/attnres.md``
section 2 literally (lists of tensors, no depth-state object, keys materialised). It
shares no code with ``hooked_attnres.model``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

RouterParams = Callable[[str], tuple]  # prefix -> (query [d], gain [d], bias [] or None)


def reference_route(sources, router_params, eps, edit_logits=None, edit_weights=None):
    """softmax_i(w . RMSNorm(s_i) (+ bias on the last)) weighted sum of the raw sources.
    ``edit_logits`` / ``edit_weights``: optional hand edits of the ``[n, batch, pos]``
    logits before the softmax and of the weights after it."""
    query, gain, bias = router_params
    values = torch.stack(sources, dim=0)  # [n, batch, pos, d]
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * gain
    logits = torch.einsum("d,nbpd->nbp", query, keys)
    if bias is not None:
        logits = torch.cat([logits[:-1], logits[-1:] + bias], dim=0)
    if edit_logits is not None:
        logits = edit_logits(logits)
    weights = logits.softmax(dim=0)
    if edit_weights is not None:
        weights = edit_weights(weights)
    return torch.einsum("nbp,nbpd->bpd", weights, values), weights


class Edit:
    """Hand edits of a reference pass, the independent side of the intervention tests;
    each method returns its input unchanged here. Tensors are ``[batch, pos, d]``;
    ``sources`` a list of them (the router's, or the depth state entering a sublayer, in
    reading order); ``logits`` / ``weights`` ``[n_sources, batch, pos]``."""

    def embed(self, embedding):
        """The token embedding."""
        return embedding

    def commit(self, label, block):
        """A block as it is committed (``"block_2"``, ``"attn_0"``, ``"mlp_0"``)."""
        return block

    def state(self, sublayer, sources):
        """The depth state entering sublayer ``2 * layer (+ 1 for the MLP)``: the sources
        its router reads, kept by the rest of the pass."""
        return sources

    def sources(self, prefix, sources):
        """The sources one router (``prefix``, e.g. ``"blocks.1.mlp_res"``) reads."""
        return sources

    def logits(self, prefix, logits):
        return logits

    def weights(self, prefix, weights):
        return weights


def model_router_params(model) -> RouterParams:
    """Router parameters read from a HookedAttnRes (by module path)."""

    def params(prefix: str):
        router = model.mod_dict[prefix]
        bias = None if router.recency_bias is None else router.recency_bias.detach()
        return router.query.detach(), router.key_norm.w.detach(), bias

    return params


def model_reference_forward(hf, model, tokens, attention_mask=None, edit: Optional[Edit] = None):
    """`reference_forward` of ``model``'s layout, blocks, mode and router parameters (read
    from its config and routers), on ``hf``'s weights: ``(logits, weights)``."""
    cfg = model.cfg
    return reference_forward(
        hf,
        cfg.attnres_layout,
        cfg.attnres_num_blocks,
        model_router_params(model),
        tokens,
        cfg.attnres_mode,
        attention_mask=attention_mask,
        edit=edit,
    )


def reference_forward(
    hf,
    layout: str,
    num_blocks: int,
    router_params: RouterParams,
    tokens,
    mode: str = "block",
    n_layers: Optional[int] = None,
    attention_mask=None,
    edit: Optional[Edit] = None,
):
    """Logits and every router's weights ``{prefix: [n_sources, batch, pos]}``.

    ``attention_mask``: ``[batch, pos]``, 1 at real tokens (rotary positions count real
    tokens, as Hugging Face's ``position_ids``; a padding query attends to itself only,
    so that its numbers stay finite). ``edit``: hand edits of the pass (`Edit`). Layout
    ``"none"`` is vanilla Qwen3 (one residual stream)."""
    n_layers = hf.config.num_hidden_layers if n_layers is None else n_layers
    eps = hf.config.rms_norm_eps
    S = math.ceil(n_layers / num_blocks)
    edit = Edit() if edit is None else edit
    commit, state = edit.commit, edit.state
    embedding = edit.embed(hf.model.embed_tokens(tokens))
    batch, n_pos = tokens.shape
    mask = None
    if attention_mask is None:
        position_ids = torch.arange(n_pos)[None]
    else:
        real = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        query, key = torch.arange(n_pos)[:, None], torch.arange(n_pos)[None, :]
        seen = (key <= query) & (real[:, None, :] | (key == query))  # [batch, query, key]
        mask = torch.zeros(batch, 1, n_pos, n_pos, dtype=embedding.dtype)
        mask = mask.masked_fill(~seen[:, None], torch.finfo(embedding.dtype).min)
    rotary = hf.model.rotary_emb(embedding, position_ids)
    weights = {}

    def attn(layer, x):
        return hf.model.layers[layer].self_attn(
            hf.model.layers[layer].input_layernorm(x),
            position_embeddings=rotary,
            attention_mask=mask,
        )[0]

    def mlp(layer, x):
        return hf.model.layers[layer].mlp(hf.model.layers[layer].post_attention_layernorm(x))

    def route(sources, prefix):
        out, w = reference_route(
            edit.sources(prefix, sources),
            router_params(prefix),
            eps,
            lambda logits: edit.logits(prefix, logits),
            lambda weights: edit.weights(prefix, weights),
        )
        weights[prefix] = w
        return out

    if layout == "cumulative":
        blocks, current = [embedding], embedding
        for layer in range(n_layers):
            *blocks, current = state(2 * layer, blocks + [current])
            x = route(blocks + [current], f"blocks.{layer}.attn_res")
            current = current + attn(layer, x)
            if mode == "full":
                blocks = blocks + [commit(f"attn_{layer}", current)]
            *blocks, current = state(2 * layer + 1, blocks + [current])
            x = route(blocks + [current], f"blocks.{layer}.mlp_res")
            current = current + mlp(layer, x)
            if mode == "full":
                blocks = blocks + [commit(f"mlp_{layer}", current)]
            elif (layer + 1) % S == 0:
                blocks = blocks + [commit(f"block_{len(blocks)}", current)]
        final = current
    elif layout == "kimi":
        blocks, partial = [], embedding
        for layer in range(n_layers):
            *blocks, partial = state(2 * layer, blocks + [partial])
            x = route(blocks + [partial], f"blocks.{layer}.attn_res")
            if layer % S == 0:
                blocks, partial = blocks + [partial], None
            out = attn(layer, x)
            partial = out if partial is None else partial + out
            *blocks, partial = state(2 * layer + 1, blocks + [partial])
            x = route(blocks + [partial], f"blocks.{layer}.mlp_res")
            partial = partial + mlp(layer, x)
            if (layer + 1) % S == 0:  # finished: the next router's current, then a block
                partial = commit(f"block_{len(blocks)}", partial)
        final = route(blocks + [partial], "final_res")
    elif layout == "full":
        outputs = [embedding]
        for layer in range(n_layers):
            outputs = state(2 * layer, outputs)
            out = attn(layer, route(outputs, f"blocks.{layer}.attn_res"))
            outputs = state(2 * layer + 1, outputs + [commit(f"attn_{layer}", out)])
            out = mlp(layer, route(outputs, f"blocks.{layer}.mlp_res"))
            outputs = outputs + [commit(f"mlp_{layer}", out)]
        final = route(outputs, "final_res")
    elif layout == "none":
        current = embedding
        for layer in range(n_layers):
            (current,) = state(2 * layer, [current])
            current = current + attn(layer, current)
            (current,) = state(2 * layer + 1, [current])
            current = current + mlp(layer, current)
        final = current
    else:
        raise ValueError(layout)
    return hf.lm_head(hf.model.norm(final)), weights
