"""Load a vanilla Hugging Face Qwen3 checkpoint into AttnRes form (``from_hf_qwen3``).

Three wraps (``../shared/design/attnres.md`` section 4):

* ``"recency"``: the seed paper's baseline. Cumulative layout, zero pseudo-queries,
  key-norm gains 1, recency bias ``b`` on the current source. Routing is
  content-independent (see `hooked_attnres.analysis.schedule.recency_schedule`) but the
  model is *not* the vanilla function at ``b = 3``.
* ``"exact"``: kimi layout with every pseudo-query zero (final router included). Every
  router averages sources that sum to the vanilla residual stream, and every consumer
  is an RMSNorm, so the model equals vanilla Qwen3 up to the RMSNorm epsilon.
* ``"none"``: the plain residual Qwen3 (layout ``"none"``).

Nothing here touches the network: ``source`` is a local directory or an in-memory
``transformers.Qwen3ForCausalLM``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from hooked_attnres._atomic import reading
from hooked_attnres._validation import (
    is_integer,
    require_choice,
    require_finite_number,
    require_integer,
    require_tokenizer,
    some_names,
)
from hooked_attnres.config import HookedAttnResConfig, _dtype_from_any
from hooked_attnres.loading.hf_keys import KeyMap
from hooked_attnres.loading.io import (
    CheckpointError,
    assign_state_dict,
    check_load_arguments,
    default_load_dtype,
    describe_mismatch,
    empty_model,
    load_tokenizer,
    read_config_json,
    read_safetensors,
    read_safetensors_shapes,
    require_finite_weights,
    require_not_lfs_pointer,
    stored_float_dtypes,
    verify_saved_files,
)

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

WRAPS = ("recency", "exact", "none")
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_theta(config: Any) -> float:
    """The rotary base of a HF config, read as ``transformers`` reads it.

    ``transformers`` (4.x and 5.x alike) takes the RoPE settings from ``rope_scaling`` when
    that is set, and otherwise from ``rope_parameters`` (the transformers-5 name); the base
    is that dict's ``rope_theta``, else the top-level ``rope_theta``, else 10000. So a
    ``config.json`` holding both (e.g. a transformers-5 config to which ``rope_scaling``
    was added to extend the context) uses ``rope_scaling``. Only the default RoPE is
    implemented: any other ``rope_type`` and per-layer-type (nested) settings are refused.
    """
    params = _get(config, "rope_scaling") or _get(config, "rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(
            f"RoPE settings {params!r} are not supported: HookedAttnRes implements one default "
            "RoPE for every layer (a dict with rope_type 'default' and rope_theta)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"rope type {rope_type!r} (from {params!r}) is not supported; HookedAttnRes "
            "implements default RoPE only (rope_type 'default')"
        )
    theta = params.get("rope_theta")
    theta = theta if theta is not None else _get(config, "rope_theta", 10_000.0)
    return float(theta)


# transformers' names of SiLU (ACT2FN maps "swish" to torch.nn.SiLU)
SILU_NAMES = ("silu", "swish")

# fields transformers' Qwen3Config types strictly (null is refused by it)
NOT_NULL = (
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "use_sliding_window",
)

# the config fields without a default here: the model's shape
REQUIRED_SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def check_qwen3_config(config: Any, where: str, model_types: tuple[str, ...] = ("qwen3",)) -> None:
    """Refuse configs this package cannot reproduce, saying what was found."""
    model_type = _get(config, "model_type")
    architectures = _get(config, "architectures") or []
    if model_type not in model_types:
        hint = ""
        if model_type in ("qwen3_attnres", "hooked_attnres"):
            hint = "; it is an AttnRes checkpoint: load it with HookedAttnRes.from_pretrained"
        raise CheckpointError(
            f"{where} is not a Qwen3 checkpoint: expected model_type in {list(model_types)}, found "
            f"model_type={model_type!r}, architectures={architectures}{hint}"
        )
    for name in REQUIRED_SIZES:
        value = _get(config, name)
        if not is_integer(value) or value < 1:
            raise CheckpointError(
                f"{where} has {name}={value!r} in its config; expected a positive integer "
                f"(every one of {list(REQUIRED_SIZES)} must be given)"
            )
    problems = []
    if isinstance(config, dict):
        # transformers' Qwen3Config fills a missing field with its class default, not with
        # the value derived from the other sizes (which config_from_hf would use)
        n_heads = config["num_attention_heads"]
        for name, default, derived in (
            ("head_dim", 128, config["hidden_size"] // n_heads),
            ("num_key_value_heads", 32, n_heads),
        ):
            if name not in config and derived != default:
                problems.append(
                    f"no {name} (transformers' Qwen3Config then uses {default}, not {derived}; "
                    f"write the intended {name} into config.json)"
                )
        nulls = [name for name in NOT_NULL if name in config and config[name] is None]
        if nulls:
            # transformers refuses to build such a config; here null would read as a default
            problems.append(
                f"null {nulls} (transformers' Qwen3Config refuses null there: give a value, "
                "or remove the field to mean its default)"
            )
    if _get(config, "hidden_act", "silu") not in SILU_NAMES:
        problems.append(
            f"hidden_act={_get(config, 'hidden_act')!r} (expected one of {list(SILU_NAMES)})"
        )
    if _get(config, "attention_bias", False):
        problems.append("attention_bias=True (expected False)")
    problems += _sliding_window_problems(config)
    if problems:
        raise CheckpointError(f"{where} has unsupported settings: {', '.join(problems)}")


def _n_ctx(config: Any) -> Any:
    """The loaded model's ``n_ctx``: ``max_position_embeddings`` (Qwen3Config's default
    32768 when missing)."""
    return _get(config, "max_position_embeddings", 32768)


def window_covers_n_ctx(window: Any, n_ctx: Any) -> bool:
    """Whether a sliding window of ``window`` positions masks nothing at any sequence length
    a model of context ``n_ctx`` accepts. transformers keeps key ``k`` for query ``q`` iff
    ``k > q - window`` (``masking_utils.sliding_window_overlay``; flash attention's
    ``window_size=(window - 1, ...)`` and the sliding cache's last ``window - 1`` keys
    agree): the last ``window`` positions, the query's own included, so a sequence of
    ``n`` positions is attended in full iff ``n <= window``."""
    return is_integer(window) and is_integer(n_ctx) and window >= n_ctx


def _sliding_window_problems(config: Any) -> list[str]:
    """What makes a layer of ``config`` slide in transformers' Qwen3 over fewer positions
    than the loaded model accepts (none here: every layer attends to every earlier
    position).

    ``transformers`` (``Qwen3Config``) decides it per layer: ``layer_types`` when given
    (a ``"sliding_attention"`` layer is masked with ``sliding_window``, or fails without
    one); otherwise layer ``i`` slides iff ``use_sliding_window`` and ``sliding_window``
    is not null and ``i >= max_window_layers`` (default 28). So ``use_sliding_window:
    true`` with ``max_window_layers >= num_hidden_layers`` (or a null ``sliding_window``)
    runs every layer with full attention, and is loaded; so is a sliding layer whose
    window covers ``max_position_embeddings`` (`window_covers_n_ctx`), the longest sequence
    the loaded model accepts: it equals full attention at every accepted length."""
    n_ctx = _n_ctx(config)
    use_window = _get(config, "use_sliding_window", False)
    unless = (
        f"full attention only, which equals a window of at least max_position_embeddings="
        f"{n_ctx!r}, the longest sequence the loaded model accepts"
    )
    layer_types = _get(config, "layer_types")
    n_layers = _get(config, "num_hidden_layers")
    if layer_types is not None and (
        not isinstance(layer_types, (list, tuple)) or len(layer_types) != n_layers
    ):
        # transformers 5 refuses such a config; transformers 4 fails on a short list
        return [
            f"layer_types={layer_types!r} (expected a list of num_hidden_layers={n_layers} "
            "entries, one per layer, as transformers requires; or remove it)"
        ]
    if layer_types is not None:
        other = sorted({str(kind) for kind in layer_types if kind != "full_attention"})
        where = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
        if not other:
            return []
        found = f"layer_types containing {other} at layers {where}"
        if other != ["sliding_attention"]:
            return [f"{found} (expected only 'full_attention' or 'sliding_attention')"]
        # transformers masks these layers with sliding_window: a config.json's is dropped
        # unless use_sliding_window (Qwen3Config); a config object's has been, and its
        # masks read its sliding_window as it is now
        window = (
            (_get(config, "sliding_window", 4096) if use_window else None)
            if isinstance(config, dict)
            else _get(config, "sliding_window")
        )
        if window is None:
            return [
                f"{found} and no sliding_window (use_sliding_window={use_window!r}): "
                "transformers' Qwen3 cannot mask them (it raises)"
            ]
        if window_covers_n_ctx(window, n_ctx):
            return []
        return [
            f"{found}: transformers' Qwen3 gives them sliding-window attention over the last "
            f"{window!r} positions (sliding_window, each query's own included), which is not "
            f"implemented here ({unless})"
        ]
    window = _get(config, "sliding_window", 4096)
    if not use_window or window is None:
        return []  # transformers drops sliding_window when use_sliding_window is False
    first = _get(config, "max_window_layers", 28)
    if not is_integer(first):
        return [f"use_sliding_window=True with max_window_layers={first!r} (expected an integer)"]
    sliding = list(range(max(first, 0), n_layers))
    if not sliding or window_covers_n_ctx(window, n_ctx):
        return []
    return [
        f"use_sliding_window=True with sliding_window={window!r} and max_window_layers="
        f"{first!r}: transformers' Qwen3 gives layers {sliding} (those >= max_window_layers) "
        f"sliding-window attention over the last {window!r} positions (each query's own "
        f"included), which is not implemented here ({unless}; max_window_layers >= "
        "num_hidden_layers means no sliding layer)"
    ]


def _named_with(module: Any, attribute: str) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in module.named_modules() if hasattr(m, attribute)]


def _summary(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")


def check_module_settings(module: Any, cfg: HookedAttnResConfig, where: str) -> None:
    """Refuse an in-memory ``Qwen3ForCausalLM`` whose layers compute with other settings
    than its ``config`` says (the model is built from the config).

    ``transformers`` reads ``rms_norm_eps``, ``hidden_act``, the RoPE settings and
    ``head_dim`` once, when it builds the layers; a config edited afterwards (or a module
    put together from other parts) no longer describes what the module computes. Checked:
    every RMSNorm's ``variance_epsilon``, every MLP's ``act_fn`` (on probe values), every
    rotary embedding's type, ``attention_scaling`` and ``inv_freq`` (to the rounding of the
    buffer's dtype), every attention's ``head_dim`` and ``scaling``.
    """
    from hooked_attnres.model.rotary import rotary_inv_freq

    problems = []
    for field, found, expected, names in (
        (
            "rms_norm_eps",
            [(n, float(m.variance_epsilon)) for n, m in _named_with(module, "variance_epsilon")],
            cfg.eps,
            "RMSNorm",
        ),
        (
            "head_dim",
            [(n, m.head_dim) for n, m in _named_with(module, "head_dim") if hasattr(m, "scaling")],
            cfg.d_head,
            "attention",
        ),
        (
            "head_dim (attention scaling)",
            [(n, float(m.scaling)) for n, m in _named_with(module, "scaling")],
            cfg.d_head**-0.5,
            "attention",
        ),
    ):
        off = [(n, v) for n, v in found if v != expected]
        if off:
            values = sorted({v for _, v in off})
            problems.append(
                f"{field}: the config says {expected!r} but the {names} modules "
                f"{_summary([n for n, _ in off])} use {values}"
            )
    short = [
        (n, m.sliding_window)
        for n, m in _named_with(module, "sliding_window")
        if hasattr(m, "scaling") and m.sliding_window is not None
        if not window_covers_n_ctx(m.sliding_window, cfg.n_ctx)
    ]
    if short:  # flash attention uses the module's window (the mask, the config's)
        problems.append(
            f"sliding_window: the attention modules {_summary([n for n, _ in short])} were "
            f"built with {sorted({w for _, w in short})}, fewer positions than n_ctx="
            f"{cfg.n_ctx} (max_position_embeddings)"
        )
    probe = torch.linspace(-8.0, 8.0, 33)
    silu = torch.nn.functional.silu(probe)
    off_act = [
        n
        for n, m in _named_with(module, "act_fn")
        if not torch.allclose(m.act_fn(probe).float(), silu, rtol=1e-6, atol=1e-7)
    ]
    if off_act:
        problems.append(f"hidden_act: the MLPs {_summary(off_act)} do not compute SiLU")
    expected_freq = rotary_inv_freq(cfg.d_head, cfg.rotary_base).double()
    for name, rotary in _named_with(module, "inv_freq"):
        rope_type = getattr(rotary, "rope_type", "default")
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        freq = rotary.inv_freq.detach().cpu()
        same = freq.shape == expected_freq.shape and torch.allclose(
            freq.double(),
            expected_freq.to(freq.dtype).double(),
            rtol=max(1e-6, torch.finfo(freq.dtype).eps),
            atol=0.0,
        )
        differences = [f"rope_type={rope_type!r}"] if rope_type != "default" else []
        differences += [f"attention_scaling={scaling!r}"] if scaling != 1.0 else []
        differences += [] if same else ["other frequencies (inv_freq)"]
        if differences:
            problems.append(
                f"RoPE: the config says default RoPE with rope_theta={cfg.rotary_base!r} and "
                f"head_dim={cfg.d_head} but {name or 'the module'} has {', '.join(differences)}"
            )
    if problems:
        raise CheckpointError(
            f"{where} does not compute what its config says (transformers reads these "
            f"settings when it builds the layers, so a config edited afterwards does not "
            f"change the module): {'; '.join(problems)}. Build the module from the config "
            "it is meant to have (e.g. Qwen3ForCausalLM.from_pretrained or "
            "Qwen3ForCausalLM(config) + load_state_dict), or load its directory"
        )


def config_from_hf(config: Any, **overrides: Any) -> HookedAttnResConfig:
    """A `HookedAttnResConfig` with the shape of a HF Qwen3 config (dict or object)."""
    n_heads = _get(config, "num_attention_heads")
    values = dict(
        d_model=_get(config, "hidden_size"),
        n_layers=_get(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_key_value_heads=_get(config, "num_key_value_heads") or n_heads,
        d_head=_get(config, "head_dim") or _get(config, "hidden_size") // n_heads,
        d_mlp=_get(config, "intermediate_size"),
        d_vocab=_get(config, "vocab_size"),
        n_ctx=_n_ctx(config),  # the context the sliding windows are checked against
        eps=float(_get(config, "rms_norm_eps", 1e-6)),
        rotary_base=rope_theta(config),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        original_architecture="Qwen3ForCausalLM",
    )
    values.update(overrides)
    return HookedAttnResConfig(**values)


def _require_wrap_uses(wrap: str, num_blocks: Optional[int], recency_bias: Optional[float]) -> None:
    """Refuse a ``num_blocks`` or ``recency_bias`` given (not ``None``) with a wrap that
    does not use it (`wrap_overrides`): it would be ignored, and the model not the one
    asked for (``wrap="none"`` loads the plain Qwen3 whatever ``num_blocks``)."""
    if num_blocks is not None and wrap == "none":
        raise ValueError(
            "num_blocks applies to the recency and exact wraps (the AttnRes blocks they "
            "route over); wrap='none' loads the plain residual Qwen3, which has no blocks, "
            "and would ignore it: leave num_blocks out, or pass wrap='recency' or 'exact'"
        )
    if recency_bias is not None and wrap != "recency":
        has = "routes without a bias" if wrap == "exact" else "has no routers"
        raise ValueError(
            f"recency_bias applies to the recency wrap only; wrap={wrap!r} {has} and would "
            "ignore it: leave recency_bias out, or pass wrap='recency'"
        )


def wrap_overrides(wrap: str, num_blocks: int, recency_bias: float) -> dict[str, Any]:
    """The AttnRes config fields of each wrap."""
    if wrap == "recency":
        return dict(
            attnres_layout="cumulative",
            attnres_num_blocks=num_blocks,
            attnres_recency_bias=float(recency_bias),
            attnres_query_init="zero",
        )
    if wrap == "exact":
        return dict(
            attnres_layout="kimi",
            attnres_num_blocks=num_blocks,
            attnres_recency_bias=None,
            attnres_query_init="zero",
        )
    if wrap == "none":
        return dict(attnres_layout="none")
    raise ValueError(f"wrap must be one of {WRAPS}, got {wrap!r}")


def _router_state(model: HookedAttnRes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero queries, unit key-norm gains and the configured bias for every router."""
    cfg = model.cfg
    state = {}
    for name, param in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(".query"):
            state[name] = torch.zeros(param.shape, dtype=dtype)
        elif name.endswith("key_norm.w"):
            state[name] = torch.ones(param.shape, dtype=dtype)
        elif leaf == "recency_bias":
            state[name] = torch.tensor(cfg.attnres_recency_bias, dtype=dtype)
    return state


