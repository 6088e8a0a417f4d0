"""`HookedAttnRes`: a Qwen3 decoder with Block AttnRes depth routing and TL hooks.

Read top to bottom: embedding -> ``n_layers`` x `AttnResBlock` (each threads a
`DepthState`) -> final router (kimi / full layouts) -> ``ln_final`` -> unembedding.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attnres._precision import stat_dtype
from hooked_attnres._validation import (
    is_integer,
    require_bool,
    require_choice,
    require_integer,
    require_token_ids,
    require_token_mask,
)
from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.model.attention import AttentionContext, KeyValueCache
from hooked_attnres.model.block import AttnResBlock
from hooked_attnres.model.depth import (
    UNRECORDED,
    DepthState,
    RouterSite,
    RoutingLayout,
    SiteLike,
    gather_positions,
    sublayer_index,
)
from hooked_attnres.model.generation import GenerationMixin
from hooked_attnres.model.hooked_root import HookedModule, guarded_pass
from hooked_attnres.model.norms import (
    RMSNorm,
    global_hooks_attached,
    has_module_hooks,
    is_observed,
    make_hook,
)
from hooked_attnres.model.passes import (
    PassInput,
    continuation,
    continued,
    in_pass,
    padding_of,
    pass_extent,
    same_padding,
)
from hooked_attnres.model.rotary import rotary_at
from hooked_attnres.model.routing import DepthRouter, SharedSums, normalized_route
from hooked_attnres.model.tl_methods import TLMethodsMixin
from hooked_attnres.model.tokenization import TokenizerMixin
from hooked_attnres.model.weights import TiedUnembed, Unembed, WeightsMixin, WeightsSignature

RETURN_TYPES = ("logits", "loss", "both", None)
RESIDUAL_WRITERS = ("W_O", "W_out")  # parameters whose output is added to the stream


def _check_same_padding(
    state: DepthState, mask: Optional[Bool[Tensor, "batch pos"]], where: str
) -> None:
    """Refuse to resume a state with other padding than the pass that made it recorded
    (`DepthState.padding`), and a state built by hand, which records none, without an
    explicit ``attention_mask``: padding moves the rotary positions and the keys a query
    attends to, so a guess would silently give other logits."""
    made_with = state.padding
    if made_with is UNRECORDED:
        if mask is not None:
            return  # the caller says which padding the hand-built state has
        raise ValueError(
            f"{where}: this DepthState was built by hand (DepthState(...)) and does not "
            "record the padding of the pass that made it, which would change the logits. "
            "Pass attention_mask= (that pass's mask; torch.ones(batch, pos) if it had no "
            "padding), or derive the state with dataclasses.replace(state, ...) from a "
            "depth_states / stop_at_layer state, which keeps its record"
        )
    if same_padding(made_with, mask):
        return
    made = "without padding" if made_with is None else "with an attention_mask marking padding"
    now = "none" if padding_of(mask) is None else "a different one"
    raise ValueError(
        f"{where}: this DepthState came from a pass {made}, and this call's attention_mask "
        f"is {now}; pass the attention_mask= of the depth_states / stop_at_layer call that "
        "made the state (for text, the mask of model.to_tokens_and_mask(texts) with the same "
        "prepend_bos and padding_side; padding moves rotary positions and the keys a query "
        "attends to)"
    )


def _hooked_block_skipped(block: AttnResBlock, but: str, instead: str) -> ValueError:
    """The refusal of a pass that would run half of ``block`` while a PyTorch hook is
    registered on it (the hook runs when the whole layer module is called): ``but`` says
    which pass, ``instead`` what to do."""
    resid_post = str(block.hook_resid_post.name)  # the hook names are the module paths
    return ValueError(
        f"a PyTorch hook is registered on {resid_post.rsplit('.', 1)[0]} (the AttnResBlock "
        f"module), which runs when the whole layer runs, but {but}, so the hook would not "
        f"run. {instead}, or hook one of the layer's hook points instead (e.g. {resid_post})"
    )


def _refuse_model_class(cls: type, method: str, function: str, kwargs: dict) -> None:
    """Refuse ``model_class=`` given to the classmethod ``method`` of ``cls``, which passes
    ``cls`` itself to ``function`` (Python's own error was "got multiple values for keyword
    argument 'model_class'")."""
    if "model_class" in kwargs:
        raise TypeError(
            f"{cls.__name__}.{method} loads its own class ({cls.__name__}; a subclass's "
            f"{method} builds that subclass), so it takes no model_class=; to build another "
            f"class call {function}(..., model_class=...) instead"
        )


class Output(NamedTuple):
    """What ``forward(..., return_type="both")`` returns."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Union[Float[Tensor, ""], Float[Tensor, "batch pos_minus_1"]]


class Embed(nn.Module):
    """Token embedding ``W_E [d_vocab, d_model]``."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        # F.embedding, not W_E[tokens]: its CPU backward is deterministic, while the
        # accumulating index_put_ behind indexing is not with several threads
        return torch.nn.functional.embedding(tokens, self.W_E)


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Union[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]] = None,
    per_token: bool = False,
) -> Union[Float[Tensor, ""], Float[Tensor, "batch pos_minus_1"]]:
    """Next-token cross-entropy; a prediction counts only if both its input token and its
    target are real (``attention_mask == 1``; padding is excluded).

    Raises:
        ValueError: fewer than two positions, or no prediction with two real tokens (the
            mean would be undefined).
    """
    if tokens.shape[-1] < 2:
        raise ValueError(
            f"a next-token loss needs at least two positions, got {tokens.shape[-1]}; use "
            "return_type='logits' for a single token"
        )
    log_probs = logits[:, :-1].to(stat_dtype(logits.dtype)).log_softmax(dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    if attention_mask is None:
        return losses if per_token else losses.mean()
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    n_kept = int(keep.sum())
    if n_kept == 0:
        raise ValueError(
            "the loss has no valid prediction: no prompt has two consecutive real tokens "
            "(attention_mask == 1); use return_type='logits'"
        )
    # where, not a product: a padding position's logits may be nan (a hook's edit,
    # docs/hooks.md)
    # and nan * 0 is nan
    kept = torch.where(keep, losses, losses.new_zeros(()))
    return kept if per_token else kept.sum() / n_kept


class HookedAttnRes(GenerationMixin, TLMethodsMixin, TokenizerMixin, WeightsMixin, HookedModule):
    """Qwen3 + Block Attention Residuals, hookable like a TransformerLens model.

    Hook points (see ``docs/hooks.md`` for the full table and shapes):
        ``hook_embed``; per layer ``blocks.{l}.hook_resid_pre/mid/post``,
        ``blocks.{l}.{attn_res,mlp_res}.hook_sources/hook_logits/hook_weights/hook_out``,
        ``blocks.{l}.ln1/ln2.hook_scale/hook_normalized``,
        ``blocks.{l}.attn.hook_q/k/v/rot_q/rot_k/attn_scores/pattern/z``,
        ``blocks.{l}.hook_attn_out``, ``blocks.{l}.mlp.hook_pre/pre_linear/post``,
        ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_committed_block`` (layers that end a
        block); ``final_res.*`` (kimi / full layouts); ``ln_final.hook_scale/normalized``.

    Args:
        cfg: the model configuration (or a dict of its fields).
        tokenizer: an optional Hugging Face tokenizer (enables string inputs).
    """

    def __init__(self, cfg: Union[HookedAttnResConfig, dict], tokenizer=None):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedAttnResConfig.from_dict(cfg)
        if not isinstance(cfg, HookedAttnResConfig):
            raise TypeError(
                f"cfg must be a HookedAttnResConfig or a dict, got {type(cfg).__name__}"
            )
        # a private copy: folding or converting this model edits its config, which must
        # not reach another model built from the same object
        cfg = self._cfg = copy.copy(cfg)
        self.routing_layout = RoutingLayout.from_config(cfg)
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = make_hook()
        self.blocks = nn.ModuleList(
            AttnResBlock(cfg, layer, self.routing_layout) for layer in range(cfg.n_layers)
        )
        if self.routing_layout.has_final_router:
            self.final_res = DepthRouter(cfg.d_model, cfg.eps, cfg.attnres_recency_bias)
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed: Union[Unembed, TiedUnembed] = (
            TiedUnembed(self.embed)
            if cfg.tie_word_embeddings
            else Unembed(cfg.d_model, cfg.d_vocab)
        )
        self.to(device=cfg.device, dtype=cfg.dtype)
        # after the conversion: a recency bias of 0.1 in a float64 model is 0.1, not the
        # float32 0.100000001490116 it was when filled before (review 186); the random
        # matrices are drawn in float32 either way, so seeded weights are unchanged
        self.init_weights()
        self._create_optional_hooks()  # cfg.use_attn_result etc. (TransformerLens flags)
        self.setup()
        self.set_tokenizer(tokenizer)
        self.eval()

    @property
    def cfg(self) -> HookedAttnResConfig:
        return self._cfg

    # --- initialisation ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, ``initializer_range``) matrices, except the two matrices that write
        to the stream (``W_O``, ``W_out``), whose std is divided by ``sqrt(2 * n_layers)``
        (GPT-2 / nanoGPT; without it, 8-layer models barely learn the probe tasks); unit
        norm gains; pseudo-queries per ``attnres_query_init``; recency biases at
        ``attnres_recency_bias``.

        With ``cfg.seed`` set, a private generator makes the weights a function of the
        seed alone (the global RNG is left untouched). The matrices are drawn in float32
        whatever ``cfg.dtype``; the gains and biases are filled in the model's dtype (a
        recency bias of 0.1 is 0.1 in a float64 model).
        """
        cfg = self.cfg
        if self.embed.W_E.is_meta:  # an empty shell that a loader will fill
            return
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator().manual_seed(cfg.seed)
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                param.fill_(1.0)
            elif leaf == "recency_bias":  # exists only when the config sets a bias
                param.fill_(float(cfg.attnres_recency_bias or 0.0))
            elif leaf == "query":
                if cfg.attnres_query_init == "zero":
                    param.zero_()
                else:
                    param.copy_(
                        torch.randn(param.shape, generator=generator) * cfg.initializer_range
                    )
            else:
                std = cfg.initializer_range
                if leaf in RESIDUAL_WRITERS:
                    std = std / math.sqrt(2 * cfg.n_layers)
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    # --- device and dtype -------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """Every dtype or device change (``to``, ``half``, ``bfloat16``, ``float``,
        ``double``, ``cuda``, ``cpu``, ...) goes through here: keep ``cfg.device`` and
        ``cfg.dtype`` equal to the parameters'."""
        out = super()._apply(fn, recurse)
        reference = self.embed.W_E
        self._cfg.device = str(reference.device)
        self._cfg.dtype = reference.dtype
        return out

    # --- routing metadata -------------------------------------------------------------
    def sites(self, kinds: Union[None, str, Sequence[str]] = None) -> list[RouterSite]:
        """Every router's `RouterSite` in forward order (the final router last), or only
        those of some kinds (``"attn_res"``, ``"mlp_res"``, ``"final_res"``)."""
        return self.routing_layout.sites(kinds)

    def site(self, layer: Optional[int], kind: str) -> RouterSite:
        """The `RouterSite` of ``(layer, kind)`` (``(None, "final_res")`` for the final
        router; negative layers count from the end), checked against the layout."""
        return self.routing_layout.site(layer, kind)

    def source_labels(
        self, site: Union[SiteLike, int, None], router: Optional[str] = None
    ) -> list[str]:
        """Names of the sources a router reads (the ``n_sources`` axis), by `RouterSite` or
        by ``(layer, router)``.

        ``router`` is ``"attn_res"``, ``"mlp_res"`` or ``"final_res"`` (``layer=None``).
        Example (cumulative, 8 layers, 4 blocks, layer 5):
        ``["embedding", "block_1", "block_2", "current"]``.
        """
        return self.routing_layout.labels(self.routing_layout.check(site, router))

    def source_families(
        self, site: Union[SiteLike, int, None], router: Optional[str] = None
    ) -> dict[str, list[int]]:
        """The seed paper's source families as index lists (a partition of the sources).

        ``embedding`` = index 0, ``current`` = last, ``prev_completed`` = second to last
        (when there are three or more sources), ``older`` = everything in between.
        Some indices hold identical tensors: at layer 0 of the cumulative layout
        ``embedding`` and ``current`` are both the embedding, and at a block-start
        attention router of the cumulative layout ``prev_completed`` equals ``current``.
        """
        return self.routing_layout.families(self.routing_layout.check(site, router))

    def routers(self) -> list[tuple[Optional[int], str]]:
        """Every ``(layer, router)`` pair in forward order; ``(None, "final_res")`` last
        (`sites` gives the same as `RouterSite` objects)."""
        return self.routing_layout.routers()

    def router(self, site: Union[SiteLike, int, None], router: Optional[str] = None) -> DepthRouter:
        """The `DepthRouter` module of a site (or ``(layer, router)``)."""
        module = self.mod_dict[self.routing_layout.check(site, router).prefix]
        assert isinstance(module, DepthRouter)
        return module

    def norm_at(self, sublayer: int) -> RMSNorm:
        """The `RMSNorm` that reads the input of ``sublayer`` (`RouterSite.sublayer`'s
        numbering: ``2 * layer`` attention, ``2 * layer + 1`` MLP, ``2 * n_layers`` the
        unembedding): ``ln1``, ``ln2`` or ``ln_final``."""
        layer, is_mlp = divmod(require_integer("sublayer", sublayer, minimum=0), 2)
        if layer == self.cfg.n_layers and not is_mlp:
            return self.ln_final
        if layer >= self.cfg.n_layers:
            raise ValueError(f"sublayer must be in [0, {2 * self.cfg.n_layers}], got {sublayer}")
        block = self.blocks[layer]
        return block.ln2 if is_mlp else block.ln1

    def norm_after(self, site: Union[SiteLike, int, None], router: Optional[str] = None) -> RMSNorm:
        """The `RMSNorm` that reads a router's output (its only consumer): ``ln1`` after
        an ``attn_res`` router, ``ln2`` after ``mlp_res``, ``ln_final`` after the final
        router (`norm_at` of its sublayer)."""
        return self.norm_at(self.routing_layout.check(site, router).sublayer)

    def router_hook_name(self, layer: Optional[int], router: str, hook: str) -> str:
        """E.g. ``(3, "attn_res", "weights") -> "blocks.3.attn_res.hook_weights"``
        (the same as ``model.site(3, "attn_res").hook("weights")``)."""
        return self.site(layer, router).hook(hook)

    # --- input handling ---------------------------------------------------------------
    def _validate_tokens(self, tokens, n_past: int = 0) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor):
            raise TypeError(
                "input must be a string, a list of strings, a [batch, pos] integer tensor of "
                f"token ids, or (with start_at_layer) a DepthState; got {type(tokens).__name__}"
            )
        require_token_ids(tokens, self.cfg.d_vocab)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be [batch, pos] (or [pos]), got shape {tuple(tokens.shape)}"
            )
        if tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must not be empty, got shape {tuple(tokens.shape)}")
        if n_past + tokens.shape[1] > self.cfg.n_ctx:
            cached = f" after {n_past} cached positions" if n_past else ""
            raise ValueError(
                f"sequence length {tokens.shape[1]}{cached} exceeds n_ctx={self.cfg.n_ctx}; "
                "truncate the input or build the model with a larger n_ctx"
            )
        return tokens.to(self.embed.W_E.device, torch.long)

    def _validate_state(self, state, layer: int, sublayer: str = "attn") -> DepthState:
        entering = f"layer {layer}" if sublayer == "attn" else f"the MLP sublayer of layer {layer}"
        where = f"start_at_layer={layer}" if sublayer == "attn" else entering
        if not isinstance(state, DepthState):
            raise TypeError(
                f"{where} needs a DepthState as input (e.g. from "
                f"model.depth_states(tokens)), got {type(state).__name__}"
            )
        n_blocks, committed = self.routing_layout.state_signature(layer, sublayer)
        if len(state.blocks) != n_blocks or state.current_is_committed != committed:
            raise ValueError(
                f"this DepthState ({len(state.blocks)} blocks, current_is_committed="
                f"{state.current_is_committed}) cannot enter {entering}; the "
                f"{self.cfg.attnres_layout!r} layout expects {n_blocks} blocks and "
                f"current_is_committed={committed}"
            )
        made_for = state.entering_sublayer
        expected = sublayer_index(layer, sublayer)
        if made_for is not None and made_for != expected:
            raise ValueError(
                f"this DepthState enters sublayer {made_for} (it came from depth_states or "
                f"stop_at_layer) and cannot enter {entering} (sublayer {expected}); use "
                f"states[{expected}] of depth_states(tokens, sublayers=True)"
            )
        if sublayer == "attn":
            return self._private_current(state, layer)
        return state

    def _private_current(self, state: DepthState, layer: int) -> DepthState:
        """``state`` about to enter ``layer``'s attention, with a copy of its current source
        if ``hook_resid_pre`` is watched: the hook is handed that tensor, and an in-place
        edit (``act += v``) must not reach a state someone else holds (a cached state
        starts other runs; `depth_states` returns the states its own pass ran through)."""
        if layer < self.cfg.n_layers and is_observed(self.blocks[layer].hook_resid_pre):
            return dataclasses.replace(state, current=state.current.clone())
        return state

    def _validate_logit_positions(
        self, positions, state: DepthState, attention_mask: Optional[Bool[Tensor, "batch pos"]]
    ) -> Int[Tensor, " batch"]:
        batch, n_pos = state.current.shape[:2]
        if (
            not isinstance(positions, Tensor)
            or positions.is_floating_point()
            or positions.dtype == torch.bool
        ):
            raise TypeError(f"logit_positions must be an integer tensor [batch], got {positions!r}")
        if tuple(positions.shape) != (batch,):
            raise ValueError(
                f"logit_positions must be [batch] = [{batch}] (one position per prompt), got "
                f"shape {tuple(positions.shape)}"
            )
        if int(positions.min()) < 0 or int(positions.max()) >= n_pos:
            raise ValueError(
                f"logit_positions must be in [0, {n_pos}), got values in "
                f"[{int(positions.min())}, {int(positions.max())}]"
            )
        positions = positions.to(state.current.device, torch.long)
        if attention_mask is not None:
            rows = torch.arange(batch, device=positions.device)
            padded = (~attention_mask[rows, positions]).nonzero().flatten().tolist()
            if padded:
                raise ValueError(
                    f"logit_positions point at padding (attention_mask == 0) in prompt(s) "
                    f"{padded}; point them at real tokens"
                )
        return positions

    def _validate_attention_mask(
        self, mask, shape: tuple[int, ...], device, past: Optional[KeyValueCache] = None
    ) -> Optional[Bool[Tensor, "batch pos"]]:
        """``None`` or a ``[batch, pos]`` boolean mask (True = real token), checked. With a
        key-value cache ``past`` the mask covers the new positions only, and a row all
        padding there is a prompt with no new token: accepted where the cache holds a real
        token of that prompt (its padding queries attend to it, as right padding does in a
        whole pass)."""
        if mask is None:
            return None
        mask = require_token_mask("attention_mask", mask, shape)
        real = mask.any(dim=-1)
        n_past = self._n_past(past)
        if past is not None and n_past:
            earlier = past.attention_mask  # None: every cached position is real
            real = real | (True if earlier is None else earlier.any(dim=-1).to(real.device))
        empty = (~real).nonzero().flatten().tolist()
        if empty:
            hint = "drop empty prompts from the batch"
            if past is not None:  # e.g. the first chunk of a left-padded prompt
                hint = (
                    "with a key-value cache a prompt needs one in its first pass or in the "
                    "cache; for a left-padded prompt, end the first chunk after its first "
                    "real token, or drop empty prompts from the batch"
                )
            raise ValueError(
                f"attention_mask row(s) {empty} are all zero: a prompt needs at least one real "
                f"token ({hint})"
            )
        return mask.to(device)

    def _layer_range(self, start_at_layer: Optional[int], stop_at_layer: Optional[int]) -> range:
        """Layers ``[start, stop)`` to run; negative values count from the end (as in TL)."""
        n = self.cfg.n_layers

        def resolve(name: str, value: Optional[int], default: int) -> int:
            if value is None:
                return default
            if not is_integer(value) or not -n <= value <= n:
                raise ValueError(f"{name} must be an integer in [-{n}, {n}], got {value!r}")
            return int(value) + n if value < 0 else int(value)

        start = resolve("start_at_layer", start_at_layer, 0)
        stop = resolve("stop_at_layer", stop_at_layer, n)
        if start > stop:
            raise ValueError(f"start_at_layer={start} is after stop_at_layer={stop}")
        return range(start, stop)

    def embed_state(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    ) -> DepthState:
        """The depth state before layer 0 (fires ``hook_embed``), for
        ``model(state, start_at_layer=0, attention_mask=...)``.

        ``attention_mask``: ``[batch, pos]``, 1 at real tokens, the padding the state is to
        be run with. The embedding does not depend on it, but the state records it
        (`DepthState.padding`) as `depth_states` does, so a resume with other padding is
        refused; without it the state is that of an unpadded pass (``model(tokens)``).
        ``tokens`` that are no tensor (a list) raise ``TypeError``, and are checked as the
        forward pass checks them (`_validate_tokens`)."""
        if not in_pass():  # a pass's own call has checked them
            if not isinstance(tokens, Tensor):
                raise TypeError(
                    "embed_state takes a [batch, pos] integer tensor of token ids, got "
                    f"{type(tokens).__name__}; pass torch.tensor(ids) or model.to_tokens(text)"
                )
            tokens = self._validate_tokens(tokens)
        if attention_mask is not None:
            attention_mask = self._validate_attention_mask(
                attention_mask, tuple(tokens.shape), tokens.device
            )
        if in_pass():
            embedding = self.hook_embed(self.embed(tokens))
        else:  # called by itself: a pass of its own, for the caches of hook_embed
            source = self._pass_source("tokens", (tokens, None))
            with pass_extent(0, tokens.shape[1], attention_mask, source):
                embedding = self.hook_embed(self.embed(tokens))
        current = embedding.clone() if self.routing_layout.snapshots else embedding
        state = self.routing_layout.initial_state(embedding, current)
        state.entering_sublayer = 0
        state.padding = padding_of(attention_mask)
        return state

    # --- forward ----------------------------------------------------------------------
    @guarded_pass
    def forward(
        self,
        input: Union[str, list[str], Int[Tensor, "batch pos"], DepthState],
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        tokens: Optional[Int[Tensor, "batch pos"]] = None,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
        logit_positions: Optional[Int[Tensor, " batch"]] = None,
        past_kv_cache: Optional[KeyValueCache] = None,
    ):
        """Run the model.

        Args:
            input: text (needs a tokenizer), token ids ``[batch, pos]``, or, with
                ``start_at_layer``, the `DepthState` entering that layer.
            return_type: ``"logits"`` (``[batch, pos, d_vocab]``), ``"loss"`` (mean
                next-token cross-entropy), ``"both"`` (an `Output`), or ``None``.
            loss_per_token: return the loss per position ``[batch, pos - 1]``.
            prepend_bos, padding_side: as in TransformerLens (string inputs only; a
                string that continues a ``past_kv_cache`` needs ``prepend_bos`` given when
                ``cfg.default_prepend_bos`` is true: the default BOS would sit mid-sequence);
                ``padding_side`` is ``"right"`` or ``"left"`` (default
                ``model.default_padding_side``: the tokenizer's ``padding_side``, set from
                ``cfg.default_padding_side``), and the attention mask of the padding is
                applied automatically.
            start_at_layer: first layer to run (TransformerLens semantics).
            stop_at_layer: run layers ``[start, stop)`` and return the `DepthState`
                entering ``stop_at_layer`` instead of logits (TransformerLens returns the
                residual stream; here the state holds every depth source).
            tokens: the token ids ``[batch, pos]`` of the state's prompts, needed for a loss
                when ``input`` is a state (checked: another shape raises ``ValueError``).
                With token ids or text as ``input`` it is refused (``ValueError``): the
                pass scores the input's own tokens, and ``tokens=`` would be ignored.
            attention_mask: ``[batch, pos]``, 1 at real tokens and 0 at padding (left,
                right or anywhere). Queries never attend to padding keys, rotary positions
                count real tokens only (so a left-padded prompt gets the logits of the
                unpadded prompt at its real positions), padding queries get a zero
                attention pattern, and padding is excluded from the loss. Computed
                automatically for string inputs; token inputs are taken as unpadded
                unless it is given.
            logit_positions: ``[batch]``, one position per prompt: return the logits
                there only, ``[batch, 1, d_vocab]`` (not a TransformerLens argument). The
                last layer's attention queries, its MLP sublayer, the final router and
                the unembedding then run at that position only; the earlier layers run
                everywhere (the last layer's keys and values need them). Equal to
                ``logits[arange(batch), logit_positions, None]`` up to float rounding, and
                faster when a metric reads one position. Hooks after the last attention
                see ``pos = 1``.
            past_kv_cache: a `KeyValueCache`: ``input`` are the tokens that follow the
                cached ones (``attention_mask``, if given, covers only them; a prompt
                may have no real token among them, if it has one in the cache); the cache
                is extended by them. Hooks see the new positions only (TransformerLens
                semantics); a pass under other interventions (`hooked_attnres.interventions`)
                than those that filled the cache raises ``ValueError`` (`KeyValueCache`).
                Not combinable with ``start_at_layer``, ``stop_at_layer`` or
                ``logit_positions``.

        Raises:
            ValueError: an all-zero ``attention_mask`` row (of a prompt with no real
                token in the key-value cache either), a loss with fewer than two
                positions or with no two consecutive real tokens, ``tokens=`` with token
                ids or text as ``input``, text continuing a ``past_kv_cache`` without
                ``prepend_bos`` where the default prepends a BOS, or a bad argument.
        """
        return_type = require_choice("return_type", return_type, RETURN_TYPES)
        loss_per_token = require_bool("loss_per_token", loss_per_token)  # "no" was True
        layers = self._layer_range(start_at_layer, stop_at_layer)
        if past_kv_cache is not None:
            self._check_cache_call(past_kv_cache, start_at_layer, stop_at_layer, logit_positions)
        n_past = self._n_past(past_kv_cache)  # before the pass's context extends the cache
        # the interventions that fire in a cached pass (`note_intervention`); a pass without
        # a key-value cache records none
        fired: Optional[set] = None if past_kv_cache is None else set()
        positions = logit_positions if isinstance(logit_positions, Tensor) else None
        if start_at_layer is None:
            if isinstance(input, DepthState):
                raise TypeError("a DepthState input needs start_at_layer (the layer it enters)")
            if tokens is not None:  # the input's tokens are scored: it would be dropped
                raise ValueError(
                    "tokens= is the token ids of a DepthState input (with start_at_layer), "
                    "for its loss; with input= token ids or text the pass scores the input's own "
                    "token ids and would ignore tokens= (TransformerLens drops it silently). "
                    "Pass the token ids to score as the input, model(tokens, "
                    "return_type='loss'), or a DepthState with start_at_layer and tokens=."
                )
            if isinstance(input, str) or (
                isinstance(input, list) and input and all(isinstance(t, str) for t in input)
            ):
                texts = input
                if n_past > 0 and prepend_bos is None and self._prepend_bos(None):
                    # the default BOS would sit in the middle of the cached sequence
                    raise ValueError(
                        f"this text continues a key-value cache ({n_past} cached positions), "
                        "and cfg.default_prepend_bos=True would put a BOS token in the "
                        "middle of the sequence; pass prepend_bos=False to continue the "
                        "text (the logits of one pass over the whole text), or "
                        "prepend_bos=True to put a BOS token there"
                    )
                input, mask = self.to_tokens_and_mask(input, prepend_bos, padding_side)
                if attention_mask is None and n_past == 0:  # a continuation may add none
                    self._refuse_empty_prompts(texts, mask, "forward")
                attention_mask = mask if attention_mask is None else attention_mask
            tokens = self._validate_tokens(input, n_past=n_past)
            # a pass that starts a cache too (generate's first step); later passes
            # continue prompts whose padding, if any, was masked before
            if attention_mask is None and n_past == 0:
                self._warn_if_left_padded(tokens)
            mask = self._validate_attention_mask(
                attention_mask, tuple(tokens.shape), tokens.device, past_kv_cache
            )
            past = () if past_kv_cache is None else past_kv_cache.filled_with()
            source = self._pass_source("tokens", (tokens, positions), past)
            # hook_embed belongs to the pass: interventions there check its extent and mask
            with pass_extent(n_past, tokens.shape[1], mask, source, fired):
                state = self.embed_state(tokens)
        else:
            if isinstance(input, DepthState):  # the caller's, before any hook could edit it
                source = self._state_source(input, positions, past_kv_cache)
            state = self._validate_state(input, layers.start)
            if tokens is not None:
                tokens = self._validate_tokens(tokens)
                if tuple(tokens.shape) != tuple(state.current.shape[:2]):
                    # torch's gather would silently score the first rows / positions
                    raise ValueError(
                        f"tokens must be the [batch, pos] = {tuple(state.current.shape[:2])} "
                        f"token ids of the DepthState input, got shape {tuple(tokens.shape)}"
                    )
            mask = self._validate_attention_mask(
                attention_mask, tuple(state.current.shape[:2]), state.current.device
            )
            _check_same_padding(state, mask, f"start_at_layer={layers.start}")
        if logit_positions is not None:
            if stop_at_layer is not None or return_type not in ("logits", None):
                raise ValueError(
                    "logit_positions returns logits at one position per prompt; it "
                    "cannot be combined with stop_at_layer or a loss"
                )
            logit_positions = self._validate_logit_positions(logit_positions, state, mask)
        # a pass that raises (a hook, an intervention that refuses, KeyboardInterrupt)
        # leaves the cache as it was
        kept = nullcontext() if past_kv_cache is None else past_kv_cache.restored_on_error()
        with kept:
            context = self._attention_context(state, mask, past_kv_cache)
            if past_kv_cache is not None:
                assert tokens is not None  # a cached pass starts from token ids
                past_kv_cache.note_filled_with(tokens)
            shared_sums = SharedSums(self)
            with pass_extent(n_past, state.current.shape[1], mask, source, fired):
                state = self._run_sublayers(
                    state,
                    range(2 * layers.start, 2 * layers.stop),
                    context,
                    shared_sums,
                    logit_positions,
                )
                if stop_at_layer is not None:
                    state.entering_sublayer = 2 * layers.stop
                    state.padding = padding_of(mask)
                    # a pass started from it continues this one (`_state_source`)
                    state.continues = (
                        None if past_kv_cache is not None else continuation(source, state.sources)
                    )
                    return state
                logits = self._unembed(state, shared_sums)
            if past_kv_cache is not None:  # after every hook of the pass has fired
                assert fired is not None
                past_kv_cache.note_interventions(fired, n_past)
            if return_type == "logits":
                return logits
            if return_type is None:
                return None
            if tokens is None:
                raise ValueError(
                    "a loss needs the token ids: pass tokens=... with a DepthState input"
                )
            loss = lm_cross_entropy_loss(logits, tokens, mask, loss_per_token)
            return loss if return_type == "loss" else Output(logits, loss)

    def _pass_source(
        self,
        kind: str,
        tensors: tuple[Optional[Tensor], ...],
        past: Optional[tuple[Optional[Tensor], ...]] = (),
    ) -> Callable[[], PassInput]:
        """The maker of a pass's `PassInput` (`pass_extent`'s ``source``), memoised: it
        copies ``tensors`` (the input: token ids or a state's sources, then
        ``logit_positions``) and records the weights at the first caching hook of the pass
        that asks, and only then (a pass that caches nothing pays nothing)."""

        @functools.cache
        def made() -> PassInput:
            copies = tuple(None if t is None else t.detach().clone() for t in tensors)
            return PassInput(weakref.ref(self), WeightsSignature(self), kind, copies, past)

        return made

    def _state_source(
        self,
        state: DepthState,
        positions: Optional[Tensor],
        past_kv_cache: Optional[KeyValueCache] = None,
    ) -> Callable[[], PassInput]:
        """The `PassInput` maker of a pass from ``state``: that of the pass that returned it
        (``stop_at_layer``, `DepthState.continues`) where the state is unchanged and this
        pass adds no ``logit_positions`` or key-value cache, so that caching hooks over
        ``model(tokens, stop_at_layer=k)`` then ``model(state, start_at_layer=k)`` fill one
        pass's cache; else a record of its own (copies of its sources)."""
        if positions is None and past_kv_cache is None:
            same = continued(state.continues, state.sources)
            if same is not None:
                return same
        return self._pass_source("state", (*state.sources, positions))

    @staticmethod
    def _n_past(cache: Optional[KeyValueCache]) -> int:
        return 0 if cache is None else cache.n_past

    def _check_cache_call(
        self,
        cache,
        start_at_layer: Optional[int],
        stop_at_layer: Optional[int],
        logit_positions: Optional[Tensor],
    ) -> None:
        if not isinstance(cache, KeyValueCache):
            raise TypeError(
                "past_kv_cache must be a hooked_attnres.KeyValueCache (e.g. "
                f"KeyValueCache.init_cache(model.cfg.n_layers)), got {type(cache).__name__}"
            )
        if len(cache.layers) != self.cfg.n_layers:
            raise ValueError(
                f"past_kv_cache has {len(cache.layers)} layers, the model {self.cfg.n_layers}"
            )
        cache.check_consistent()
        cache.check_filled_by(self)
        if start_at_layer is not None or stop_at_layer is not None or logit_positions is not None:
            raise ValueError(
                "past_kv_cache runs whole forward passes over new tokens; it cannot be combined "
                "with start_at_layer, stop_at_layer or logit_positions"
            )

    def _attention_context(
        self,
        state: DepthState,
        mask: Optional[Bool[Tensor, "batch pos"]],
        cache: Optional[KeyValueCache] = None,
    ) -> AttentionContext:
        """Rotary tables, padding and cache offset of a pass over ``state``'s positions
        (extends the cache's mask and length: the pass appends its keys and values)."""
        batch, n_pos = state.current.shape[:2]
        device = state.current.device
        n_past = self._n_past(cache)
        full = mask
        if cache is not None:
            if cache.batch_size is not None and cache.batch_size != batch:
                raise ValueError(
                    f"past_kv_cache holds {cache.batch_size} prompts, the input has {batch}"
                )
            if cache.attention_mask is not None or mask is not None:
                past = cache.attention_mask
                if past is None:
                    past = torch.ones(batch, n_past, dtype=torch.bool, device=device)
                new = mask
                if new is None:
                    new = torch.ones(batch, n_pos, dtype=torch.bool, device=device)
                full = torch.cat((past.to(device), new), dim=1)
        d_head, base = self.cfg.d_head, self.cfg.rotary_base
        if full is None or bool(full.all()):
            positions = torch.arange(n_past, n_past + n_pos, device=device)
            cos, sin = rotary_at(positions, d_head, base)
            context = AttentionContext(cos, sin, n_past, None, None, cache)
            full = None
        else:
            # rotary positions count real tokens only (Hugging Face's position_ids)
            position_ids = (full.long().cumsum(dim=-1) - 1).clamp(min=0)[:, n_past:]
            cos, sin = rotary_at(position_ids, d_head, base)
            is_pad = ~full
            # padding keys matter only if some real query comes after a padding key
            pad_before_real = bool(((is_pad.long().cumsum(dim=-1) > 0) & full).any())
            context = AttentionContext(
                cos,
                sin,
                n_past,
                is_pad if pad_before_real else None,
                is_pad[:, n_past:],
                cache,
                padding_keys=is_pad,
            )
        if cache is not None:
            cache.attention_mask = full
            cache.n_past = n_past + n_pos
            cache.batch_size = batch
            if not n_past:  # later passes: checked at their start (check_filled_by)
                cache.mark_filled_by(self)
        return context

    def _run_sublayers(
        self,
        state: DepthState,
        sublayers: range,
        context: AttentionContext,
        shared_sums: SharedSums,
        logit_positions: Optional[Int[Tensor, " batch"]] = None,
    ) -> DepthState:
        """Run sublayers ``2 * layer`` (attention) and ``2 * layer + 1`` (MLP) in ``sublayers``
        (``shared_sums``: the pass's, also for `_unembed`).

        With ``logit_positions`` the last attention sublayer queries only there and the
        state continues at those positions (gathered first if the run starts after it).
        """
        last_attention = self.routing_layout.last_attention_sublayer
        if logit_positions is not None and sublayers.start > last_attention:
            state = gather_positions(state, logit_positions)
        called_whole = self._blocks_called_whole(sublayers.start, "forward_from")
        for sublayer in sublayers:
            layer, is_mlp = divmod(sublayer, 2)
            block = self.blocks[layer]
            if is_mlp:
                if layer not in called_whole:
                    state = block.mlp_sublayer(state, shared_sums)
                continue
            positions = logit_positions if sublayer == last_attention else None
            if layer in called_whole:  # through nn.Module.__call__: its PyTorch hooks run
                state = block(state, context, positions, shared_sums)
            else:
                state = block.attn_sublayer(state, context, positions, shared_sums)
        return state

    def _blocks_called_whole(self, first_sublayer: int, what: str) -> set[int]:
        """The layers whose `AttnResBlock` a pass from ``first_sublayer`` on calls as a
        module rather than by its halves: those with a PyTorch hook on the block itself
        (``model.blocks[l].register_forward_hook``), or all while a global module hook
        exists, so that the hook runs (a pass runs each layer's attention and MLP halves
        separately, which skipped it silently). A pass that starts inside a hooked layer
        (``what``, at its MLP sublayer) cannot run that hook and raises ``ValueError``."""
        if global_hooks_attached():
            layers = set(range(self.cfg.n_layers))
        else:
            layers = {i for i, block in enumerate(self.blocks) if has_module_hooks(block)}
        if not layers:
            return layers
        layer, is_mlp = divmod(first_sublayer, 2)
        if is_mlp and layer in layers:
            if has_module_hooks(self.blocks[layer]):
                raise _hooked_block_skipped(
                    self.blocks[layer],
                    f"{what} starts at its MLP sublayer ({first_sublayer})",
                    f"Start at the layer's attention (sublayer {2 * layer})",
                )
            layers.discard(layer)
        return layers

    def _unembed(
        self, state: DepthState, shared_sums: SharedSums
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Final router (kimi / full layouts), ``ln_final`` and the unembedding
        (``shared_sums``: the pass's). The unembedding is called as a module, so that a
        PyTorch hook on ``model.unembed`` runs (before, ``@ W_U`` skipped it silently)."""
        final_router = self.final_res if self.routing_layout.has_final_router else None
        return self.unembed(
            normalized_route(final_router, state.sources, self.ln_final, shared_sums)
        )

    @guarded_pass
    def depth_states(
        self,
        tokens: Int[Tensor, "batch pos"],
        sublayers: bool = False,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    ) -> list[DepthState]:
        """The `DepthState` entering every layer, ``[state_0, ..., state_{n_layers}]``, from
        one forward pass (``state_l`` equals ``model(tokens, stop_at_layer=l)``).

        Any of them can start a forward pass: ``model(states[l], start_at_layer=l)``; this is
        how interventions at layer ``l`` reuse the unchanged prefix of a run (pass the same
        ``attention_mask`` to both for padded prompts).

        With ``sublayers=True``: the state entering every sublayer, ``2 * n_layers + 1``
        states; index ``2 * l`` enters layer ``l``'s attention, ``2 * l + 1`` its MLP (for
        `forward_from`).
        """
        sublayers = require_bool("sublayers", sublayers)  # "no" was True
        tokens = self._validate_tokens(tokens)
        if attention_mask is None:  # as in forward: left padding without a mask is attended
            self._warn_if_left_padded(tokens)
        mask = self._validate_attention_mask(attention_mask, tuple(tokens.shape), tokens.device)
        source = self._pass_source("tokens", (tokens, None))
        with pass_extent(0, tokens.shape[1], mask, source):
            state = self.embed_state(tokens)
        context = self._attention_context(state, mask)
        states = [state]
        shared_sums = SharedSums(self)
        hooked = [i for i, b in enumerate(self.blocks) if has_module_hooks(b)] if sublayers else []
        if hooked:
            raise _hooked_block_skipped(
                self.blocks[hooked[0]],
                "depth_states(sublayers=True) runs each layer's attention and MLP halves "
                "separately (the activation-patching sweeps run it for the corrupted run's "
                "states)",
                "Use sublayers=False (around a sweep: remove the hook)",
            )
        with pass_extent(0, tokens.shape[1], mask, source):
            for layer, block in enumerate(self.blocks):
                entering = self._private_current(state, layer)  # states[-1] is returned
                if sublayers:
                    state = block.attn_sublayer(entering, context, shared_sums=shared_sums)
                    states.append(state)
                    state = block.mlp_sublayer(state, shared_sums)
                else:
                    state = block(entering, context, shared_sums=shared_sums)
                states.append(state)
        padding = padding_of(mask)
        for index, entering in enumerate(states):  # so that a state cannot enter elsewhere
            entering.entering_sublayer = index if sublayers else 2 * index
            entering.padding = padding
        return states

    @guarded_pass
    def forward_from(
        self,
        state: DepthState,
        sublayer: int,
        logit_positions: Optional[Int[Tensor, " batch"]] = None,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    ) -> Union[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "batch 1 d_vocab"]]:
        """Logits of a forward pass that starts at a sublayer (finer than ``start_at_layer``).

        Args:
            state: the `DepthState` entering that sublayer (``depth_states(tokens,
                sublayers=True)[sublayer]``).
            sublayer: ``2 * layer`` starts at layer ``layer``'s attention router (the same
                as ``start_at_layer=layer``), ``2 * layer + 1`` at its MLP router,
                ``2 * n_layers`` runs only the final router and the unembedding.
            logit_positions: ``[batch]``, as in `forward`: logits ``[batch, 1, d_vocab]``
                at one position per prompt.
            attention_mask: ``[batch, pos]``, as in `forward` (for padded prompts): the
                mask of the pass that made ``state`` (other padding raises ``ValueError``
                for a state from `depth_states` / ``stop_at_layer``, which records it in
                `DepthState.padding`; a state built by hand records none and needs this
                argument, all ones for prompts without padding).

        Hooks fire as in a full forward pass, from the sublayer on.
        """
        n_sublayers = 2 * self.cfg.n_layers
        if not is_integer(sublayer) or not 0 <= sublayer <= n_sublayers:
            raise ValueError(
                f"sublayer must be an integer in [0, {n_sublayers}] (2 * layer for "
                f"attention, 2 * layer + 1 for the MLP), got {sublayer!r}"
            )
        layer, is_mlp = divmod(int(sublayer), 2)
        positions = logit_positions if isinstance(logit_positions, Tensor) else None
        if isinstance(state, DepthState):  # the caller's, before any hook could edit it
            source = self._state_source(state, positions)
        state = self._validate_state(state, layer, "mlp" if is_mlp else "attn")
        mask = self._validate_attention_mask(
            attention_mask, tuple(state.current.shape[:2]), state.current.device
        )
        _check_same_padding(state, mask, "forward_from")
        if logit_positions is not None:
            logit_positions = self._validate_logit_positions(logit_positions, state, mask)
        context = self._attention_context(state, mask)
        shared_sums = SharedSums(self)
        with pass_extent(0, state.current.shape[1], mask, source):
            state = self._run_sublayers(
                state, range(sublayer, n_sublayers), context, shared_sums, logit_positions
            )
            return self._unembed(state, shared_sums)

    # --- checkpoints ------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path], **kwargs) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) atomically.

        Options (see `hooked_attnres.loading.checkpoint.save_checkpoint`): ``format``, and
        ``overwrite=True`` to replace a directory that holds files no save wrote (refused
        by default: `CheckpointConflictError`).
        """
        from hooked_attnres.loading.checkpoint import save_checkpoint

        return save_checkpoint(self, directory, **kwargs)

    @classmethod
    def from_hf_qwen3(cls, source, wrap: str = "recency", **kwargs) -> HookedAttnRes:
        """Load a vanilla Qwen3 (local directory or in-memory ``Qwen3ForCausalLM``) in
        AttnRes form; ``wrap`` is ``"recency"``, ``"exact"`` or ``"none"``. See
        `hooked_attnres.loading.hf_qwen3.from_hf_qwen3`."""
        from hooked_attnres.loading.hf_qwen3 import from_hf_qwen3

        _refuse_model_class(
            cls, "from_hf_qwen3", "hooked_attnres.loading.hf_qwen3.from_hf_qwen3", kwargs
        )
        return from_hf_qwen3(source, wrap=wrap, model_class=cls, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], **kwargs) -> HookedAttnRes:
        """Load a checkpoint directory written by `save_pretrained` (or another
        supported format; see `hooked_attnres.loading.checkpoint.load_checkpoint`).

        Options: ``dtype``, ``device``, ``mmap`` (default False: the weights are copied, so
        later changes to the files cannot reach the model), ``verify`` (default True: a
        checkpoint whose files changed after its save, or, without a completion marker,
        differ from the digest manifest that lists them (the shipped checkpoints'
        ``SHA256SUMS``), is refused with `CheckpointIntegrityError`)."""
        from hooked_attnres.loading.checkpoint import load_checkpoint

        _refuse_model_class(
            cls, "from_pretrained", "hooked_attnres.loading.load_checkpoint", kwargs
        )
        return load_checkpoint(directory, model_class=cls, **kwargs)
