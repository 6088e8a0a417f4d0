"""Model-level weight views in TransformerLens layouts (stacked over layers)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from hooked_attnres._precision import stat_dtype
from hooked_attnres._tl import CompositionScores, FactoredMatrix, composition_scores
from hooked_attnres._validation import require_bools, require_choice, require_integer

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig


class QKNormWarning(UserWarning):
    """``model.QK`` is TransformerLens's ``W_Q @ W_K^T``, but Qwen3's attention normalises
    the queries and keys per head (``q_norm`` / ``k_norm``, with gains) and rotates them, so
    ``QK`` is not the bilinear form of its scores."""


def _parameters_of(root: nn.Module) -> list[Optional[Tensor]]:
    """Every parameter of ``root`` (``None`` for an unset one; a shared one once per
    owner), in the order of `_named_parameters_of`. Walks ``_modules`` directly: three
    times faster than ``named_parameters``, and it runs before every cached pass."""
    found: list[Optional[Tensor]] = []
    stack: list[Optional[nn.Module]] = [root]
    while stack:
        module = stack.pop()
        if module is not None:
            found.extend(module._parameters.values())
            stack.extend(reversed(module._modules.values()))
    return found


def _named_parameters_of(root: nn.Module) -> list[tuple[str, Optional[Tensor]]]:
    """`_parameters_of` with their names. Skips the empty dicts of the leaves (most modules
    are hook points): twice as fast, and a `WeightsSignature` is made for every pass that
    caching hooks record (`PassInput`)."""
    found: list[tuple[str, Optional[Tensor]]] = []
    stack: list[tuple[str, Optional[nn.Module]]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        if module is None:
            continue
        if module._parameters:
            found.extend((prefix + name, param) for name, param in module._parameters.items())
        if module._modules:
            stack.extend(
                (prefix + name + ".", child) for name, child in reversed(module._modules.items())
            )
    return found


def _entries(params: Iterable[Optional[Tensor]]) -> tuple:
    params = list(params)
    try:
        return tuple(
            None if p is None else (p.dtype, p.device, p.data_ptr(), p._version) for p in params
        )
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no
        # version counter; asking every parameter first would make the check 35 % slower
        return tuple(
            None if p is None else (p.dtype, p.device, p.data_ptr(), _version_of(p)) for p in params
        )


def _version_of(param: Tensor) -> Optional[int]:
    """``param``'s version counter; ``None`` for an inference tensor, which has none."""
    return None if param.is_inference() else param._version


class WeightsSignature:
    """What the parameters of a model are at one moment, to tell later whether the model
    still has the same weights: for each parameter its dtype, device, address and version
    counter (which every in-place edit advances: ``load_state_dict``, ``process_weights``,
    ``param.copy_`` / ``mul_`` under ``no_grad``, an optimiser step), and a weak
    reference to its storage (so that a parameter replaced by new memory at the freed
    address of the old one, e.g. by ``.to(bfloat16).to(float32)``, is not taken for the
    old one). Keeps no weights alive. A parameter or module added, removed or replaced
    changes the signature too.

    Not detected (no cheap test can see them): writes through ``param.data`` (a tensor
    with its own version counter), through numpy or DLPack views, into memory shared
    with another process, or in place into a parameter made under
    ``torch.inference_mode`` (an inference tensor has no version counter). Copies are
    the object itself; a pickled signature matches no model (its storages are of another
    process).

    Used by `KeyValueCache` (cached keys and values of other weights) and
    `RoutingAttribution.verify_top` (exact rows of other weights).
    """

    __slots__ = ("names", "entries", "_storages")

    def __init__(self, model: nn.Module):
        named = _named_parameters_of(model)
        self.names = tuple(name for name, _ in named)
        self.entries = _entries(param for _, param in named)
        self._storages: Optional[tuple[StorageWeakRef, ...]] = tuple(
            StorageWeakRef(param.untyped_storage()) for _, param in named if param is not None
        )

    def change(self, model: nn.Module) -> Optional[str]:
        """``None`` if ``model`` has the weights this signature recorded, else what
        changed first (for an error message)."""
        storages = self._storages
        if storages is not None and _entries(_parameters_of(model)) == self.entries:
            if not any(ref.expired() for ref in storages):
                return None
        if storages is None:
            return "the signature was loaded from a file (it names no weights of this process)"
        named = _named_parameters_of(model)
        now = dict(zip((name for name, _ in named), _entries(p for _, p in named), strict=True))
        if now.keys() != set(self.names):
            added = sorted(now.keys() - set(self.names))
            removed = sorted(set(self.names) - now.keys())
            return f"parameters were added {added} or removed {removed}"
        live = iter(storages)
        for name, old in zip(self.names, self.entries, strict=True):
            new = now[name]
            if old is None or new is None:
                if old is not new:
                    return f"{name} was set or unset"
                continue
            if old[:2] != new[:2]:
                return f"{name} was converted from {old[0]} on {old[1]} to {new[0]} on {new[1]}"
            if old[2] != new[2] or next(live).expired():
                return f"{name} was replaced (new memory)"
            if old[3] != new[3]:
                return f"{name} was edited in place"
        return "the parameters were reordered"

    def __copy__(self) -> WeightsSignature:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightsSignature:
        return self

    def __reduce__(self):
        # a storage's weak reference is an address in this process: not picklable
        return (_loaded_signature, (self.names, self.entries))