def check_tied_head(embed: torch.Tensor, head: torch.Tensor, where: str) -> None:
    """Refuse ``tie_word_embeddings=True`` next to an ``lm_head.weight`` that is not the
    embedding: ``transformers`` 5 then leaves the two untied and unembeds with the separate
    ``lm_head`` (with a warning), ``transformers`` 4 ties them to the embedding, so the
    checkpoint does not say which model it is. A copy equal to the embedding is fine."""
    if head.shape == embed.shape and (
        head.data_ptr() == embed.data_ptr() or torch.equal(head.to(embed.dtype), embed)
    ):
        return
    found = f"shape {tuple(head.shape)}"
    if head.shape == embed.shape:
        found = f"max |difference| {(head.to(embed.dtype) - embed).abs().max().item():.3g}"
    raise CheckpointError(
        f"{where} has tie_word_embeddings=True but also an {_HEAD} that differs from "
        f"{_EMBED} ({found}); transformers 5 unembeds with the separate {_HEAD}, "
        "transformers 4 with the embedding. Set tie_word_embeddings to false (in config.json, "
        f"or on the module's config) to load the separate {_HEAD}, or remove {_HEAD} to tie"
    )


def hf_weight_files(directory: Path) -> dict[str, Path]:
    """HF key -> safetensors file of a (possibly sharded) checkpoint directory."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists() and single.exists():
        # transformers loads model.safetensors and ignores the index and its shards; its
        # own save_pretrained leaves both behind when a sharded save replaces a single
        # file (the new shards beside the stale file) or the reverse (a stale index)
        raise CheckpointError(
            f"{directory} holds both {single.name} and {index.name}, so it does not say which "
            f"weights are the model: transformers loads {single.name} and ignores the shards, "
            "and save_pretrained leaves both behind when one layout is saved over the other "
            f"(the newer save is either). Delete the stale one (its modification time may "
            "tell) and load again"
        )
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            require_not_lfs_pointer(index)
            raise CheckpointError(f"{index} is not a valid shard index ({error})") from error
        if not isinstance(weight_map, dict) or not all(
            isinstance(key, str) and isinstance(shard, str) for key, shard in weight_map.items()
        ):
            raise CheckpointError(
                f"{index} is not a valid shard index: its weight_map must map weight names to "
                f"shard file names, got {type(weight_map).__name__}"
            )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(
                f"{directory} is missing {len(missing)} of {len(shards)} shard(s) named in "
                f"{index.name}: {missing}"
            )
        return {key: directory / shard for key, shard in weight_map.items()}
    if single.exists():
        return {key: single for key in read_safetensors_shapes(single)}
    found = some_names(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise CheckpointError(
        f"{directory} has no model.safetensors or model.safetensors.index.json (found {found}); "
        "only safetensors checkpoints are supported"
    )


def _file_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        for key, shape in read_safetensors_shapes(path).items():
            if files.get(key) == path:
                shapes[key] = shape
    return shapes


def _require_hf_shapes(
    model: HookedAttnRes,
    keymap: KeyMap,
    found: dict[str, tuple[int, ...]],
    whose: str,
    config_name: str,
) -> dict[str, tuple[int, ...]]:
    """The HF keys and shapes ``model`` needs (``keymap.hf_shapes``), after checking that
    ``found`` (a checkpoint's keys and shapes, ignored keys and a tied ``lm_head`` aside)
    has exactly them; the error names the missing, unexpected and mis-shaped keys."""
    expected = dict(keymap.hf_shapes({n: tuple(t.shape) for n, t in model.state_dict().items()}))
    found = {k: s for k, s in found.items() if not k.endswith(_IGNORED_HF_KEYS)}
    if model.cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    problem = describe_mismatch(expected, found)
    if problem:
        base = _base_model_refusal(expected, found, model.cfg.tie_word_embeddings)
        if base is not None:
            raise CheckpointError(f"the weights {whose} {base}")
        raise CheckpointError(f"the weights {whose} do not match {config_name}: {problem}")
    return expected


def _base_model_refusal(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], tied: bool
) -> Optional[str]:
    """Why weights that are a base ``Qwen3Model``'s (every key the causal LM needs but
    ``lm_head.weight``, without the ``model.`` prefix; what ``Qwen3Model.save_pretrained``
    writes) are refused, and what to do; ``None`` for any other mismatch."""
    prefixed = {"model." + key: shape for key, shape in found.items()}
    body = {key: shape for key, shape in expected.items() if key != _HEAD}
    if not found or prefixed != body:
        return None
    if tied:
        todo = (
            "its config ties the head to the embedding (tie_word_embeddings=true), so "
            "transformers' Qwen3ForCausalLM.from_pretrained of it (or of a directory the "
            "module was saved to) builds the full model: pass that module to from_hf_qwen3"
        )
    else:
        todo = (
            "its config does not tie the head to the embedding (tie_word_embeddings=false), "
            "so the head's weights are not in it (transformers would draw a random head): "
            "load the Qwen3ForCausalLM checkpoint it was taken from"
        )
    return (
        "are a base Qwen3Model's (keys without the 'model.' prefix, no lm_head.weight): "
        f"the transformer without its language-model head, which gives no logits; {todo}"
    )


def load_hf_weights(
    model: HookedAttnRes,
    files: dict[str, Path],
    keymap: KeyMap,
    dtype: torch.dtype,
    where: str,
    mmap: bool = False,
) -> dict[str, torch.Tensor]:
    """Read and convert every HF tensor our (empty) model needs, file by file.

    Shapes are checked before any tensor is read; the error names missing,
    unexpected and mis-shaped keys. Tensors are copied (``mmap=False``) or memory-mapped
    (see `hooked_attnres.loading.io.read_safetensors`); non-floating tensors are refused.
    """
    expected = _require_hf_shapes(model, keymap, _file_shapes(files), f"in {where}", "config.json")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        for key, tensor in read_safetensors(path, keys, dtype=dtype, mmap=mmap).items():
            name, converted = keymap.to_ours(key, tensor)
            state[name] = converted
    if model.cfg.tie_word_embeddings and _HEAD in files:
        # compared as stored (memory-mapped: nothing is copied)
        embed = read_safetensors(files[_EMBED], [_EMBED], mmap=True)[_EMBED]
        check_tied_head(embed, read_safetensors(files[_HEAD], [_HEAD], mmap=True)[_HEAD], where)
    return state


def from_hf_qwen3(
    source: Union[str, Path, Any],
    wrap: str = "recency",
    num_blocks: Optional[int] = None,
    recency_bias: Optional[float] = None,
    dtype: Union[str, torch.dtype, None] = None,
    device: Union[str, torch.device] = "cpu",
    tokenizer=None,
    model_class: Optional[type] = None,
    mmap: bool = False,
    verify: bool = True,
):
    """Load a vanilla Qwen3 (local directory or in-memory ``Qwen3ForCausalLM``).

    Args:
        source: a directory with ``config.json`` and ``model.safetensors`` (or shards
            with ``model.safetensors.index.json``), or a ``Qwen3ForCausalLM``.
        wrap: ``"recency"``, ``"exact"`` or ``"none"`` (see the module docstring).
        num_blocks: AttnRes blocks for the recency and exact wraps (clipped to
            ``n_layers``; default 8). ``wrap="none"`` has no blocks: a ``num_blocks`` given
            with it raises ``ValueError`` (it would be ignored).
        recency_bias: the recency wrap's bias ``b`` (default 3.0); given with another wrap
            it raises ``ValueError`` (the exact wrap has no bias, ``"none"`` no routers).
        dtype: of the returned model (default: float32, or float64 if a weight is
            float64, so that the default never rounds a weight; bfloat16 and float16
            weights convert to float32 exactly).
        device: of the returned model.
        tokenizer: attach this tokenizer (default: the directory's, when present).
        model_class: the class to build (default `HookedAttnRes`; ``from_hf_qwen3`` passes
            its own).
        mmap: memory-map the weights of a directory instead of copying them (see
            ``docs/loading.md``); default: copy.
        verify: refuse a directory saved by this library (the trainer's vanilla models)
            whose files changed after the save, or one without a completion marker whose
            files differ from the digest manifest that lists them (the shipped vanilla
            checkpoints' ``SHA256SUMS``) (`CheckpointIntegrityError`, see
            ``docs/loading.md``); ``False`` loads it unchecked. Other directories without a
            marker (Hugging Face's) are never checked.

    Returns:
        A `HookedAttnRes` in eval mode.
    """
    wrap = require_choice("wrap", wrap, WRAPS)
    num_blocks = require_integer("num_blocks", num_blocks, 1, optional=True)
    recency_bias = require_finite_number("recency_bias", recency_bias, optional=True)
    _require_wrap_uses(wrap, num_blocks, recency_bias)
    num_blocks = 8 if num_blocks is None else num_blocks
    recency_bias = 3.0 if recency_bias is None else recency_bias
    mmap, verify = check_load_arguments(device, mmap, verify)
    require_tokenizer("tokenizer", tokenizer)  # before the weights are read
    dtype = None if dtype is None else _dtype_from_any(dtype)
    if isinstance(source, (str, Path)):
        with reading(Path(source)):
            if verify:
                verify_saved_files(Path(source))
            return _from_hf_qwen3(
                source, wrap, num_blocks, recency_bias, dtype, device, tokenizer, model_class, mmap
            )
    return _from_hf_qwen3(
        source, wrap, num_blocks, recency_bias, dtype, device, tokenizer, model_class, mmap
    )


def _from_hf_qwen3(
    source, wrap, num_blocks, recency_bias, dtype, device, tokenizer, model_class, mmap
):
    if isinstance(source, (str, Path)):
        directory = Path(source)
        hf_config = read_config_json(directory)
        where = str(directory)
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        directory, hf_config, where = None, source.config, f"the in-memory {type(source).__name__}"
    else:
        raise TypeError(
            "source must be a checkpoint directory or a transformers Qwen3ForCausalLM, got "
            f"{type(source).__name__}"
        )
    check_qwen3_config(hf_config, where)
    files = None if directory is None else hf_weight_files(directory)
    if dtype is None:
        stored = (
            stored_float_dtypes(files.values())
            if files is not None
            else {tensor.dtype for tensor in source.state_dict().values()}
        )
        dtype = default_load_dtype(stored)
    n_layers = _get(hf_config, "num_hidden_layers")
    cfg = config_from_hf(
        hf_config, dtype=dtype, **wrap_overrides(wrap, min(num_blocks, n_layers), recency_bias)
    )
    if directory is not None and tokenizer is None:
        tokenizer = load_tokenizer(directory)
    model = empty_model(cfg, tokenizer=tokenizer, model_class=model_class)
    keymap = KeyMap(cfg)
    if files is not None:
        state = load_hf_weights(model, files, keymap, dtype, where, mmap=mmap)
    else:
        check_module_settings(source, cfg, where)
        weights = source.state_dict()  # type: ignore[union-attr]
        needed = _require_hf_shapes(
            model,
            keymap,
            {key: tuple(tensor.shape) for key, tensor in weights.items()},
            f"of {where}",
            "its config (from_hf_qwen3 takes a Qwen3ForCausalLM)",
        )
        if cfg.tie_word_embeddings and _HEAD in weights and _EMBED in weights:
            check_tied_head(weights[_EMBED], weights[_HEAD], where)
        cast = {key: weights[key].detach().to(dtype) for key in needed}
        require_finite_weights(
            cast, where, {key: weights[key] for key in needed if weights[key].dtype != dtype}
        )
        state = {}
        for key in needed:
            name, converted = keymap.to_ours(key, cast[key])
            # a private copy (the model must not alias the caller's module) in the HF
            # memory order, which the forward multiplies without copying (hf_keys)
            state[name] = converted.clone()
    state.update(_router_state(model, dtype))
    try:
        return assign_state_dict(model, state, device)
    except RuntimeError as error:  # load_state_dict lists missing / unexpected / mis-shaped keys
        raise CheckpointError(f"the weights of {where} do not fit its config: {error}") from error
