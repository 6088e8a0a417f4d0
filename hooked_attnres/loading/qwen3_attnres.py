"""The public ``qwen3_attnres`` checkpoint format (open-attention-residuals).

A Hugging Face directory: ``config.json`` with ``model_type = "qwen3_attnres"`` and
``attnres_num_blocks``, ``attnres_recency_bias_init``, ``attnres_mode`` (``"block"`` or
``"full"``), ``attnres_gate_type``; safetensors weights (one file or shards with an
index) holding the standard Qwen3 keys plus, per layer ``i``,
``model.layers.{i}.attn_res_proj.weight [1, d]``, ``model.layers.{i}.attn_res_norm.weight
[d]``, ``model.layers.{i}.attn_res_bias []`` and the same three with ``mlp_res_``.

It is the cumulative layout (``attnres.md`` section 2a): the attention and MLP routers
read ``blocks + [current]``, blocks are snapshots of the residual stream every
``ceil(L / N)`` layers (every sublayer in ``"full"`` mode), and there is no final router.
Only ``attnres_gate_type = "bias"`` has that meaning; the sigmoid gates of the same code
base mix the router output with the stream and are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from safetensors.torch import save_file

from hooked_attnres._atomic import atomic_directory, reading
from hooked_attnres._validation import is_finite_number, is_integer
from hooked_attnres.config import _dtype_from_any, dtype_name
from hooked_attnres.loading.hf_keys import KeyMap
from hooked_attnres.loading.hf_qwen3 import (
    check_qwen3_config,
    config_from_hf,
    hf_weight_files,
    load_hf_weights,
)
from hooked_attnres.loading.io import (
    CheckpointError,
    assign_state_dict,
    check_load_arguments,
    default_load_dtype,
    model_with_saved_tokenizer,
    read_config_json,
    save_tokenizer,
    stored_float_dtypes,
    verify_saved_files,
)

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

MODEL_TYPE = "qwen3_attnres"
ARCHITECTURE = "Qwen3AttnResForCausalLM"
SUPPORTED_GATES = ("bias",)


# the attnres_* fields of a qwen3_attnres config this loader reads; any other changes the
# model in a way it does not implement (e.g. forks' attnres_num_heads, attnres_use_null_source)
KNOWN_ATTNRES_FIELDS = (
    "attnres_gate_type",
    "attnres_mode",
    "attnres_num_blocks",
    "attnres_recency_bias_init",
)


def attnres_overrides(values: dict, where: str) -> dict:
    """Our ``attnres_*`` fields for a ``qwen3_attnres`` config, or a clear refusal."""
    unknown = sorted(
        key for key in values if key.startswith("attnres_") and key not in KNOWN_ATTNRES_FIELDS
    )
    if unknown:
        raise CheckpointError(
            f"{where} has attnres fields this loader does not implement: {unknown} (it reads "
            f"{list(KNOWN_ATTNRES_FIELDS)}); a fork's extra routing options would be ignored "
            "silently, so the checkpoint is refused"
        )
    # a missing field takes the public code's default (docs/loading.md, audit 206)
    gate = values.get("attnres_gate_type", "bias")
    if gate not in SUPPORTED_GATES:
        raise CheckpointError(
            f"{where} has attnres_gate_type={gate!r}; only {list(SUPPORTED_GATES)} is supported "
            "(the sigmoid gates blend the router output with the stream, which is not Block "
            "AttnRes routing)"
        )
    mode = values.get("attnres_mode", "block")
    if mode not in ("block", "full"):
        raise CheckpointError(f"{where} has attnres_mode={mode!r}; expected 'block' or 'full'")
    num_blocks = values.get("attnres_num_blocks", 8)
    if not is_integer(num_blocks) or num_blocks < 1:
        raise CheckpointError(
            f"{where} has attnres_num_blocks={num_blocks!r}; expected an integer >= 1"
        )
    bias = values.get("attnres_recency_bias_init", 3.0)
    if not is_finite_number(bias):
        raise CheckpointError(
            f"{where} has attnres_recency_bias_init={bias!r}; expected a finite number"
        )
    n_layers = values["num_hidden_layers"]  # a positive integer (check_qwen3_config)
    return dict(
        attnres_layout="cumulative",
        attnres_mode=mode,
        # more blocks than layers means one layer per block there, as min(N, L) does here
        attnres_num_blocks=min(num_blocks, n_layers),
        attnres_recency_bias=float(bias),
    )


def load_qwen3_attnres(
    directory: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    model_class: Optional[type] = None,
    mmap: bool = False,
    verify: bool = True,
):
    """Load a ``qwen3_attnres`` directory as a cumulative-layout `HookedAttnRes`.

    Args:
        directory: the checkpoint directory (single or sharded safetensors).
        device: default ``"cpu"``.
        dtype: default float32 (float64 if a weight is stored in float64: the default never
            rounds a weight).
        mmap: memory-map instead of copying (see `hooked_attnres.loading.load_checkpoint`).
        verify: refuse files changed after the save, or differing from a digest manifest
            that lists them (see `load_checkpoint`).
    """
    directory = Path(directory)
    mmap, verify = check_load_arguments(device, mmap, verify)
    with reading(directory):
        if verify:
            verify_saved_files(directory)
        return load_unchecked(directory, device, dtype, model_class, mmap)


def load_unchecked(directory: Path, device, dtype, model_class, mmap: bool):
    """`load_qwen3_attnres` without its checks of the arguments (`check_load_arguments`),
    its lock and its verification: for `load_checkpoint`, which made them (once)."""
    values = read_config_json(directory)
    where = str(directory)
    check_qwen3_config(values, where, model_types=(MODEL_TYPE,))
    files = hf_weight_files(directory)
    if dtype is not None:
        dtype = _dtype_from_any(dtype)
    else:  # float64 for a float64 model's export: float32 would round its weights
        dtype = default_load_dtype(stored_float_dtypes(files.values()))
    cfg = config_from_hf(values, dtype=dtype, **attnres_overrides(values, where))
    model = model_with_saved_tokenizer(cfg, directory, model_class)
    state = load_hf_weights(model, files, KeyMap(cfg, routers=True), dtype, where, mmap=mmap)
    return assign_state_dict(model, state, device or "cpu")


def qwen3_attnres_config(model: HookedAttnRes) -> dict:
    """The ``config.json`` of a cumulative-layout model in the public format."""
    cfg = model.cfg
    bias = cfg.attnres_recency_bias
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_key_value_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "rope_theta": cfg.rotary_base,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "dtype": dtype_name(cfg.dtype),
        "attnres_num_blocks": cfg.attnres_num_blocks,
        "attnres_recency_bias_init": 0.0 if bias is None else bias,
        "attnres_mode": cfg.attnres_mode,
        "attnres_gate_type": "bias",
    }


def save_qwen3_attnres(
    model: HookedAttnRes, directory: Union[str, Path], overwrite: bool = False
) -> Path:
    """Write a cumulative-layout model in the public format (atomically; ``overwrite`` as
    in `hooked_attnres.loading.save_checkpoint`).

    Routers without a bias parameter are written with bias 0, which routes identically.
    What the format cannot hold is listed in ``docs/loading.md`` (round trips); a model
    with ``default_prepend_bos=True`` is refused (strings would lose their BOS on load).
    """
    cfg = model.cfg
    if cfg.attnres_layout != "cumulative":
        raise ValueError(
            f"format='qwen3_attnres' holds cumulative-layout models only; this model has "
            f"attnres_layout={cfg.attnres_layout!r} (save it in the default format instead)"
        )
    if cfg.default_prepend_bos:
        raise ValueError(
            "format='qwen3_attnres' has no field for default_prepend_bos=True: the loaded "
            "model would tokenise strings without the BOS token, so string inputs would give "
            "other logits. Save in the default format, or set model.cfg.default_prepend_bos "
            "= False (and pass prepend_bos=True where it is wanted) before exporting"
        )
    keymap = KeyMap(cfg, routers=True)
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name, converted = keymap.to_hf(name, tensor.detach().cpu())
        state[hf_name] = converted.contiguous()
    if cfg.attnres_recency_bias is None:
        for layer in range(cfg.n_layers):
            for prefix in ("attn_res", "mlp_res"):
                state[f"model.layers.{layer}.{prefix}_bias"] = torch.zeros((), dtype=cfg.dtype)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(
            json.dumps(qwen3_attnres_config(model), indent=2) + "\n", encoding="utf-8"
        )
        if model.tokenizer is not None:
            save_tokenizer(model, tmp)
    return directory
