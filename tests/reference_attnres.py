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


def reference_route(sources, router_params, eps):
    """softmax_i(w . RMSNorm(s_i) (+ bias on the last)) weighted sum of the raw sources."""
    query, gain, bias = router_params
    values = torch.stack(sources, dim=0)  # [n, batch, pos, d]
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * gain
    logits = torch.einsum("d,nbpd->nbp", query, keys)
    if bias is not None:
        logits = torch.cat([logits[:-1], logits[-1:] + bias], dim=0)
    weights = logits.softmax(dim=0)
    return torch.einsum("nbp,nbpd->bpd", weights, values), weights


def model_router_params(model) -> RouterParams:
    """Router parameters read from a HookedAttnRes (by module path)."""

    def params(prefix: str):
        router = model.mod_dict[prefix]
        bias = None if router.recency_bias is None else router.recency_bias.detach()
        return router.query.detach(), router.key_norm.w.detach(), bias

    return params


def reference_forward(
    hf,
    layout: str,
    num_blocks: int,
    router_params: RouterParams,
    tokens,
    mode: str = "block",
    n_layers: Optional[int] = None,
):
    """Logits and every router's weights ``{prefix: [n_sources, batch, pos]}``."""
    n_layers = hf.config.num_hidden_layers if n_layers is None else n_layers
    eps = hf.config.rms_norm_eps
    S = math.ceil(n_layers / num_blocks)
    embedding = hf.model.embed_tokens(tokens)
    position_ids = torch.arange(tokens.shape[1])[None]
    rotary = hf.model.rotary_emb(embedding, position_ids)
    weights = {}

    def attn(layer, x):
        return hf.model.layers[layer].self_attn(
            hf.model.layers[layer].input_layernorm(x),
            position_embeddings=rotary,
            attention_mask=None,
        )[0]

    def mlp(layer, x):
        return hf.model.layers[layer].mlp(hf.model.layers[layer].post_attention_layernorm(x))

    def route(sources, prefix):
        out, w = reference_route(sources, router_params(prefix), eps)
        weights[prefix] = w
        return out

    if layout == "cumulative":
        blocks, current = [embedding], embedding
        for layer in range(n_layers):
            x = route(blocks + [current], f"blocks.{layer}.attn_res")
            current = current + attn(layer, x)
            if mode == "full":
                blocks = blocks + [current]
            x = route(blocks + [current], f"blocks.{layer}.mlp_res")
            current = current + mlp(layer, x)
            if mode == "full" or (layer + 1) % S == 0:
                blocks = blocks + [current]
        final = current
    elif layout == "kimi":
        blocks, partial = [], embedding
        for layer in range(n_layers):
            x = route(blocks + [partial], f"blocks.{layer}.attn_res")
            if layer % S == 0:
                blocks, partial = blocks + [partial], None
            out = attn(layer, x)
            partial = out if partial is None else partial + out
            x = route(blocks + [partial], f"blocks.{layer}.mlp_res")
            partial = partial + mlp(layer, x)
        final = route(blocks + [partial], "final_res")
    elif layout == "full":
        outputs = [embedding]
        for layer in range(n_layers):
            outputs = outputs + [attn(layer, route(outputs, f"blocks.{layer}.attn_res"))]
            outputs = outputs + [mlp(layer, route(outputs, f"blocks.{layer}.mlp_res"))]
        final = route(outputs, "final_res")
    else:
        raise ValueError(layout)
    return hf.lm_head(hf.model.norm(final)), weights
