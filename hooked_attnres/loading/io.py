"""Checkpoint I/O shared by every format: errors, safetensors, ``config.json``, tokenizers,
and an empty model to fill. The lowest layer of `hooked_attnres.loading`: it imports no
other loading module and no model module (the model class is passed in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from hooked_attnres._atomic import backups_of, recover
from hooked_attnres.config import HookedAttnResConfig

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

CONFIG_NAME = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


def describe_mismatch(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], limit: int = 20
) -> Optional[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k])
    )
    if not (missing or unexpected or misshaped):
        return None

    def show(names: list[str], render) -> str:
        shown = ", ".join(render(n) for n in names[:limit])
        return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): " + show(missing, str))
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): " + show(unexpected, str))
    if misshaped:
        parts.append(
            f"mis-shaped keys ({len(misshaped)}): "
            + show(
                misshaped, lambda k: f"{k} expected {tuple(expected[k])} found {tuple(found[k])}"
            )
        )
    return "; ".join(parts)


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"could not read {path}: the file is truncated or not a safetensors file ({error})"
        ) from error


def read_safetensors(
    path: Path, keys: Optional[list[str]] = None, dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (optionally a subset, optionally cast)."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in keys if keys is not None else list(handle.keys()):
                tensor = handle.get_tensor(key)
                out[key] = tensor if dtype is None else tensor.to(dtype)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"could not read {path}: the file is truncated or corrupt ({error})"
        ) from error
    return out


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory, with clear errors."""
    directory = Path(directory)
    if not directory.exists():
        recovered = recover(directory)
        if not recovered:
            hint = ""
            if backups_of(directory):
                hint = f" (a backup exists: {backups_of(directory)[-1]})"
            raise FileNotFoundError(f"no checkpoint directory at {directory}{hint}")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; a checkpoint is a directory")
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; found {sorted(p.name for p in directory.iterdir())}"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or ``None`` if there is none."""
    if not any((Path(directory) / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also reads config.json and warns that model_type is not one of its
    # own; the tokenizer files are what matter here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def default_model_class() -> type:
    """`HookedAttnRes`, for loaders called directly rather than through
    ``HookedAttnRes.from_pretrained`` / ``from_hf_qwen3`` (which pass their class in)."""
    from hooked_attnres.model.hooked_attnres import HookedAttnRes  # the model sits above loading

    return HookedAttnRes


def empty_model(cfg: HookedAttnResConfig, tokenizer=None, model_class: Optional[type] = None):
    """A model of ``model_class`` (default `HookedAttnRes`) whose parameters live on the
    meta device (no memory, no initialisation), for a loader to fill."""
    model_class = default_model_class() if model_class is None else model_class
    with torch.device("meta"):
        return model_class(cfg.replace(device="meta"), tokenizer=tokenizer)


def assign_state_dict(
    model: HookedAttnRes, state: dict[str, torch.Tensor], device: Union[str, torch.device]
):
    """Make ``state``'s tensors the model's parameters (no copies) and finish set-up."""
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    return model
