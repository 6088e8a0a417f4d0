"""Qwen3 grouped-query attention with TransformerLens names and layouts.

Order of operations (as in Qwen3 and TransformerLens):
``x -> q, k, v`` (raw projections) ``-> q_norm, k_norm`` (per-head RMSNorm) ``->
rotary -> scores -> causal mask -> softmax (float32) -> z -> W_O``.

The scores and the pattern are materialised only while a hook is attached to
``hook_attn_scores`` or ``hook_pattern`` (``run_with_cache`` attaches them); otherwise
the same computation runs as one fused ``scaled_dot_product_attention`` call, which is
faster and agrees to float rounding (about 1e-7 in float32).

Padding and cached keys (`AttentionContext`): a query never attends to a padding key
(except a padding query to itself, so that no row is empty), padding queries get a zero
pattern and a zero ``z``, and rotary positions count real tokens only (as Hugging Face
does with ``position_ids``). With a `KeyValueCache`, the keys and values of earlier
positions are read from the cache and only the new positions are computed.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attnres._precision import stat_dtype
from hooked_attnres._tl import HookPoint
from hooked_attnres._validation import is_integer, require_integer, some_names
from hooked_attnres.model.norms import (
    RMSNorm,
    is_observed,
    make_hook,
    toggle_hook,
)
from hooked_attnres.model.rotary import apply_rotary
from hooked_attnres.model.weights import WeightsSignature

QKVInputs = tuple[
    Float[Tensor, "batch pos n_heads d_model"],
    Float[Tensor, "batch pos n_kv d_model"],
    Float[Tensor, "batch pos n_kv d_model"],
]


def _project(
    x: Union[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos head d_model"]],
    W: Float[Tensor, "head d_model d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """``x W`` per head; ``x`` is shared by the heads or, with split q/k/v inputs, one copy
    per head."""
    n_heads, d_model, d_head = W.shape
    if x.ndim == 4:
        return (x.unsqueeze(-2) @ W).squeeze(-2)
    flat = W.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    return (x @ flat).unflatten(-1, (n_heads, d_head))


@dataclass
class LayerKeyValues:
    """The rotated keys and the values of one layer for the positions run so far."""

    keys: Optional[Float[Tensor, "batch past n_kv d_head"]] = None
    values: Optional[Float[Tensor, "batch past n_kv d_head"]] = None

    def extend(
        self,
        keys: Float[Tensor, "batch new n_kv d_head"],
        values: Float[Tensor, "batch new n_kv d_head"],
    ) -> tuple[Float[Tensor, "batch key n_kv d_head"], Float[Tensor, "batch key n_kv d_head"]]:
        """Append the new positions; returns the keys and values of every position."""
        if self.keys is not None and self.values is not None:
            if (self.keys.dtype, self.keys.device) != (keys.dtype, keys.device):
                # torch.cat would promote (bfloat16 keys read as float32, silently) or
                # fail later with a message about the attention's inputs
                raise ValueError(
                    f"past_kv_cache holds keys in {self.keys.dtype} on {self.keys.device}, "
                    f"this pass computes them in {keys.dtype} on {keys.device} (the model "
                    "was converted with .to / .half after it filled the cache); start a new "
                    "cache (KeyValueCache.init_cache(model.cfg)) or convert the model back"
                )
            keys = torch.cat((self.keys, keys), dim=1)
            values = torch.cat((self.values, values), dim=1)
        self.keys, self.values = keys, values
        return keys, values


@dataclass
class KeyValueCache:
    """Keys and values of every layer, for incremental decoding (`HookedAttnRes.generate`,
    or ``model(new_tokens, past_kv_cache=cache)``), like TransformerLens's
    ``HookedTransformerKeyValueCache``.

    Only attention looks across positions; routers, norms and the MLP act on each position
    alone, so a new token needs the cached keys and values of earlier positions and
    nothing else (its own depth sources are computed as it runs through the layers).

    Every forward pass that is given the cache appends its positions to it. The keys are
    cached after ``k_norm`` and rotary (``hook_rot_k``), the values as ``hook_v``: hooks
    that edit them while the cache is filled edit what later positions read.

    Attributes:
        layers: one `LayerKeyValues` per layer.
        attention_mask: ``[batch, past]`` (``True`` = real token) over the cached
            positions, or ``None`` while every cached position is real.
        n_past: number of cached positions.
        batch_size: the number of prompts (set by the first pass, then checked).

    A pass that raises half-way (a hook that raises, an intervention that refuses,
    ``KeyboardInterrupt``) leaves the cache as it was before that pass
    (`restored_on_error`), so it can be used again; a cache whose layers disagree with
    ``n_past`` (edited by hand) is refused by the next pass (`check_consistent`), and so
    is a cache that another model filled, or this model with other weights
    (`check_filled_by`: one cache per model and weights), and a pass under other
    interventions (`hooked_attnres.interventions`) than the passes that filled it
    (`note_interventions`).
    """

    layers: list[LayerKeyValues]
    attention_mask: Optional[Bool[Tensor, "batch past"]] = None
    n_past: int = 0
    batch_size: Optional[int] = None
    # a weak reference to the model whose passes computed the cached positions
    _filled_by: Optional[weakref.ReferenceType] = field(default=None, repr=False, compare=False)
    # that model's weights when it filled the first positions
    _weights: Optional[WeightsSignature] = field(default=None, repr=False, compare=False)
    # copies of the token ids of every pass that filled it, oldest first (`filled_with`)
    _inputs: tuple[Tensor, ...] = field(default=(), repr=False, compare=False)
    # the `InterventionTag` s of the passes that filled it (`note_interventions`)
    _interventions: frozenset = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def init_cache(
        cls, cfg: Any, device: Any = None, batch_size: Optional[int] = None
    ) -> KeyValueCache:
        """An empty cache for a model with ``cfg.n_layers`` layers (``cfg`` may also be the
        number of layers). ``device`` is accepted for TransformerLens's signature (the
        cache takes the device of the first keys it stores); ``batch_size``, if given, is
        checked against the inputs."""
        if is_integer(cfg) or isinstance(cfg, bool):  # a bool is refused, not 1 layer
            n_layers = require_integer("n_layers", cfg, 1)
        else:
            n_layers = cfg.n_layers
        return cls([LayerKeyValues() for _ in range(n_layers)], batch_size=batch_size)

    def check_consistent(self) -> None:
        """Raise ``ValueError`` unless every layer holds the keys and values of the
        ``n_past`` cached positions and the mask covers them (a pass reads each layer's
        keys with the rotary positions and mask of ``n_past``; a layer holding other
        positions would give wrong numbers silently)."""
        for index, layer in enumerate(self.layers):
            held = {0 if t is None else t.shape[1] for t in (layer.keys, layer.values)}
            if held != {self.n_past}:
                raise ValueError(
                    f"past_kv_cache is inconsistent: n_past={self.n_past} but layer {index} "
                    f"holds keys and values of {sorted(held)} positions (edited by hand?); "
                    "start a new cache (KeyValueCache.init_cache(model.cfg))"
                )
        mask = self.attention_mask
        if mask is not None and mask.shape[-1] != self.n_past:
            raise ValueError(
                f"past_kv_cache is inconsistent: n_past={self.n_past} but its attention_mask "
                f"covers {mask.shape[-1]} positions; start a new cache "
                "(KeyValueCache.init_cache(model.cfg))"
            )

    def check_filled_by(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if positions are cached and ``model`` with its current
        weights did not compute them: another model's keys and values (the same number of
        layers and shapes, e.g. the wrapped and the vanilla model of one comparison, or a
        ``copy.deepcopy`` of the model), or this model's before its parameters were
        edited, reloaded, converted or processed (`WeightsSignature`), would be read
        silently next to keys and values of the weights it has now."""
        if not self.n_past:
            return
        if self._filled_by is None:
            raise ValueError(
                f"past_kv_cache holds {self.n_past} positions of no recorded model (filled "
                "by hand, or loaded from a file: pickling drops the model); start a new "
                "cache (KeyValueCache.init_cache(model.cfg)), or, if this model computed "
                "them, say so with cache.mark_filled_by(model)"
            )
        if self._filled_by() is not model:
            raise ValueError(
                f"past_kv_cache holds {self.n_past} positions computed by another model "
                "(or a deleted one); each model needs its own cache: "
                "KeyValueCache.init_cache(model.cfg)"
            )
        changed = "no weights recorded" if self._weights is None else self._weights.change(model)
        if changed is not None:
            raise ValueError(
                f"past_kv_cache holds {self.n_past} positions computed with other weights of "
                f"this model ({changed}): its parameters were edited in place, reloaded "
                "(load_state_dict), converted (.to / .half) or processed (process_weights, "
                "fold_layer_norm) after the cache was filled, so its keys and values are of "
                "the old weights; start a new cache (KeyValueCache.init_cache(model.cfg)) and "
                "run the whole sequence again"
            )

    def filled_with(self) -> Optional[tuple[Optional[Tensor], ...]]:
        """What the cached positions were computed from, for a pass that continues them
        (`PassInput.past`): copies of the token ids of every pass that filled the cache,
        oldest first, and its ``attention_mask``; ``None`` where they do not add up to
        ``n_past`` (keys and values filled by hand)."""
        if sum(tokens.shape[1] for tokens in self._inputs) != self.n_past:
            return None
        return (*self._inputs, self.attention_mask)

    def note_filled_with(self, tokens: Tensor) -> None:
        """Record a pass over ``tokens`` ``[batch, pos]`` (copied) that extends the cache
        (`filled_with`)."""
        self._inputs = (*self._inputs, tokens.detach().clone())

    def note_interventions(self, fired: set, n_past: int) -> None:
        """Record the interventions that fired in a pass (``fired``: its
        `hooked_attnres.model.passes.InterventionTag` s) that started on ``n_past`` cached
        positions; raise ``ValueError`` where it continues positions filled under other
        interventions. The cached keys and values are read as they were computed, so such
        a pass gives the full pass with the intervention at the new positions only (or at
        the cached ones only), not the numbers of the hooks attached (measured 0.01-0.6
        logits off, silently, before audit 83). Hooks of your own are not seen (as in
        TransformerLens, they act on the positions of the pass they run in)."""
        now = frozenset(fired)
        if n_past == 0 or now == self._interventions:
            self._interventions = now
            return
        added = sorted(tag.what for tag in now - self._interventions)
        dropped = sorted(tag.what for tag in self._interventions - now)
        differs = []
        if added:
            differs.append(f"without {some_names(added, 3)}, which this pass applies")
        if dropped:
            differs.append(f"with {some_names(dropped, 3)}, which this pass does not apply")
        again = ""
        if set(added) & set(dropped):
            again = (
                " (interventions of one description differ where a tensor they read (a value "
                "or a mask) holds other contents than the cached positions were computed "
                "with: another dtype, shape, device or bits, e.g. a tensor edited in place "
                "since)"
            )
        raise ValueError(
            f"past_kv_cache holds {n_past} positions computed {'; and '.join(differs)}{again}: a "
            "pass with a key-value cache reads the cached keys and values as they were "
            "computed, so its numbers would be the full pass's with the interventions at "
            "the new positions only (or at the cached ones only), not those of the hooks "
            "attached now. Attach the same interventions (the same hook list, e.g. "
            "with model.hooks(fwd_hooks=hooks): model.generate(...)) to every pass that "
            "fills the cache, or start a new cache under them "
            "(KeyValueCache.init_cache(model.cfg)); to intervene at some positions only, "
            "run the whole sequence without a key-value cache with positions=..."
        )

    def mark_filled_by(self, model: nn.Module) -> None:
        """Record ``model``, with its current weights, as the model that computed the cached
        positions (`check_filled_by`); a pass on an empty cache records its model."""
        self._filled_by = weakref.ref(model)
        self._weights = WeightsSignature(model)

    def __getstate__(self) -> dict[str, Any]:
        # a weak reference cannot be pickled (torch.save of a cache raised); a loaded
        # cache names no model, so check_filled_by refuses it until mark_filled_by
        return {**self.__dict__, "_filled_by": None, "_weights": None}

    def __copy__(self) -> KeyValueCache:
        # copies (unlike pickles) stay in this process: they keep the filling model
        new = KeyValueCache.__new__(KeyValueCache)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> KeyValueCache:
        kept = ("_filled_by", "_weights")
        state = {k: v for k, v in self.__dict__.items() if k not in kept}
        new = KeyValueCache.__new__(KeyValueCache)
        new.__dict__.update(copy.deepcopy(state, memo))
        new._filled_by, new._weights = self._filled_by, self._weights
        return new

    @contextmanager
    def restored_on_error(self) -> Iterator[None]:
        """Undo the additions of a pass that raises (any exception, also
        ``KeyboardInterrupt``): the layers, mask, length and batch size are put back as
        they were when the block was entered, and the exception propagates. (A pass
        extends the layers one by one, so without this an interrupted pass would leave
        the early layers one chunk longer than the rest and ``n_past`` already advanced:
        the next pass would read wrong rotary positions and duplicated keys silently.)"""
        fields = (
            "attention_mask",
            "n_past",
            "batch_size",
            "_filled_by",
            "_weights",
            "_inputs",
            "_interventions",
        )
        saved = [getattr(self, name) for name in fields]
        layers = [(layer.keys, layer.values) for layer in self.layers]
        try:
            yield
        except BaseException:
            for name, value in zip(fields, saved, strict=True):
                setattr(self, name, value)
            for layer, (keys, values) in zip(self.layers, layers, strict=True):
                layer.keys, layer.values = keys, values
            raise


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares.

    Attributes:
        cos, sin: rotary tables of the positions run in this pass, ``[pos, d_head]``
            (shared by every prompt) or ``[batch, pos, d_head]`` (position ids per prompt).
        n_past: positions before this pass (in the key-value cache); query ``i`` of this
            pass is key ``n_past + i``.
        key_is_pad: ``[batch, n_past + pos]``, padding keys that real queries must not
            see, or ``None`` when no real query comes after a padding key.
        query_is_pad: ``[batch, pos]``, padding queries (a zero query before the
            scores, zero pattern and ``z``), or ``None``.
        cache: the `KeyValueCache` to read and extend, or ``None``.
        padding_keys: ``[batch, n_past + pos]``, every padding key (also those that only
            later, causally blocked, queries would see), or ``None`` without padding.
            Their values and keys are zeroed for the product (both paths): a
            blocked key has weight 0, and ``0 * nan`` would carry a non-finite padding
            position into real ones.
    """

    cos: Float[Tensor, "*batch pos d_head"]
    sin: Float[Tensor, "*batch pos d_head"]
    n_past: int = 0
    key_is_pad: Optional[Bool[Tensor, "batch key"]] = None
    query_is_pad: Optional[Bool[Tensor, "batch pos"]] = None
    cache: Optional[KeyValueCache] = None
    padding_keys: Optional[Bool[Tensor, "batch key"]] = None

    def layer_cache(self, layer: int) -> Optional[LayerKeyValues]:
        return None if self.cache is None else self.cache.layers[layer]

    def blocked(
        self, n_query: int, n_key: int, query_positions: Optional[Int[Tensor, " batch"]], device
    ) -> Optional[Bool[Tensor, "batch 1 query key"]]:
        """Which keys each query must not see (``True`` = blocked); ``None`` for the plain
        square causal mask (no cache, no padding, every position queries)."""
        if query_positions is None and self.key_is_pad is None and n_query == n_key:
            return None
        if query_positions is None:
            query_index = torch.arange(n_query, device=device)[None] + (n_key - n_query)
        else:
            query_index = query_positions[:, None] + self.n_past
        keys = torch.arange(n_key, device=device)
        blocked = keys > query_index[..., None]
        if self.key_is_pad is not None:
            own = keys == query_index[..., None]
            blocked = blocked | (self.key_is_pad[:, None, :] & ~own)
        return blocked[:, None]

    def pad_queries(
        self, query_positions: Optional[Int[Tensor, " batch"]]
    ) -> Optional[Bool[Tensor, "batch query"]]:
        """Padding queries of this pass (gathered at ``query_positions`` if given)."""
        if self.query_is_pad is None:
            return None
        if query_positions is None:
            return self.query_is_pad
        rows = torch.arange(self.query_is_pad.shape[0], device=self.query_is_pad.device)
        return self.query_is_pad[rows, query_positions][:, None]


class Attention(nn.Module):
    """Causal grouped-query self-attention with per-head q/k RMSNorm and RoPE.

    Parameters (TransformerLens layouts):
        W_Q: ``[n_heads, d_model, d_head]``; W_O: ``[n_heads, d_head, d_model]``;
        _W_K, _W_V: ``[n_key_value_heads, d_model, d_head]`` (the properties ``W_K`` /
        ``W_V`` repeat them to ``n_heads`` with ``repeat_interleave``, as
        ``HookedTransformer`` did and TransformerLens 4.3's ``QK`` / ``OV`` /
        ``tl_parameters`` do; ``TransformerBridge``'s ``attn.W_K`` keeps ``n_kv`` heads,
        ``_W_K`` here);
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
        hook_q_input: ``[batch, pos, n_heads, d_model]``, hook_k_input / hook_v_input:
            ``[batch, pos, n_kv, d_model]``: the per-head copies of the attention input
            (before ``ln1``); only while ``model.set_use_split_qkv_input(True)``. Fired by
            the block after its own ``blocks.{l}.hook_q_input`` (TransformerLens's two
            names for the same tensor).
        hook_result: ``[batch, pos, n_heads, d_model]``, each head's output ``z[h] W_O[h]``
            (summing to the attention output); only while
            ``model.set_use_attn_result(True)``.
    """

    hook_result: HookPoint  # only while uses_attn_result (set_attn_result)

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

    @property
    def uses_attn_result(self) -> bool:
        """Whether ``hook_result`` exists (``model.set_use_attn_result(True)``)."""
        return "hook_result" in self._modules

    def set_attn_result(self, enabled: bool) -> None:
        """Create or remove ``hook_result`` (the model's `set_use_attn_result` also
        refreshes its hook dictionary)."""
        toggle_hook(self, "hook_result", enabled, pos_dim=-3)

    def forward(
        self,
        x: Union[Float[Tensor, "batch pos d_model"], QKVInputs],
        context: AttentionContext,
        query_positions: Optional[Int[Tensor, " batch"]] = None,
        layer_cache: Optional[LayerKeyValues] = None,
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Attend from every position (``query_pos = pos``), or, with ``query_positions``,
        only from one position per prompt (``query_pos = 1``; the keys and values still
        cover every position up to it). The hooks on queries, scores, pattern and ``z``
        then see one query position.

        Args:
            x: the normalised input ``[batch, pos, d_model]``, or (split q/k/v inputs) the
                normalised per-head inputs of the queries, keys and values.
            context: rotary tables, padding and the cache position of this pass.
            query_positions: ``[batch]``, one query position per prompt, or ``None``.
            layer_cache: this layer's cached keys and values (read, then extended).
        """
        q_in, k_in, v_in = x if isinstance(x, tuple) else (x, x, x)
        cos, sin = context.cos, context.sin
        cos_query, sin_query = cos, sin
        if query_positions is not None:
            rows = torch.arange(q_in.shape[0], device=q_in.device)
            query_positions = query_positions.to(q_in.device)
            q_in = q_in[rows, query_positions].unsqueeze(1)
            if cos.ndim == 3:
                cos_query = cos[rows, query_positions].unsqueeze(1)
                sin_query = sin[rows, query_positions].unsqueeze(1)
            else:
                cos_query = cos[query_positions].unsqueeze(1)
                sin_query = sin[query_positions].unsqueeze(1)
        q = self.hook_q(_project(q_in, self.W_Q))
        k = self.hook_k(_project(k_in, self._W_K))
        v = self.hook_v(_project(v_in, self._W_V))
        q = self.hook_rot_q(apply_rotary(self.q_norm(q), cos_query, sin_query))
        k = self.hook_rot_k(apply_rotary(self.k_norm(k), cos, sin))
        if layer_cache is not None:
            k, v = layer_cache.extend(k, v)

        blocked = context.blocked(q.shape[1], k.shape[1], query_positions, q.device)
        pad_queries = context.pad_queries(query_positions)
        padding_keys = context.padding_keys
        if padding_keys is not None:
            # weight 0 on a padding key must not read its value: a padding position's
            # sources can be nan (a hook's edit; at eps 0 they were 0 / 0 before
            # `padding_eps`), and 0 * nan would reach real queries
            padding_keys = padding_keys.to(v.device)[:, :, None, None]
            v = v.masked_fill(padding_keys, 0.0)
            # and its key (the fused call adds its mask to the scores; a padding query's
            # own score must be finite for the backward, below)
            k = k.masked_fill(padding_keys, 0.0)
        if pad_queries is not None:
            # a padding query's row is zeroed below, but its query can be nan (a hook's
            # edit; at eps 0 it was 0 / 0 before `padding_eps`), and the backward of its
            # scores (zero gradient times a nan query, key or pattern) would carry nan
            # into the gradients of real keys and values
            q = q.masked_fill(pad_queries.to(q.device)[..., None, None], 0.0)
        if is_observed(self.hook_attn_scores) or is_observed(self.hook_pattern):
            z = self._explicit_attention(q, k, v, blocked, pad_queries)
        else:
            if blocked is not None and not bool(blocked.any()):
                blocked, is_causal = None, False
            else:
                is_causal = blocked is None
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None if blocked is None else ~blocked,
                is_causal=is_causal,
                enable_gqa=self.repeat_kv_heads > 1,
            ).transpose(1, 2)
        if pad_queries is not None:
            # zero (the explicit pattern's row already is): also a zero gradient into the
            # product, whose backward would multiply a padding row's nan gradient (a
            # hook's nan) by the keys' and values' zero weight
            z = z.masked_fill(pad_queries[..., None, None], 0.0)
        z = self.hook_z(z)
        if self.uses_attn_result:
            result = einops.einsum(
                z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"
            )
            return self.hook_result(result).sum(dim=-2)
        return z.flatten(-2) @ self.W_O.flatten(0, 1)

    def _explicit_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch key_pos kv_head d_head"],
        v: Float[Tensor, "batch key_pos kv_head d_head"],
        blocked: Optional[Bool[Tensor, "batch 1 query_pos key_pos"]],
        pad_queries: Optional[Bool[Tensor, "batch query_pos"]],
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """Scores and pattern as tensors, so that their hooks can read and edit them."""
        k = k.repeat_interleave(self.repeat_kv_heads, dim=2)
        v = v.repeat_interleave(self.repeat_kv_heads, dim=2)
        scores = einops.einsum(
            q, k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos"
        ) / math.sqrt(self.d_head)
        if blocked is None:
            n_query, n_key = q.shape[1], k.shape[1]
            blocked = torch.ones(n_query, n_key, dtype=torch.bool, device=q.device).triu(
                1 + n_key - n_query
            )
        scores = self.hook_attn_scores(scores.masked_fill(blocked, float("-inf")))
        pattern = scores.softmax(dim=-1, dtype=stat_dtype(q.dtype)).to(q.dtype)
        if pad_queries is not None:
            pattern = pattern.masked_fill(pad_queries[:, None, :, None], 0.0)
        pattern = self.hook_pattern(pattern)
        return einops.einsum(
            pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head"
        )
