"""Key names and tensor layouts: Hugging Face Qwen3 <-> HookedAttnRes.

One table maps every parameter both ways, so that import (``from_hf_qwen3``, the
``qwen3_attnres`` reader) and export (``save_pretrained(format="qwen3_attnres")``)
cannot drift apart. Hugging Face stores ``nn.Linear`` weights ``[out, in]``;
HookedAttnRes stores TransformerLens layouts (``W_Q [n_heads, d_model, d_head]``,
``W_in [d_model, d_mlp]``, ...).

Every conversion is a *view* (transpose, reshape, permute): a model loaded from a
safetensors file shares the file's memory map (copy-on-write) instead of copying the
weights, so loading takes about as long and as much memory as ``transformers`` does.
Such parameters are non-contiguous tensors in TransformerLens shapes; the forward pass
multiplies them without copies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import einops
from torch import Tensor

from hooked_attnres.config import HookedAttnResConfig

Convert = Callable[[Tensor, HookedAttnResConfig], Tensor]


def _same(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return t


def _transpose(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return t.T


def _q_in(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return einops.rearrange(t, "(head d_head) d_model -> head d_model d_head", d_head=cfg.d_head)


_kv_in = _q_in


def _q_out(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return einops.rearrange(t, "head d_model d_head -> (head d_head) d_model")


_kv_out = _q_out


def _o_in(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return einops.rearrange(t, "d_model (head d_head) -> head d_head d_model", d_head=cfg.d_head)


def _o_out(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return einops.rearrange(t, "head d_head d_model -> d_model (head d_head)")


def _query_in(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return t.reshape(-1)


def _query_out(t: Tensor, cfg: HookedAttnResConfig) -> Tensor:
    return t.reshape(1, -1)


@dataclass(frozen=True)
class KeyRule:
    """``ours`` <-> ``hf`` (``{i}`` = layer) with the layout conversions both ways."""

    ours: str
    hf: str
    to_ours: Convert = _same
    to_hf: Convert = _same


GLOBAL_RULES = (
    KeyRule("embed.W_E", "model.embed_tokens.weight"),
    KeyRule("ln_final.w", "model.norm.weight"),
    KeyRule("unembed.W_U", "lm_head.weight", _transpose, _transpose),
)

LAYER_RULES = (
    KeyRule("blocks.{i}.ln1.w", "model.layers.{i}.input_layernorm.weight"),
    KeyRule("blocks.{i}.ln2.w", "model.layers.{i}.post_attention_layernorm.weight"),
    KeyRule("blocks.{i}.attn.W_Q", "model.layers.{i}.self_attn.q_proj.weight", _q_in, _q_out),
    KeyRule("blocks.{i}.attn._W_K", "model.layers.{i}.self_attn.k_proj.weight", _kv_in, _kv_out),
    KeyRule("blocks.{i}.attn._W_V", "model.layers.{i}.self_attn.v_proj.weight", _kv_in, _kv_out),
    KeyRule("blocks.{i}.attn.W_O", "model.layers.{i}.self_attn.o_proj.weight", _o_in, _o_out),
    KeyRule("blocks.{i}.attn.q_norm.w", "model.layers.{i}.self_attn.q_norm.weight"),
    KeyRule("blocks.{i}.attn.k_norm.w", "model.layers.{i}.self_attn.k_norm.weight"),
    KeyRule(
        "blocks.{i}.mlp.W_gate", "model.layers.{i}.mlp.gate_proj.weight", _transpose, _transpose
    ),
    KeyRule("blocks.{i}.mlp.W_in", "model.layers.{i}.mlp.up_proj.weight", _transpose, _transpose),
    KeyRule(
        "blocks.{i}.mlp.W_out", "model.layers.{i}.mlp.down_proj.weight", _transpose, _transpose
    ),
)

# The routers of the public qwen3_attnres format (cumulative layout).
ROUTER_RULES = tuple(
    rule
    for router, prefix in (("attn_res", "attn_res"), ("mlp_res", "mlp_res"))
    for rule in (
        KeyRule(
            f"blocks.{{i}}.{router}.query",
            f"model.layers.{{i}}.{prefix}_proj.weight",
            _query_in,
            _query_out,
        ),
        KeyRule(f"blocks.{{i}}.{router}.key_norm.w", f"model.layers.{{i}}.{prefix}_norm.weight"),
        KeyRule(f"blocks.{{i}}.{router}.recency_bias", f"model.layers.{{i}}.{prefix}_bias"),
    )
)


def _compile(rules: tuple[KeyRule, ...], side: str) -> list[tuple[re.Pattern, KeyRule]]:
    out = []
    for rule in rules:
        template = getattr(rule, side)
        pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(f"^{pattern}$"), rule))
    return out


class KeyMap:
    """Translate parameter names and tensors between the two layouts.

    Args:
        cfg: the model config (``d_head`` is needed to split heads).
        routers: include the qwen3_attnres router keys.
    """

    def __init__(self, cfg: HookedAttnResConfig, routers: bool = False):
        self.cfg = cfg
        rules = GLOBAL_RULES + LAYER_RULES + (ROUTER_RULES if routers else ())
        self._from_hf = _compile(rules, "hf")
        self._from_ours = _compile(rules, "ours")

    @staticmethod
    def _match(table, key: str) -> Optional[tuple[KeyRule, Optional[str]]]:
        for pattern, rule in table:
            found = pattern.match(key)
            if found:
                return rule, found.groupdict().get("i")
        return None

    def our_name(self, hf_key: str) -> Optional[str]:
        """Our parameter name for a Hugging Face key (``None`` if it has no counterpart)."""
        hit = self._match(self._from_hf, hf_key)
        return None if hit is None else hit[0].ours.replace("{i}", hit[1] or "")

    def hf_name(self, our_key: str) -> Optional[str]:
        hit = self._match(self._from_ours, our_key)
        return None if hit is None else hit[0].hf.replace("{i}", hit[1] or "")

    def to_ours(self, hf_key: str, tensor: Tensor) -> tuple[str, Tensor]:
        hit = self._match(self._from_hf, hf_key)
        if hit is None:
            raise KeyError(hf_key)
        rule, layer = hit
        return rule.ours.replace("{i}", layer or ""), rule.to_ours(tensor, self.cfg)

    def to_hf(self, our_key: str, tensor: Tensor) -> tuple[str, Tensor]:
        hit = self._match(self._from_ours, our_key)
        if hit is None:
            raise KeyError(our_key)
        rule, layer = hit
        return rule.hf.replace("{i}", layer or ""), rule.to_hf(tensor, self.cfg)

    def hf_shapes(
        self, our_shapes: dict[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The Hugging Face name and shape expected for each of our parameters."""
        import torch

        for name, shape in our_shapes.items():
            hf_key = self.hf_name(name)
            if hf_key is not None:
                yield hf_key, tuple(self.to_hf(name, torch.empty(shape, device="meta"))[1].shape)
