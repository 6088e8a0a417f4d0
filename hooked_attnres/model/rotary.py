"""Rotary position embeddings, Qwen3 style (half rotation, ``rotate_half``).

The tables are computed in float32 for every forward pass (as Hugging Face does) and
cast to the activation dtype when applied, so ``model.to(torch.bfloat16)`` never
degrades them.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def rotary_tables(
    n_pos: int, d_head: int, base: float, device: torch.device | str | None = None
) -> tuple[Float[Tensor, "pos d_head"], Float[Tensor, "pos d_head"]]:
    """``(cos, sin)`` for positions ``0 .. n_pos-1``, each ``[pos, d_head]`` float32."""
    return rotary_at(torch.arange(n_pos, device=device), d_head, base)


def rotary_inv_freq(
    d_head: int, base: float, device: torch.device | str | None = None
) -> Float[Tensor, " half_d_head"]:
    """The default-RoPE frequencies ``base ** (-2i / d_head)``, ``[d_head // 2]`` float32."""
    return 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float32, device=device) / d_head))


def rotary_at(
    positions: Int[Tensor, "*shape"], d_head: int, base: float
) -> tuple[Float[Tensor, "*shape d_head"], Float[Tensor, "*shape d_head"]]:
    """``(cos, sin)`` at arbitrary integer positions (e.g. ``[batch, pos]`` position ids of
    left-padded prompts, or the positions after a key-value cache), float32.

    Row ``p`` is bit-identical to row ``p`` of `rotary_tables`, whatever the other
    positions are, so a prompt gets the same rotation padded or alone."""
    angles = positions.to(torch.float32)[..., None] * rotary_inv_freq(
        d_head, base, positions.device
    )
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Float[Tensor, "... d_head"]) -> Float[Tensor, "... d_head"]:
    """``[x1, x2] -> [-x2, x1]`` on the last axis."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "*batch pos d_head"],
    sin: Float[Tensor, "*batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate queries or keys laid out ``[batch, pos, head, d_head]``.

    The tables are ``[pos, d_head]`` (shared by every prompt) or ``[batch, pos, d_head]``
    (e.g. one query position per prompt)."""
    cos = cos.to(x.dtype).unsqueeze(-2)
    sin = sin.to(x.dtype).unsqueeze(-2)
    if torch.is_grad_enabled() or (cos.dim() == x.dim() and cos.shape[0] != x.shape[0]):
        return x * cos + rotate_half(x) * sin
    # the same operations, the two fresh products reused in place (docs/benchmarks.md)
    return torch.mul(x, cos).add_(rotate_half(x).mul_(sin))
