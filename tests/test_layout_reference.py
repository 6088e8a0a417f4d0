"""Each AttnRes layout against an independent reference written from ``attnres.md``.

The reference uses Hugging Face's own Qwen3 modules (attention, MLP, RMSNorm, rotary)
for everything but the routing, and follows the layout descriptions of
``../shared/design/attnres.md`` section 2 literally (lists of tensors, no depth-state
object, keys materialised). It shares no code with ``hooked_attnres.model``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_qwen3, randomize_routing

from hooked_attnres import HookedAttnRes


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


def router_params(model: HookedAttnRes, prefix: str):
    router = model.mod_dict[prefix]
    bias = None if router.recency_bias is None else router.recency_bias.detach()
    return router.query.detach(), router.key_norm.w.detach(), bias


def reference_forward(hf, model: HookedAttnRes, tokens, mode: str = "block"):
    """Logits and every router's weights, following attnres.md section 2."""
    cfg = model.cfg
    eps = hf.config.rms_norm_eps
    S = math.ceil(cfg.n_layers / cfg.attnres_num_blocks)
    embedding = hf.model.embed_tokens(tokens)
    position_ids = torch.arange(tokens.shape[1])[None]
    rotary = hf.model.rotary_emb(embedding, position_ids)
    weights = {}

    def attn(layer, x):
        return hf.model.layers[layer].self_attn(
            hf.model.layers[layer].input_layernorm(x), position_embeddings=rotary,
            attention_mask=None)[0]

    def mlp(layer, x):
        return hf.model.layers[layer].mlp(hf.model.layers[layer].post_attention_layernorm(x))

    def route(sources, prefix):
        out, w = reference_route(sources, router_params(model, prefix), eps)
        weights[prefix] = w
        return out

    if cfg.attnres_layout == "cumulative":
        blocks, current = [embedding], embedding
        for layer in range(cfg.n_layers):
            x = route(blocks + [current], f"blocks.{layer}.attn_res")
            current = current + attn(layer, x)
            if mode == "full":
                blocks = blocks + [current]
            x = route(blocks + [current], f"blocks.{layer}.mlp_res")
            current = current + mlp(layer, x)
            if mode == "full" or (layer + 1) % S == 0:
                blocks = blocks + [current]
        final = current
    elif cfg.attnres_layout == "kimi":
        blocks, partial = [], embedding
        for layer in range(cfg.n_layers):
            x = route(blocks + [partial], f"blocks.{layer}.attn_res")
            if layer % S == 0:
                blocks, partial = blocks + [partial], None
            out = attn(layer, x)
            partial = out if partial is None else partial + out
            x = route(blocks + [partial], f"blocks.{layer}.mlp_res")
            partial = partial + mlp(layer, x)
        final = route(blocks + [partial], "final_res")
    elif cfg.attnres_layout == "full":
        outputs = [embedding]
        for layer in range(cfg.n_layers):
            outputs = outputs + [attn(layer, route(outputs, f"blocks.{layer}.attn_res"))]
            outputs = outputs + [mlp(layer, route(outputs, f"blocks.{layer}.mlp_res"))]
        final = route(outputs, "final_res")
    else:
        raise ValueError(cfg.attnres_layout)
    return hf.lm_head(hf.model.norm(final)), weights


CASES = [
    # layout, mode, n_layers, num_blocks, bias
    ("cumulative", "block", 4, 2, 3.0),
    ("cumulative", "block", 5, 2, 0.5),   # ragged: blocks of 3 and 2 layers
    ("cumulative", "block", 6, 6, None),
    ("cumulative", "full", 3, 3, 1.0),
    ("kimi", "block", 4, 2, None),
    ("kimi", "block", 7, 3, 0.7),         # ragged, with a bias
    ("kimi", "block", 3, 1, None),        # one block: the final router reads [emb, partial]
    ("full", "block", 3, 3, None),
]


@pytest.mark.parametrize("layout,mode,n_layers,num_blocks,bias", CASES)
def test_layout_matches_reference(layout, mode, n_layers, num_blocks, bias):
    hf = hf_qwen3(num_hidden_layers=n_layers, tie_word_embeddings=(n_layers % 2 == 0))
    wrap = {"cumulative": "recency", "kimi": "exact", "full": "exact"}[layout]
    model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, num_blocks=num_blocks)
    cfg = model.cfg.replace(attnres_layout=layout, attnres_mode=mode, attnres_recency_bias=bias)
    rebuilt = HookedAttnRes(cfg)
    own = {k: v for k, v in model.state_dict().items() if "_res." not in k}
    missing, unexpected = rebuilt.load_state_dict(own, strict=False)
    assert not unexpected and all("_res." in k for k in missing)
    randomize_routing(rebuilt, seed=n_layers, scale=2.0)

    tokens = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits, expected_weights = reference_forward(hf, rebuilt, tokens, mode)
        logits, cache = rebuilt.run_with_cache(tokens)
        plain = rebuilt(tokens)
    assert (logits - expected_logits).abs().max().item() <= 1e-4
    assert (plain - expected_logits).abs().max().item() <= 1e-4
    assert set(expected_weights) == {
        name.removesuffix(".hook_weights") for name in cache if name.endswith("hook_weights")
    }
    for prefix, ref in expected_weights.items():
        got = cache[f"{prefix}.hook_weights"]  # [batch, pos, n_sources]
        assert got.shape == ref.permute(1, 2, 0).shape
        assert (got - ref.permute(1, 2, 0)).abs().max().item() <= 1e-5, prefix
