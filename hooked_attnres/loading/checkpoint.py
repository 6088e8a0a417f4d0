"""Save and load checkpoints of any supported format (the dispatcher of `hooked_attnres.loading`).

Formats: this package's own (`hooked_attnres.loading.own_format`), the public
``qwen3_attnres`` format (`hooked_attnres.loading.qwen3_attnres`), and, through
``HookedAttnRes.from_hf_qwen3``, vanilla Hugging Face Qwen3 directories
(`hooked_attnres.loading.hf_qwen3`). Writes are atomic (`hooked_attnres._atomic`). Reads
check every key and shape before touching the model and name what is missing,
unexpected or mis-shaped.

Module layers (no cycles): ``io`` (errors, safetensors, config and tokenizer reading) <-
``own_format``, ``hf_keys``, ``hf_qwen3`` <- ``qwen3_attnres`` <- ``checkpoint`` (this
dispatcher). None imports the model module: ``HookedAttnRes.from_pretrained`` passes its
class in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from hooked_attnres._atomic import atomic_directory, reading
from hooked_attnres._validation import require_bool
from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.loading.io import (  # noqa: F401  (re-exported: public before the split)
    CONFIG_NAME,
    CheckpointError,
    CheckpointIntegrityError,
    assign_state_dict,
    check_load_arguments,
    empty_model,
    load_tokenizer,
    read_config_json,
    read_safetensors,
    read_safetensors_shapes,
    verify_saved_files,
)
from hooked_attnres.loading.own_format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    load_own_format,
    write_checkpoint_files,
)
from hooked_attnres.loading.qwen3_attnres import MODEL_TYPE as QWEN3_ATTNRES
from hooked_attnres.loading.qwen3_attnres import load_unchecked as load_qwen3_attnres_unchecked
from hooked_attnres.loading.qwen3_attnres import save_qwen3_attnres

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes


def save_checkpoint(
    model: HookedAttnRes,
    directory: Union[str, Path],
    format: str = FORMAT,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``directory`` atomically (crash-safe, serialised with other saves
    and loads of the same directory; protocol in ``docs/loading.md``).

    Args:
        model: a `HookedAttnRes`.
        directory: target directory. It is created, or replaced if it is empty or holds
            only files an earlier save wrote.
        format: ``"hooked_attnres"`` (this package's format) or ``"qwen3_attnres"`` (the
            public open-attention-residuals format, cumulative layout only).
        overwrite: also replace a directory holding other files (they are deleted).

    Returns:
        The directory path.

    Raises:
        CheckpointConflictError: (a ``FileExistsError``) ``directory`` is a file, or holds
            files no save wrote and ``overwrite`` is False; nothing is written.
    """
    directory = Path(directory)
    overwrite = require_bool("overwrite", overwrite)
    if not isinstance(getattr(model, "cfg", None), HookedAttnResConfig):
        # (a transformers model failed with "object has no attribute 'cfg'")
        raise TypeError(
            f"save_checkpoint saves a HookedAttnRes, got {type(model).__name__}; save a "
            "transformers model with its own save_pretrained (HookedAttnRes.from_hf_qwen3 "
            "loads the directory it writes)"
        )
    if format == QWEN3_ATTNRES:
        return save_qwen3_attnres(model, directory, overwrite=overwrite)
    if format != FORMAT:
        raise ValueError(f"format must be {FORMAT!r} or {QWEN3_ATTNRES!r}, got {format!r}")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_checkpoint_files(model, tmp)
    return directory


def load_checkpoint(
    directory: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    model_class: Optional[type] = None,
    mmap: bool = False,
    verify: bool = True,
):
    """Load a checkpoint directory, whatever its format.

    * ``model_type == "hooked_attnres"``: this package's format;
    * ``model_type == "qwen3_attnres"``: the public open-attention-residuals format;
    * ``model_type == "qwen3"``: refused, with a pointer to ``HookedAttnRes.from_hf_qwen3``
      (a vanilla model needs a choice of wrap).

    Args:
        directory: the checkpoint directory.
        device: where to put the model (default ``"cpu"``).
        dtype: parameter dtype, every parameter converted to it (default: the dtype
            saved in the config of this package's format, each parameter's own if they
            differ, ``parameter_dtypes`` in ``docs/loading.md``; float32 for a
            ``qwen3_attnres`` directory, whatever its config's ``dtype`` says, or float64
            if its weights are stored in float64, so that the default never rounds a
            weight: ``docs/loading.md``).
        model_class: the class to build (default `HookedAttnRes`; ``from_pretrained``
            passes its own).
        mmap: memory-map the weights instead of copying them (see ``docs/loading.md``:
            faster, but truncating the file later kills the process with SIGBUS and
            overwriting it in place changes the model). Default: copy.
        verify: refuse a checkpoint whose files differ from what its completion marker
            recorded at the save (each file's size and SHA-256): truncated, altered or
            edited files raise `CheckpointIntegrityError` naming them. ``False`` loads them
            unchecked (files you edited on purpose). A directory without a marker is
            checked against the digest manifest that lists its files (``SHA256SUMS`` in its
            grandparent: the shipped checkpoints; `hooked_attnres.loading.io.digest_manifest`),
            if there is one; other tools' folders and saves before completion markers are
            never checked; a marker that predates digests is checked by size only.

    The directory is read under the shared lock (a concurrent save waits; an interrupted
    save is recovered first), so the model is one complete saved version.
    """
    directory = Path(directory)
    mmap, verify = check_load_arguments(device, mmap, verify)
    with reading(directory):
        if verify:  # the whole directory, whatever its format
            verify_saved_files(directory)
        return _load_checkpoint(directory, device, dtype, model_class, mmap)


def _load_checkpoint(directory: Path, device, dtype, model_class, mmap: bool):
    values = read_config_json(directory)
    model_type = values.get("model_type")
    if model_type == QWEN3_ATTNRES:
        # its arguments checked and its files verified by load_checkpoint already (each
        # file is read once)
        return load_qwen3_attnres_unchecked(directory, device, dtype, model_class, mmap)
    if model_type == "qwen3":
        raise CheckpointError(
            f"{directory} is a vanilla Qwen3 checkpoint; load it with "
            "HookedAttnRes.from_hf_qwen3(directory, wrap='recency' | 'exact' | 'none')"
        )
    if model_type != FORMAT:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} has model_type={model_type!r}; supported are "
            f"{FORMAT!r}, {QWEN3_ATTNRES!r} and (via from_hf_qwen3) 'qwen3'"
        )
    return load_own_format(directory, values, model_class, device=device, dtype=dtype, mmap=mmap)