def _loaded_signature(names: tuple, entries: tuple) -> WeightsSignature:
    signature = WeightsSignature.__new__(WeightsSignature)
    signature.names, signature.entries, signature._storages = names, entries, None
    return signature


class Unembed(nn.Module):
    """The unembedding ``W_U [d_model, d_vocab]``: ``unembed(x) = x @ W_U`` (``b_U`` is
    zero)."""

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return x @ self.W_U


class TiedUnembed(nn.Module):
    """The unembedding of a model with tied embeddings: ``W_U = W_E.T`` (a view of the
    embedding; no parameters of its own, so checkpoints are unchanged)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self._embed: list[Any] = [embed]  # in a list: not registered, the embedding owns W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self._embed[0].W_E.T

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return x @ self.W_U


class WeightsMixin:
    """``W_E, W_U, b_U, W_Q, W_K, W_V, W_O, W_in, W_gate, W_out`` and zero biases.

    Per-layer tensors are stacked on a leading ``n_layers`` axis; ``W_K`` / ``W_V`` are
    repeated to ``n_heads`` heads for grouped-query attention (``repeat_interleave``: query
    head ``h`` reads key-value head ``h // (n_heads // n_kv)``), as ``HookedTransformer``
    did and TransformerLens 4.3's ``QK`` / ``OV`` / ``tl_parameters`` do.
    ``TransformerBridge.W_K`` / ``W_V`` stack the ``n_kv`` heads instead (``attn._W_K`` /
    ``_W_V`` here): index ``[layer, g]`` means key-value head ``g`` there and query head
    ``g`` here.
    They are fresh tensors (``torch.stack``); edit parameters through ``model.blocks``.
    """

    if TYPE_CHECKING:  # provided by HookedAttnRes
        blocks: Any
        embed: Any
        unembed: Any
        ln_final: Any

        def sites(self) -> list: ...

        def router(self, site) -> Any: ...

        def setup(self) -> None: ...

        @property
        def cfg(self) -> HookedAttnResConfig: ...

    def _stack(self, get) -> Tensor:
        return torch.stack([get(block) for block in self.blocks], dim=0)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding; ``W_E.T`` (a view) when embeddings are tied."""
        if self.cfg.tie_word_embeddings:
            return self.embed.W_E.T
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.W_E.new_zeros(self.cfg.d_vocab)

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_gate)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``
        (TransformerLens's ``QK``, the Bridge's bit for bit).

        It is not the bilinear form of this model's attention scores: Qwen3 normalises each
        head's query and key (``q_norm`` / ``k_norm``) and applies their gains before the
        rotary embedding, so the score of query input ``x`` and key input ``y`` (both after
        ``ln1``) at the same position is ``x W_Q diag(q_norm.w * k_norm.w) W_K^T y /
        (rms(x W_Q) rms(y W_K) sqrt(d_head))``; at other positions the rotation enters too.
        Warns once per model (`QKNormWarning`); exact scores: ``attn.hook_attn_scores``."""
        if not getattr(self, "_qk_norm_warned", False):
            self._qk_norm_warned = True
            warnings.warn(
                "model.QK is W_Q @ W_K^T per head, as in TransformerLens, but this model's "
                "attention normalises each head's query and key (q_norm / k_norm, with "
                "gains) before the rotary embedding: QK misses the gains' per-dimension "
                "weighting (W_Q diag(q_norm.w * k_norm.w) W_K^T has it), the per-token "
                "scale and the positions, so it is not the bilinear form of the scores. "
                "Read exact scores from blocks.{l}.attn.hook_attn_scores. Warned once per "
                "model; silence with warnings.filterwarnings('ignore', "
                "category=hooked_attnres.QKNormWarning).",
                QKNormWarning,
                stacklevel=2,
            )
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> CompositionScores:
        """TransformerLens's composition scores of every pair of heads (Elhage et al.,
        2021): ``||A B||_F / (||A||_F ||B||_F)`` for an earlier head's ``OV`` as ``A`` and a
        later head's ``QK`` (``mode="Q"``), ``QK^T`` (``"K"``) or ``OV`` (``"V"``) as ``B``;
        ``[n_layers, n_heads, n_layers, n_heads]``, 0 unless the first head's layer is
        the earlier (TransformerBridge's `CompositionScores`, labels ``L{l}H{h}``).

        Weight-based, as in TransformerLens: the norms between the heads (``ln1``'s gain
        unless folded, Qwen3's ``q_norm`` / ``k_norm``, see `QK`) are left out. The routing
        needs no term: a router scales each source by a number per position, which a
        score does not see (it is invariant to scaling either matrix), so the scores mean
        the same in every layout; but a high score is not a used path (a router may give
        the source no weight). Raises ``ValueError`` for another ``mode``."""
        mode = require_choice("mode", mode, ("Q", "K", "V"))
        left = self.OV
        right = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: left}[mode]()
        scores = composition_scores(left, right, broadcast_dims=True)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        earlier = layers[:, None, None, None] < layers[None, None, :, None]
        labels = [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]
        return CompositionScores(
            scores=torch.where(earlier, scores, torch.zeros_like(scores)),
            layer_indices=list(range(self.cfg.n_layers)),
            head_labels=labels,
        )

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ):
        """Sum of biases up to ``layer``: zero, since Qwen3 has none (``[d_model]``).

        Raises:
            ValueError: ``layer`` outside ``[0, n_layers]`` (``[0, n_layers)`` with
                ``mlp_input``, as TransformerLens asserts), where no residual stream is."""
        mlp_input, _ = require_bools(mlp_input=mlp_input, include_mlp_biases=include_mlp_biases)
        n_layers = self.cfg.n_layers
        last = n_layers - 1 if mlp_input else n_layers
        if require_integer("layer", layer, minimum=0) > last:
            raise ValueError(
                f"layer must be in [0, {last}] (n_layers={n_layers}"
                f"{', mlp_input=True' if mlp_input else ''}), got {layer}"
            )
        return self.W_E.new_zeros(self.cfg.d_model)

    # --- weight processing (TransformerLens's process_weights / fold_layer_norm) ---------
    @torch.no_grad()
    def fold_layer_norm(self, fold_biases: bool = False, center_weights: bool = False) -> None:
        """Fold every RMSNorm gain into the matrices that read the normalised stream
        (TransformerLens's ``fold_layer_norm`` for RMS models); the model computes the same
        function (logits agree to float rounding, about 1e-6 in float32).

        * ``ln1.w`` into ``W_Q``, ``W_K``, ``W_V`` of the layer; ``ln2.w`` into ``W_gate``
          and ``W_in``;
        * ``ln_final.w`` into ``W_U`` (a model with tied embeddings gets its own ``W_U``
          first: ``cfg.tie_word_embeddings`` becomes ``False``);
        * each router's key-norm gain ``key_norm.w`` into its ``query`` (the router only
          ever uses their product).

        The gains become 1, so TransformerLens's scale-only readouts are exact:
        ``cache.apply_ln_to_stack(stack) @ model.W_U`` is each component's logit
        contribution (in a bfloat16 / float16 model the stack is float32: multiply by
        ``model.W_U.float()``). The per-head ``q_norm`` / ``k_norm`` gains stay: they act before the
        rotary embedding, which mixes dimensions, so no matrix can absorb them. Sets
        ``cfg.layer_norm_folding = True``. Running it twice changes nothing.

        Args:
            fold_biases, center_weights: TransformerLens's options for LayerNorm models;
                RMSNorm has no bias and does not centre, so they must stay ``False``.
        """
        fold_biases, center_weights = require_bools(
            fold_biases=fold_biases, center_weights=center_weights
        )
        if fold_biases or center_weights:
            raise ValueError(
                "fold_biases and center_weights apply to LayerNorm models; Qwen3's RMSNorm "
                "has no bias and does not centre the stream"
            )

        def fold(weight: Tensor, gain: Tensor, axis: int) -> None:
            shape = [1] * weight.ndim
            shape[axis] = -1
            dtype = stat_dtype(weight.dtype)
            weight.copy_((weight.to(dtype) * gain.to(dtype).reshape(shape)).to(weight.dtype))

        for block in self.blocks:
            for weight in (block.attn.W_Q, block.attn._W_K, block.attn._W_V):
                fold(weight, block.ln1.w, -2)  # [heads, d_model, d_head]
            for weight in (block.mlp.W_gate, block.mlp.W_in):
                fold(weight, block.ln2.w, 0)  # [d_model, d_mlp]
            block.ln1.w.fill_(1.0)
            block.ln2.w.fill_(1.0)
        for site in self.sites():
            router = self.router(site)
            fold(router.query, router.key_norm.w, 0)
            router.key_norm.w.fill_(1.0)
        if self.cfg.tie_word_embeddings:
            untied = Unembed(self.cfg.d_model, self.cfg.d_vocab).to(
                device=self.embed.W_E.device, dtype=self.embed.W_E.dtype
            )
            untied.W_U.copy_(self.embed.W_E.T)
            self.unembed = untied
            self.cfg.tie_word_embeddings = False
            self.setup()
        fold(self.unembed.W_U, self.ln_final.w, 0)  # [d_model, d_vocab]
        self.ln_final.w.fill_(1.0)
        self.cfg.layer_norm_folding = True

    @torch.no_grad()
    def process_weights(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = False,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """TransformerLens's weight processing, for this architecture.

        Args:
            fold_ln: `fold_layer_norm` (function-preserving).
            center_writing_weights: nothing to do: TransformerLens centres writing weights
                only for LayerNorm models (RMSNorm does not remove the mean), as here.
            center_unembed: subtract each row's mean from ``W_U``: logits shift by one
                constant per position, so probabilities are unchanged but logits are not.
                ``False`` by default (TransformerLens defaults to ``True``) so that the
                model's logits stay the same.
            fold_value_biases: nothing to do: Qwen3 has no biases.
            refactor_factored_attn_matrices: not supported (rotary embeddings and the
                q/k norms sit between ``W_Q`` and ``W_K``); ``True`` raises ``ValueError``.

        Each flag is ``True`` or ``False`` (`require_bools`: ``"no"`` was read as ``True``).
        """
        fold_ln, _, center_unembed, _, refactor_factored_attn_matrices = require_bools(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        if refactor_factored_attn_matrices:
            raise ValueError(
                "refactor_factored_attn_matrices is not supported: the rotary embedding and "
                "the per-head q/k RMSNorms sit between W_Q and W_K, so QK is not a product of "
                "two weight matrices"
            )
        if fold_ln:
            self.fold_layer_norm()
        if center_unembed:
            if self.cfg.tie_word_embeddings:
                raise ValueError(
                    "center_unembed would change the tied embedding too; call "
                    "fold_layer_norm() first (it unties W_U) or pass center_unembed=False"
                )
            W_U = self.unembed.W_U
            W_U.sub_(W_U.mean(dim=-1, keepdim=True))
