"""This package's own checkpoint format.

A checkpoint is a directory:

* ``config.json``: ``{"model_type": "hooked_attnres", "format_version": 1, ...}`` plus
  every `HookedAttnResConfig` field (``device`` is not stored);
* ``model.safetensors``: the ``state_dict`` (TransformerLens-style names such as
  ``blocks.0.attn.W_Q``; no ``unembed.W_U`` when embeddings are tied);
* tokenizer files, when a tokenizer is attached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors.torch import save_file

from hooked_attnres._version import __version__
from hooked_attnres.config import HookedAttnResConfig, _dtype_from_any
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


def write_checkpoint_files(model: HookedAttnRes, directory: Path) -> None:
    """Write this package's checkpoint files into an existing directory (not atomic)."""
    config = {
        "model_type": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
    }
    config.update(model.cfg.to_dict())
    config.pop("device")
    state = {
        name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
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
    whose dtype differs from the config's is refused unless ``dtype`` asks for a
    conversion)."""
    values = dict(values)
    version = values.pop("format_version", None)
    if type(version) is not int or version != FORMAT_VERSION:  # 1.0 and true equal 1
        raise CheckpointError(
            f"{directory} has format_version={version!r}; this library reads version "
            f"{FORMAT_VERSION}"
        )
    for key in ("model_type", "library_version"):
        values.pop(key, None)
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
    check_float_tensors(weights, info, expected, saved_dtype)
    state = read_safetensors(weights, dtype=cfg.dtype, mmap=mmap)
    return assign_state_dict(model, state, device or "cpu")
