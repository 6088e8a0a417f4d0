"""Qwen3's SwiGLU MLP with TransformerLens names and layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attnres.model.norms import is_observed, make_hook


class GatedMLP(nn.Module):
    """``out = (silu(x W_gate) * (x W_in)) W_out``; no biases.

    Parameters (TransformerLens layouts):
        W_gate, W_in: ``[d_model, d_mlp]``; W_out: ``[d_mlp, d_model]``.

    Hooks:
        hook_pre: ``[batch, pos, d_mlp]``, the gate branch ``x W_gate``.
        hook_pre_linear: ``[batch, pos, d_mlp]``, the up branch ``x W_in``.
        hook_post: ``[batch, pos, d_mlp]``, ``silu(pre) * pre_linear``.
    """

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp))
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.hook_pre = make_hook()
        self.hook_pre_linear = make_hook()
        self.hook_post = make_hook()

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        """Zero bias (TransformerLens compatibility)."""
        return self.W_in.new_zeros(self.W_in.shape[1])

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        """Zero bias (TransformerLens compatibility)."""
        return self.W_out.new_zeros(self.W_out.shape[1])

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # without a gradient, in place where nothing else holds the tensor: the same bits
        # without two fresh [batch, pos, d_mlp] tensors (docs/benchmarks.md); decided
        # before the hook runs, so a hook that removes itself still holds what it saw
        in_place = not torch.is_grad_enabled()
        silu_in_place = in_place and not is_observed(self.hook_pre)
        pre = self.hook_pre(x @ self.W_gate)
        gate = F.silu(pre, inplace=silu_in_place)
        pre_linear = self.hook_pre_linear(x @ self.W_in)
        if in_place and pre_linear.dtype == gate.dtype and pre_linear.shape == gate.shape:
            post = gate.mul_(pre_linear)
        else:
            post = gate * pre_linear
        return self.hook_post(post) @ self.W_out
