"""This package's own checkpoint format.

A checkpoint is a directory:

* ``config.json``: ``{"model_type": "hooked_attnres", "format_version": 1, ...}`` plus
  every `HookedAttnResConfig` field (``device`` is not stored) and, only for a model whose
  parameters have more than one dtype, ``parameter_dtypes``: ``{name: dtype name}`` of the
  parameters whose dtype is not ``dtype`` (a model of one dtype writes what earlier
  versions wrote);
* ``model.safetensors``: the ``state_dict`` (TransformerLens-style names such as
  ``blocks.0.attn.W_Q``; no ``unembed.W_U`` when embeddings are tied);
* tokenizer files, when a tokenizer is attached.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors.torch import save_file

from hooked_attnres._version import __version__
from hooked_attnres.config import HookedAttnResConfig, _dtype_from_any, dtype_name
from hooked_attnres.loading.io import (
    CONFIG_NAME,
    CheckpointError,
    assign_state_dict,
    check_float_tensors,
    describe_mismatch,
    model_with_saved_tokenizer,
    read_safetensors,
    read_safetensors_info,
    save_tokenizer,
)

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

FORMAT = "hooked_attnres"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
# config.json's record of the parameters whose dtype is not the config's ``dtype``
PARAMETER_DTYPES = "parameter_dtypes"
# the `HookedAttnResConfig` fields a save does not write (where the model runs is not part of it)
UNSAVED_FIELDS = ("device",)
# the fields a version-1 config.json may lack: the unsaved ones, and ``default_padding_side``,
# added after the format (a checkpoint saved before it, as the shipped ``attnres_seed0``,
# pads on the right, its default). Every other field has been written by every save since
# the first, so one that is missing means a config this library did not write, and its
# default would be another model
FIELDS_A_SAVE_MAY_LACK = (*UNSAVED_FIELDS, "default_padding_side")


def write_checkpoint_files(model: HookedAttnRes, directory: Path) -> None:
    """Write this package's checkpoint files into an existing directory (not atomic)."""
    config = {
        "model_type": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
    }
    config.update(model.cfg.to_dict())
    for name in UNSAVED_FIELDS:
        config.pop(name)
    state = {
        name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
    }
    odd = {k: dtype_name(t.dtype) for k, t in state.items() if t.dtype != model.cfg.dtype}
    if odd:  # e.g. float32 routers in a bfloat16 model: loaded back in their own dtype
        config[PARAMETER_DTYPES] = odd
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    if model.tokenizer is not None:
        save_tokenizer(model, directory)


def load_own_format(
    directory: Path,
    values: dict[str, Any],
    model_class: Optional[type] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    mmap: bool = False,
):
    """Build the model of a ``hooked_attnres`` checkpoint whose parsed ``config.json`` is
    ``values``; every key, shape and dtype is checked before a tensor is read (a tensor
    whose dtype differs from the config's ``dtype``, or for a parameter it records in
    ``parameter_dtypes`` from that, is refused unless ``dtype`` asks for a conversion).
    Without ``dtype`` every parameter keeps its stored dtype and bits; with it every
    parameter is converted to ``dtype``."""
    values = dict(values)
    version = values.pop("format_version", None)
    if type(version) is not int or version != FORMAT_VERSION:  # 1.0 and true equal 1
        raise CheckpointError(
            f"{directory} has format_version={version!r}; this library reads version "
            f"{FORMAT_VERSION}"
        )
    for key in ("model_type", "library_version"):
        values.pop(key, None)
    recorded = _recorded_dtypes(directory, values.pop(PARAMETER_DTYPES, {}))
    _require_saved_fields(directory, values)
    try:
        cfg = HookedAttnResConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} is not a valid config: {error}"
        ) from error
    if dtype is not None:
        cfg = cfg.replace(dtype=_dtype_from_any(dtype))
    saved_dtype = None if dtype is not None else cfg.dtype

    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
    model = model_with_saved_tokenizer(cfg, directory, model_class)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    info = read_safetensors_info(weights)
    problem = describe_mismatch(expected, {key: shape for key, (shape, _) in info.items()})
    if problem:
        raise CheckpointError(f"{weights} does not match {directory / CONFIG_NAME}: {problem}")
    unknown = sorted(set(recorded) - set(expected))
    if unknown:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: {PARAMETER_DTYPES} names parameters the model does "
            f"not have: {', '.join(unknown)}"
        )
    check_float_tensors(weights, info, expected, saved_dtype, recorded)
    # no dtype: every tensor as stored, which the check above found to be its recorded one
    state = read_safetensors(weights, dtype=None if dtype is None else cfg.dtype, mmap=mmap)
    return assign_state_dict(model, state, device or "cpu")


def _require_saved_fields(directory: Path, values: dict[str, Any]) -> None:
    """Refuse a ``config.json`` that lacks a field every save of format version 1 wrote
    (all but `FIELDS_A_SAVE_MAY_LACK`): its default is not what was saved (e.g. no
    ``attnres_num_blocks`` read as ``min(8, n_layers)``, no ``eps`` as 1e-6)."""
    missing = [
        f.name
        for f in dataclasses.fields(HookedAttnResConfig)
        if f.name not in values and f.name not in FIELDS_A_SAVE_MAY_LACK
    ]
    if missing:
        raise CheckpointError(
            f"{directory} has no {missing} in its {CONFIG_NAME}, which every save of format "
            f"version {FORMAT_VERSION} writes: the defaults need not be the saved model's (a "
            "config.json written by hand or another tool must give every field of "
            f"HookedAttnResConfig.to_dict() but {list(FIELDS_A_SAVE_MAY_LACK)})"
        )


def _recorded_dtypes(directory: Path, record: Any) -> dict[str, torch.dtype]:
    """``parameter_dtypes`` of a ``config.json`` as ``{name: torch dtype}``, checked."""
    if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: {PARAMETER_DTYPES} must map parameter names to dtype "
            f"names, got {record!r}"
        )
    try:
        return {name: _dtype_from_any(value) for name, value in record.items()}
    except ValueError as error:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {PARAMETER_DTYPES}: {error}") from None
