"""Qwen3 grouped-query attention with TransformerLens names and layouts.

Order of operations (as in Qwen3 and TransformerLens):
``x -> q, k, v`` (raw projections) ``-> q_norm, k_norm`` (per-head RMSNorm) ``->
rotary -> scores -> causal mask -> softmax (float32) -> z -> W_O``.

The scores and the pattern are materialised only while a hook is attached to
``hook_attn_scores`` or ``hook_pattern`` (``run_with_cache`` attaches them); otherwise
the same computation runs as one fused ``scaled_dot_product_attention`` call, which is
faster and agrees to float rounding (about 1e-7 in float32).
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attnres.model.norms import RMSNorm, is_observed, make_hook, stat_dtype
from hooked_attnres.model.rotary import apply_rotary


def _project(
    x: Float[Tensor, "batch pos d_model"], W: Float[Tensor, "head d_model d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    n_heads, d_model, d_head = W.shape
    flat = W.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    return (x @ flat).unflatten(-1, (n_heads, d_head))


class Attention(nn.Module):
    """Causal grouped-query self-attention with per-head q/k RMSNorm and RoPE.

    Parameters (TransformerLens layouts):
        W_Q: ``[n_heads, d_model, d_head]``; W_O: ``[n_heads, d_head, d_model]``;
        _W_K, _W_V: ``[n_key_value_heads, d_model, d_head]`` (the properties ``W_K`` /
        ``W_V`` repeat them to ``n_heads``, as TransformerLens does for GQA);
        q_norm.w, k_norm.w: ``[d_head]``.

    Hooks:
        hook_q: ``[batch, pos, n_heads, d_head]``, raw query projection.
        hook_k, hook_v: ``[batch, pos, n_key_value_heads, d_head]``, raw projections.
        q_norm.hook_scale / k_norm.hook_scale: ``[batch, pos, head, 1]``.
        q_norm.hook_normalized / k_norm.hook_normalized: ``[batch, pos, head, d_head]``.
        hook_rot_q: ``[batch, pos, n_heads, d_head]``; hook_rot_k:
            ``[batch, pos, n_key_value_heads, d_head]`` (after q/k norm and rotary).
        hook_attn_scores: ``[batch, n_heads, query_pos, key_pos]``, scaled and masked
            (``-inf`` above the diagonal).
        hook_pattern: ``[batch, n_heads, query_pos, key_pos]``, softmax of the scores.
        hook_z: ``[batch, pos, n_heads, d_head]``, pattern-weighted values.
    """

    def __init__(self, d_model: int, n_heads: int, n_key_value_heads: int, d_head: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.n_key_value_heads = n_key_value_heads
        self.d_head = d_head
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self._W_K = nn.Parameter(torch.empty(n_key_value_heads, d_model, d_head))
        self._W_V = nn.Parameter(torch.empty(n_key_value_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.q_norm = RMSNorm(d_head, eps, pos_dim=-3)
        self.k_norm = RMSNorm(d_head, eps, pos_dim=-3)
        self.hook_q = make_hook(-3)
        self.hook_k = make_hook(-3)
        self.hook_v = make_hook(-3)
        self.hook_rot_q = make_hook(-3)
        self.hook_rot_k = make_hook(-3)
        self.hook_attn_scores = make_hook(-2)
        self.hook_pattern = make_hook(-2)
        self.hook_z = make_hook(-3)

    @property
    def repeat_kv_heads(self) -> int:
        return self.n_heads // self.n_key_value_heads

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._W_K.repeat_interleave(self.repeat_kv_heads, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._W_V.repeat_interleave(self.repeat_kv_heads, dim=0)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        return self.W_Q.new_zeros(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self.W_Q.new_zeros(self.n_heads, self.d_head)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self.W_Q.new_zeros(self.n_heads, self.d_head)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self.W_O.new_zeros(self.W_O.shape[-1])

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cos: Float[Tensor, "pos d_head"],
        sin: Float[Tensor, "pos d_head"],
        query_positions: Optional[Int[Tensor, " batch"]] = None,
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Attend from every position (``query_pos = pos``), or, with ``query_positions``,
        only from one position per prompt (``query_pos = 1``; the keys and values still
        cover every position up to it). The hooks on queries, scores, pattern and ``z``
        then see one query position."""
        if query_positions is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            query_positions = query_positions.to(x.device)
            x_query = x[rows, query_positions].unsqueeze(1)
            cos_query, sin_query = (
                cos[query_positions].unsqueeze(1),
                sin[query_positions].unsqueeze(1),
            )
        else:
            x_query, cos_query, sin_query = x, cos, sin
        q = self.hook_q(_project(x_query, self.W_Q))
        k = self.hook_k(_project(x, self._W_K))
        v = self.hook_v(_project(x, self._W_V))
        q = self.hook_rot_q(apply_rotary(self.q_norm(q), cos_query, sin_query))
        k = self.hook_rot_k(apply_rotary(self.k_norm(k), cos, sin))

        future = self._future_mask(k.shape[1], query_positions, x.device)
        if is_observed(self.hook_attn_scores) or is_observed(self.hook_pattern):
            z = self._explicit_attention(q, k, v, future)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None if future is None else ~future,
                is_causal=query_positions is None,
                enable_gqa=self.repeat_kv_heads > 1,
            ).transpose(1, 2)
        z = self.hook_z(z)
        return z.flatten(-2) @ self.W_O.flatten(0, 1)

    @staticmethod
    def _future_mask(
        n_pos: int, query_positions: Optional[Int[Tensor, " batch"]], device
    ) -> Optional[Bool[Tensor, "batch 1 1 key_pos"]]:
        """Keys after each prompt's query position (``None`` if there are none, or if every
        position queries: then the ordinary causal mask applies)."""
        if query_positions is None or bool((query_positions == n_pos - 1).all()):
            return None
        return (torch.arange(n_pos, device=device) > query_positions[:, None])[:, None, None, :]

    def _explicit_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch pos kv_head d_head"],
        v: Float[Tensor, "batch pos kv_head d_head"],
        future: Optional[Bool[Tensor, "batch 1 1 key_pos"]],
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """Scores and pattern as tensors, so that their hooks can read and edit them."""
        k = k.repeat_interleave(self.repeat_kv_heads, dim=2)
        v = v.repeat_interleave(self.repeat_kv_heads, dim=2)
        scores = einops.einsum(
            q, k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos"
        ) / math.sqrt(self.d_head)
        if future is None:
            n_query, n_key = q.shape[1], k.shape[1]
            future = torch.ones(n_query, n_key, dtype=torch.bool, device=q.device).triu(
                1 + n_key - n_query
            )
        scores = self.hook_attn_scores(scores.masked_fill(future, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1, dtype=stat_dtype(q.dtype)).to(q.dtype))
        return einops.einsum(
            pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head"
        )
