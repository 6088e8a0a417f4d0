"""One decoder layer: (router ->) RMSNorm -> attention, (router ->) RMSNorm -> MLP."""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_attnres._tl import HookPoint
from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.model.attention import Attention, AttentionContext, QKVInputs
from hooked_attnres.model.depth import DepthState, RoutingLayout, gather_positions
from hooked_attnres.model.mlp import GatedMLP
from hooked_attnres.model.norms import (
    RMSNorm,
    has_module_hooks,
    is_observed,
    make_hook,
    toggle_hook,
)
from hooked_attnres.model.routing import DepthRouter, SharedSums, normalized_route


class AttnResBlock(nn.Module):
    """Decoder layer ``layer`` of a `HookedAttnRes` model.

    Submodules: ``attn_res`` and ``mlp_res`` (`DepthRouter`, absent in layout
    ``"none"``), ``ln1``, ``attn``, ``ln2``, ``mlp``.

    Hooks (all ``[batch, pos, d_model]``):
        hook_resid_pre / hook_resid_mid / hook_resid_post: the current source (the
            running stream) before the layer, after attention and after the MLP. In
            the cumulative and none layouts this is the ordinary residual stream; in
            the kimi layout it is the running sum of the current block; in the full
            layout it is the latest sublayer output.
        hook_attn_out / hook_mlp_out: the sublayer outputs.
        hook_committed_mid: the block committed after the attention sublayer (only
            where every sublayer ends a block: full layout, cumulative full mode).
        hook_committed_block: the block committed after the MLP sublayer (only at layers
            that end a block). Every later router that reads the block reads this
            hook's output.
        hook_q_input: ``[batch, pos, n_heads, d_model]``; hook_k_input / hook_v_input:
            ``[batch, pos, n_kv, d_model]``: per-head copies of the attention input before
            ``ln1`` (only while ``set_use_split_qkv_input(True)``; ``attn.hook_q_input``
            etc. fire right after, on the same tensors).
        hook_mlp_in: a copy of the MLP input before ``ln2`` (only while
            ``set_use_hook_mlp_in(True)``).
    """

    hook_mlp_in: HookPoint  # only while set_use_hook_mlp_in(True)

    def __init__(self, cfg: HookedAttnResConfig, layer: int, layout: RoutingLayout):
        super().__init__()
        self.layer = layer
        self.layout = layout
        # read by TransformerLens's logit lens: hook_resid_post of the last block is the
        # stream ln_final reads unless a final router mixes several sources first
        self.hook_out_is_single_residual_stream = not layout.has_final_router
        routers = layout.has_routers
        self.hook_resid_pre = make_hook()
        if routers:
            self.attn_res = DepthRouter(cfg.d_model, cfg.eps, cfg.attnres_recency_bias)
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.eps)
        self.hook_attn_out = make_hook()
        self.hook_resid_mid = make_hook()
        if layout.commits_after_attn(layer):
            self.hook_committed_mid = make_hook()
        if routers:
            self.mlp_res = DepthRouter(cfg.d_model, cfg.eps, cfg.attnres_recency_bias)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp)
        self.hook_mlp_out = make_hook()
        self.hook_resid_post = make_hook()
        if layout.commits_after_mlp(layer):
            self.hook_committed_block = make_hook()

    # --- TransformerLens's optional hooks (created by the model's set_use_* methods) ----
    def set_split_qkv_input(self, enabled: bool) -> None:
        """Create or remove ``hook_{q,k,v}_input`` here and in ``attn`` (the model's
        `set_use_split_qkv_input` also refreshes its hook dictionary)."""
        for owner in (self, self.attn):
            for name in ("hook_q_input", "hook_k_input", "hook_v_input"):
                toggle_hook(owner, name, enabled, pos_dim=-3)

    def set_hook_mlp_in(self, enabled: bool) -> None:
        toggle_hook(self, "hook_mlp_in", enabled, pos_dim=-2)

    @property
    def splits_qkv_input(self) -> bool:
        return "hook_q_input" in self._modules

    def _split_qkv(self, attn_in: Float[Tensor, "batch pos d_model"]) -> QKVInputs:
        """Per-head copies of the attention input, each normalised with ``ln1``'s gain on
        its own (TransformerLens's ``use_split_qkv_input``). ``ln1``'s hooks fire once, on
        the shared input, as in TransformerBridge; the heads do not read that output, so
        a hook that edits it (returned or in place) raises ``ValueError`` instead of being
        dropped silently (TransformerBridge 4.3 drops it)."""
        shared = self.ln1(attn_in)  # fires ln1's hooks; the heads read their own copies
        if (
            is_observed(self.ln1.hook_scale)
            or is_observed(self.ln1.hook_normalized)
            or has_module_hooks(self.ln1)  # a PyTorch hook on the norm module itself
        ):
            unedited = self.ln1.unhooked(attn_in)  # the same bits when no hook edited
            if not torch.allclose(shared, unedited, rtol=0.0, atol=0.0, equal_nan=True):
                prefix = str(self.ln1.hook_normalized.name).rsplit(".", 1)[0]  # ln1's path
                raise ValueError(
                    f"a hook edited {self.ln1.hook_normalized.name} or "
                    f"{self.ln1.hook_scale.name} (or a PyTorch hook edited the output of the "
                    f"{prefix} module) while set_use_split_qkv_input(True) is on: "
                    "the attention then reads one copy of its input per head, each "
                    "normalised on its own (hook_q_input / hook_k_input / hook_v_input), "
                    "not ln1's output, so the edit would change nothing. Edit the per-head "
                    "inputs, or call model.set_use_split_qkv_input(False) to edit ln1"
                )
        heads = (self.attn.n_heads, self.attn.n_key_value_heads, self.attn.n_key_value_heads)
        names = ("hook_q_input", "hook_k_input", "hook_v_input")
        out = []
        for n_heads, name in zip(heads, names, strict=True):
            copies = attn_in.unsqueeze(-2).repeat(1, 1, n_heads, 1)
            copies = getattr(self.attn, name)(getattr(self, name)(copies))
            out.append(self.ln1.unhooked(copies))
        return out[0], out[1], out[2]

    def _route(
        self, router_name: str, state: DepthState, shared_sums: Optional[SharedSums]
    ) -> Float[Tensor, "batch pos d_model"]:
        if not self.layout.has_routers:
            return state.current
        return getattr(self, router_name)(state.sources, shared_sums)

    def _normalized_input(
        self, router_name: str, norm: RMSNorm, state: DepthState, shared_sums: Optional[SharedSums]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``norm(self._route(router_name, state, shared_sums))`` (`normalized_route`)."""
        router = getattr(self, router_name) if self.layout.has_routers else None
        return normalized_route(router, state.sources, norm, shared_sums)

    def _after_sublayer(
        self, state: DepthState, output: Tensor, resid_hook: nn.Module, commit_hook
    ) -> DepthState:
        state = self.layout.write(state, output, operator.add)
        state.current = resid_hook(state.current)
        if commit_hook is not None:
            # A snapshot is a copy, so that editing the stream in place later does not
            # reach the committed block (and vice versa).
            value = state.current.clone() if self.layout.snapshots else state.current
            state = self.layout.commit(state, commit_hook(value))
        return state

    def attn_sublayer(
        self,
        state: DepthState,
        context: AttentionContext,
        query_positions: Optional[Int[Tensor, " batch"]] = None,
        shared_sums: Optional[SharedSums] = None,
    ) -> DepthState:
        """The attention half: the state entering ``mlp_res`` (the input is not mutated).

        ``context`` holds the rotary tables, the padding and the key-value cache of the
        pass. With ``query_positions`` (one per prompt) the attention runs only from there
        and the returned state is gathered to that position (``pos = 1``); everything after
        it is position-wise, so the rest of the model can run on that one position.
        ``shared_sums``: the pass's `SharedSums` (one per pass), if any.
        """
        state = dataclasses.replace(state, current=self.hook_resid_pre(state.current))
        x: Union[Tensor, QKVInputs]
        if self.splits_qkv_input:
            x = self._split_qkv(self._route("attn_res", state, shared_sums))
        else:
            x = self._normalized_input("attn_res", self.ln1, state, shared_sums)
        attn_out = self.hook_attn_out(
            self.attn(x, context, query_positions, context.layer_cache(self.layer))
        )
        if query_positions is not None:
            state = gather_positions(state, query_positions)
        return self._after_sublayer(
            state, attn_out, self.hook_resid_mid, getattr(self, "hook_committed_mid", None)
        )

    def mlp_sublayer(
        self, state: DepthState, shared_sums: Optional[SharedSums] = None
    ) -> DepthState:
        """The MLP half: the state leaving the layer (the input is not mutated);
        ``shared_sums`` as in `attn_sublayer`."""
        if "hook_mlp_in" in self._modules:  # a copy: the stream itself is not edited
            mlp_in = self.hook_mlp_in(self._route("mlp_res", state, shared_sums).clone())
            x = self.ln2(mlp_in)
        else:
            x = self._normalized_input("mlp_res", self.ln2, state, shared_sums)
        mlp_out = self.hook_mlp_out(self.mlp(x))
        return self._after_sublayer(
            state, mlp_out, self.hook_resid_post, getattr(self, "hook_committed_block", None)
        )

    def forward(
        self,
        state: DepthState,
        context: AttentionContext,
        query_positions: Optional[Int[Tensor, " batch"]] = None,
        shared_sums: Optional[SharedSums] = None,
    ) -> DepthState:
        """Run the layer on a depth state and return the next one (the input is not mutated)."""
        state = self.attn_sublayer(state, context, query_positions, shared_sums)
        return self.mlp_sublayer(state, shared_sums)
