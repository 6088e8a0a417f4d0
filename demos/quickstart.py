"""Quickstart: build a Block AttnRes model, read its routing, intervene on it.

Runs offline in a few seconds:

    python demos/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
import transformer_lens.patching as tl_patching

from hooked_attnres import HookedAttnRes, HookedAttnResConfig
from hooked_attnres.patching import get_act_patch_depth_state_by_pos


def main() -> None:
    cfg = HookedAttnResConfig(
        d_model=64,
        n_layers=6,
        n_heads=4,
        n_key_value_heads=2,
        d_vocab=100,
        attnres_layout="cumulative",
        attnres_num_blocks=3,
        attnres_recency_bias=3.0,
        seed=0,
    )
    model = HookedAttnRes(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))

    # 1. Read the routing: a TransformerLens ActivationCache with routing hooks.
    logits, cache = model.run_with_cache(tokens)
    print(f"logits {tuple(logits.shape)}, {len(cache)} cached activations")
    for layer in range(cfg.n_layers):
        weights = cache["weights", layer, "attn_res"].mean(dim=(0, 1))  # [n_sources]
        labels = model.source_labels(layer, "attn_res")
        pairs = zip(labels, weights.tolist(), strict=True)
        shown = ", ".join(f"{label}={w:.3f}" for label, w in pairs)
        print(f"  layer {layer} attention router: {shown}")

    # 2. Intervene: mask the embedding source of every MLP router and renormalise.
    def mask_embedding(weights, hook):
        weights = weights.clone()
        weights[..., 0] = 0
        return weights / weights.sum(-1, keepdim=True)

    ablated = model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("mlp_res.hook_weights"), mask_embedding)]
    )
    print(
        f"max logit change after masking the embedding source: {(ablated - logits).abs().max():.4f}"
    )

    # 3. TransformerLens patching runs on the model unchanged, with a caveat (below).
    corrupted = tokens.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % cfg.d_vocab
    answer = tokens[:, -1]

    def metric(patched_logits):
        return patched_logits[torch.arange(len(answer)), -1, answer].mean()

    result = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    print(f"get_act_patch_resid_pre -> {tuple(result.shape)} [n_layers, pos]")
    # In a routed layout hook_resid_pre holds only the current depth source (the model warns
    # once), so that patches less than a layer's input; the depth-state patch replaces every
    # source the routers at and after the layer read (the routed meaning of resid_pre).
    state = get_act_patch_depth_state_by_pos(model, corrupted, cache, metric)
    print(
        f"get_act_patch_depth_state_by_pos -> {tuple(state.shape)} [n_layers, pos]; largest "
        f"difference from the resid_pre patch: {(state - result).abs().max():.4f}"
    )

    # 4. Save and reload (atomic write, bitwise round trip).
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/model")
        reloaded = HookedAttnRes.from_pretrained(f"{tmp}/model")
        assert torch.equal(reloaded(tokens), model(tokens))
    print("save_pretrained / from_pretrained round trip: identical logits")


if __name__ == "__main__":
    main()
