"""This package's own checkpoint format, and the entry point that reads any format.

A checkpoint is a directory:

* ``config.json``: ``{"model_type": "hooked_attnres", "format_version": 1, ...}`` plus
  every `HookedAttnResConfig` field (``device`` is not stored);
* ``model.safetensors``: the ``state_dict`` (TransformerLens-style names such as
  ``blocks.0.attn.W_Q``; no ``unembed.W_U`` when embeddings are tied);
* tokenizer files, when a tokenizer is attached.

Writes are atomic (`hooked_attnres._atomic.atomic_directory`). Reads check every key
and shape before touching the model and name what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hooked_attnres import __version__
from hooked_attnres._atomic import atomic_directory, backups_of, recover
from hooked_attnres.config import HookedAttnResConfig, _dtype_from_any

FORMAT = "hooked_attnres"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


def _describe_mismatch(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], limit: int = 20
) -> Optional[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
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
            + show(misshaped, lambda k: f"{k} expected {tuple(expected[k])} found {tuple(found[k])}")
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


def empty_model(cfg: HookedAttnResConfig, tokenizer=None):
    """A `HookedAttnRes` whose parameters live on the meta device (no memory, no init)."""
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

    with torch.device("meta"):
        return HookedAttnRes(cfg.replace(device="meta"), tokenizer=tokenizer)


def assign_state_dict(model, state: dict[str, torch.Tensor], device: Union[str, torch.device]):
    """Make ``state``'s tensors the model's parameters (no copies) and finish set-up."""
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    return model


def write_checkpoint_files(model, directory: Path) -> None:
    """Write this package's checkpoint files into an existing directory (not atomic)."""
    config = {"model_type": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__}
    config.update(model.cfg.to_dict())
    config.pop("device")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))


def save_checkpoint(model, directory: Union[str, Path], format: str = FORMAT) -> Path:
    """Write ``model`` to ``directory`` atomically.

    Args:
        model: a `HookedAttnRes`.
        directory: target directory (replaced if it already holds a checkpoint).
        format: ``"hooked_attnres"`` (this package's format) or ``"qwen3_attnres"`` (the
            public open-attention-residuals format, cumulative layout only).

    Returns:
        The directory path.
    """
    directory = Path(directory)
    if format == "qwen3_attnres":
        from hooked_attnres.loading.qwen3_attnres import save_qwen3_attnres

        return save_qwen3_attnres(model, directory)
    if format != FORMAT:
        raise ValueError(f"format must be {FORMAT!r} or 'qwen3_attnres', got {format!r}")
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(model, tmp)
    return directory


def load_checkpoint(
    directory: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
):
    """Load a checkpoint directory, whatever its format.

    * ``model_type == "hooked_attnres"``: this package's format;
    * ``model_type == "qwen3_attnres"``: the public open-attention-residuals format;
    * ``model_type == "qwen3"``: refused, with a pointer to ``HookedAttnRes.from_hf_qwen3``
      (a vanilla model needs a choice of wrap).

    Args:
        directory: the checkpoint directory.
        device: where to put the model (default ``"cpu"``).
        dtype: parameter dtype (default: the dtype saved in the config).
    """
    directory = Path(directory)
    values = read_config_json(directory)
    model_type = values.get("model_type")
    if model_type == "qwen3_attnres":
        from hooked_attnres.loading.qwen3_attnres import load_qwen3_attnres

        return load_qwen3_attnres(directory, device=device, dtype=dtype)
    if model_type == "qwen3":
        raise CheckpointError(
            f"{directory} is a vanilla Qwen3 checkpoint; load it with "
            "HookedAttnRes.from_hf_qwen3(directory, wrap='recency' | 'exact' | 'none')"
        )
    if model_type != FORMAT:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} has model_type={model_type!r}; supported are "
            f"{FORMAT!r}, 'qwen3_attnres' and (via from_hf_qwen3) 'qwen3'"
        )
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has format_version={version!r}; this library reads version {FORMAT_VERSION}"
        )
    for key in ("model_type", "library_version"):
        values.pop(key, None)
    try:
        cfg = HookedAttnResConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_NAME} is not a valid config: {error}") from error
    if dtype is not None:
        cfg = cfg.replace(dtype=_dtype_from_any(dtype))

    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
    model = empty_model(cfg, tokenizer=load_tokenizer(directory))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problem = _describe_mismatch(expected, read_safetensors_shapes(weights))
    if problem:
        raise CheckpointError(f"{weights} does not match {directory / CONFIG_NAME}: {problem}")
    state = read_safetensors(weights, dtype=cfg.dtype)
    return assign_state_dict(model, state, device or "cpu")
