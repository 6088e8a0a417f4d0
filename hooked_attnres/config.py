"""`HookedAttnResConfig`: the shape of a Qwen3 + Block AttnRes model.

Field names follow TransformerLens's ``HookedTransformerConfig`` so that every
TransformerLens utility that reads ``model.cfg`` (patching, ``ActivationCache``)
finds what it expects. The ``attnres_*`` fields describe the depth routing; see
``docs/architecture.md`` for the three layouts.

The config validates itself on construction and after ``replace``; every error
says which field to change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from hooked_attnres._validation import (
    check_device,
    is_integer,
    require_bool,
    require_choice,
    require_finite_number,
    require_integer,
)

LAYOUTS = ("cumulative", "kimi", "full", "none")
MODES = ("block", "full")
QUERY_INITS = ("zero", "normal")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# Fields that describe the Qwen3 architecture. They exist because TransformerLens
# utilities read them; this package implements exactly one value of each.
_FIXED_ARCHITECTURE = {
    "act_fn": "silu",
    "normalization_type": "RMS",
    "positional_embedding_type": "rotary",
    "gated_mlp": True,
    "final_rms": True,
    "attn_only": False,
    "parallel_attn_mlp": False,
}


# TransformerLens feature flags for hooks this model does not have, and Qwen3 facts:
# each must keep its value (a different one would be silently ignored). The flags this
# model implements are free: use_attn_result, use_split_qkv_input, use_hook_mlp_in (the
# set_use_* methods; see docs/hooks.md) and layer_norm_folding (set by process_weights).
_FIXED_FLAGS = {
    "uses_rms_norm": True,
    "rotary_adjacent_pairs": False,
    "use_attn_in": False,
    "use_hook_tokens": False,
    "num_experts": None,
    "experts_per_token": None,
}

_BOOL_FIELDS = (
    "tie_word_embeddings",
    "default_prepend_bos",
    "gated_mlp",
    "final_rms",
    "use_qk_norm",
    "attn_only",
    "parallel_attn_mlp",
    "uses_rms_norm",
    "rotary_adjacent_pairs",
    "use_attn_result",
    "use_split_qkv_input",
    "use_hook_mlp_in",
    "use_attn_in",
    "use_hook_tokens",
    "layer_norm_folding",
)
_STR_FIELDS = (
    "model_name",
    "original_architecture",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "attnres_layout",
    "attnres_mode",
    "attnres_query_init",
)


def _dtype_from_any(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; use one of {sorted(_DTYPES)}")
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in config.json)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class HookedAttnResConfig:
    """Configuration of a `HookedAttnRes` model.

    Required: ``d_model``, ``n_layers``, ``n_heads``, ``d_vocab``. ``d_head`` defaults to
    ``d_model // n_heads``, ``d_mlp`` to ``3 * d_model``, ``n_key_value_heads`` to
    ``n_heads``.

    AttnRes fields:
        attnres_layout: which depth sources each router reads (``attnres.md`` section 2):
            ``"cumulative"`` (completed blocks are snapshots of the ordinary residual
            stream; the layout of the public ``qwen3_attnres`` checkpoints),
            ``"kimi"`` (paper-faithful: block sums plus a final router),
            ``"full"`` (every sublayer output is its own source, plus a final router) or
            ``"none"`` (a plain residual Qwen3; no routers).
        attnres_num_blocks: number of blocks N for ``cumulative`` (block mode) and ``kimi``;
            a block spans ``ceil(n_layers / N)`` layers. Default ``min(8, n_layers)``.
            Where ``N`` does not divide ``n_layers`` the model may have fewer blocks than
            ``N`` (5 layers, ``N = 4``: blocks of 2 layers, so 3 blocks); the block count
            the routers see is ``ceil(n_layers / ceil(n_layers / N))``.
        attnres_mode: ``"block"`` or ``"full"``; only for the cumulative layout. In
            ``"full"`` mode the stream is snapshotted after every sublayer.
        attnres_recency_bias: initial value of each router's learnable scalar bias on the
            logit of its current source, or ``None`` for routers without a bias parameter.
        attnres_query_init: ``"zero"`` (uniform routing at initialisation, as in the paper)
            or ``"normal"`` (std ``initializer_range``).
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_vocab: int
    # None means "derive it" (filled in by __post_init__, so always an int afterwards)
    d_head: int = None  # type: ignore[assignment]
    d_mlp: int = None  # type: ignore[assignment]
    n_key_value_heads: int = None  # type: ignore[assignment]
    n_ctx: int = 2048
    eps: float = 1e-6
    rotary_base: float = 1_000_000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: torch.dtype = torch.float32
    device: str = None  # type: ignore[assignment]
    seed: Optional[int] = None
    model_name: str = "custom"
    original_architecture: str = "Qwen3ForCausalLM"
    default_prepend_bos: bool = False
    tokenizer_prepends_bos: Optional[bool] = None
    tokenizer_name: Optional[str] = None
    default_padding_side: Literal["right", "left"] = "right"

    # --- Block AttnRes -------------------------------------------------------------
    attnres_layout: Literal["cumulative", "kimi", "full", "none"] = "cumulative"
    attnres_num_blocks: int = None  # type: ignore[assignment]
    attnres_mode: Literal["block", "full"] = "block"
    attnres_recency_bias: Optional[float] = 0.0
    attnres_query_init: Literal["zero", "normal"] = "zero"

    # --- fixed by the Qwen3 architecture (TransformerLens reads them) ------------------
    act_fn: str = "silu"
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    gated_mlp: bool = True
    final_rms: bool = True
    use_qk_norm: bool = True
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    uses_rms_norm: bool = True
    rotary_adjacent_pairs: bool = False
    # TransformerLens feature flags whose hooks this model does not have.
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_hook_tokens: bool = False
    layer_norm_folding: bool = False
    num_experts: Optional[int] = None
    experts_per_token: Optional[int] = None

    def _check_types(self) -> None:
        """Every field has its type (a string for a boolean, ``True`` for a number or a
        non-finite float would otherwise be accepted and misread)."""
        # as Python bools (`require_bool`: np.True_ is one, stored as True for the JSON);
        # ValueError, as every other field's refusal
        for name in _BOOL_FIELDS:
            setattr(self, name, require_bool(name, getattr(self, name), error=ValueError))
        self.tokenizer_prepends_bos = require_bool(
            "tokenizer_prepends_bos", self.tokenizer_prepends_bos, optional=True, error=ValueError
        )
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
        if self.tokenizer_name is not None and not isinstance(self.tokenizer_name, str):
            raise ValueError(
                f"tokenizer_name must be a string or None, got {self.tokenizer_name!r}"
            )
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be a string or a torch.device, got {self.device!r}")
        for name in ("eps", "rotary_base", "initializer_range"):
            setattr(self, name, require_finite_number(name, getattr(self, name)))
        self.attnres_recency_bias = require_finite_number(
            "attnres_recency_bias", self.attnres_recency_bias, optional=True
        )
        for name, expected in _FIXED_FLAGS.items():
            if getattr(self, name) != expected:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported: HookedAttnRes "
                    f"implements {name}={expected!r} (a Qwen3 without that TransformerLens "
                    "feature)"
                )

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx"):
            setattr(self, name, require_integer(name, getattr(self, name), 1))
        for name in ("d_head", "d_mlp", "n_key_value_heads", "seed"):  # Python ints (JSON)
            setattr(self, name, require_integer(name, getattr(self, name), optional=True))
        if self.initializer_range < 0:
            raise ValueError(
                f"initializer_range must be a finite number >= 0, got {self.initializer_range!r}"
            )
        if self.d_head is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set d_head explicitly or change n_heads"
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_head < 2 or self.d_head % 2 != 0:
            raise ValueError(
                f"d_head={self.d_head} must be an even integer >= 2 (rotary embeddings rotate "
                "pairs of dimensions)"
            )
        if self.d_mlp is None:
            self.d_mlp = 3 * self.d_model
        if self.d_mlp < 1:
            raise ValueError(f"d_mlp must be an integer >= 1, got {self.d_mlp!r}")
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_key_value_heads < 1 or self.n_heads % self.n_key_value_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of "
                f"n_key_value_heads={self.n_key_value_heads} (grouped-query attention)"
            )
        if self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        self.eps, self.rotary_base = float(self.eps), float(self.rotary_base)
        if not 0 < self.rotary_base:
            raise ValueError(f"rotary_base must be a finite number > 0, got {self.rotary_base!r}")
        self.dtype = _dtype_from_any(self.dtype)
        if self.device is None:
            self.device = "cpu"
        # the loaders' check: a device torch parses but this machine lacks ("cuda:7", any
        # "cuda" without CUDA) was taken, and the model built from it failed in torch's
        # words ("Torch not compiled with CUDA enabled", audit 147)
        check_device(self.device)
        self.device = str(self.device)
        for name, expected in _FIXED_ARCHITECTURE.items():
            if getattr(self, name) != expected:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported: HookedAttnRes implements "
                    f"the Qwen3 architecture, which has {name}={expected!r}"
                )
        if not self.use_qk_norm:
            raise ValueError(
                "use_qk_norm=False is not supported: Qwen3 normalises q and k per head"
            )
        self.default_padding_side = require_choice(  # type: ignore[assignment]
            "default_padding_side", self.default_padding_side, ("right", "left")
        )
        self._validate_attnres()

    def _validate_attnres(self) -> None:
        if self.attnres_layout not in LAYOUTS:
            raise ValueError(
                f"attnres_layout={self.attnres_layout!r} is unknown; choose one of {LAYOUTS}"
            )
        if self.attnres_mode not in MODES:
            raise ValueError(
                f"attnres_mode={self.attnres_mode!r} is unknown; choose one of {MODES}"
            )
        if self.attnres_mode == "full" and self.attnres_layout != "cumulative":
            raise ValueError(
                f"attnres_mode='full' only applies to the cumulative layout (got "
                f"attnres_layout={self.attnres_layout!r}); for per-sublayer sources in the "
                "paper-faithful form use attnres_layout='full'"
            )
        if self.attnres_query_init not in QUERY_INITS:
            raise ValueError(
                f"attnres_query_init={self.attnres_query_init!r} is unknown; choose one of "
                f"{QUERY_INITS}"
            )
        if self.attnres_recency_bias is not None:
            if isinstance(self.attnres_recency_bias, bool) or not math.isfinite(
                float(self.attnres_recency_bias)
            ):
                raise ValueError(
                    "attnres_recency_bias must be a finite number or None, got "
                    f"{self.attnres_recency_bias!r}"
                )
            self.attnres_recency_bias = float(self.attnres_recency_bias)
        if self.attnres_num_blocks is None:
            self.attnres_num_blocks = min(8, self.n_layers)
        n = self.attnres_num_blocks
        if not is_integer(n) or not 1 <= n <= self.n_layers:
            raise ValueError(
                f"attnres_num_blocks={n!r} must be an integer between 1 and n_layers="
                f"{self.n_layers}; each block spans ceil(n_layers / attnres_num_blocks) layers"
            )
        self.attnres_num_blocks = int(n)

    # --- derived quantities ---------------------------------------------------------
    @property
    def d_vocab_out(self) -> int:
        """Output vocabulary size (always ``d_vocab`` for Qwen3)."""
        return self.d_vocab

    @property
    def rotary_dim(self) -> int:
        """Rotated dimensions per head (Qwen3 rotates the whole head)."""
        return self.d_head

    @property
    def layers_per_block(self) -> int:
        """``S = ceil(n_layers / attnres_num_blocks)`` layers per AttnRes block."""
        return math.ceil(self.n_layers / self.attnres_num_blocks)

    @property
    def has_routers(self) -> bool:
        """Deprecated: ``model.routing_layout.has_routers`` (the layout decides)."""
        return self._layout("has_routers").has_routers

    @property
    def has_final_router(self) -> bool:
        """Deprecated: ``model.routing_layout.has_final_router`` (the layout decides)."""
        return self._layout("has_final_router").has_final_router

    def _layout(self, deprecated: Optional[str] = None):
        # the layout rules live in hooked_attnres.model.depth, above this module
        from hooked_attnres.model.depth import RoutingLayout

        if deprecated is not None:
            warnings.warn(
                f"cfg.{deprecated} is deprecated; use model.routing_layout.{deprecated}",
                DeprecationWarning,
                stacklevel=3,
            )
        return RoutingLayout.from_config(self)

    @property
    def n_params(self) -> int:
        """Number of parameters (embedding and unembedding counted once when tied)."""
        d, h, kv, dh = self.d_model, self.n_heads, self.n_key_value_heads, self.d_head
        attn = d * h * dh * 2 + d * kv * dh * 2 + 2 * dh
        mlp = 3 * d * self.d_mlp
        n_routers = len(self._layout().sites())
        per_router = 2 * d + int(self.attnres_recency_bias is not None)
        embed = self.d_vocab * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * d) + n_routers * per_router + embed + d

    # --- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``dtype`` as its name)."""
        out = dataclasses.asdict(self)
        out["dtype"] = dtype_name(self.dtype)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HookedAttnResConfig:
        """Inverse of `to_dict`; unknown keys are an error (they usually mean a typo)."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a dict of fields, got {type(values).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(str(key) for key in set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown HookedAttnResConfig field(s) {unknown}; known fields are {sorted(known)}"
            )
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"missing required HookedAttnResConfig field(s) {missing}")
        return cls(**values)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> HookedAttnResConfig:
        """Parse a JSON string or read a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"the config is not valid JSON ({error})") from error
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> HookedAttnResConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
