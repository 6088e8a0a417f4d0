"""Checkpoint I/O shared by every format: errors, safetensors, ``config.json``, tokenizers,
and an empty model to fill. The lowest layer of `hooked_attnres.loading`: it imports no
other loading module and no model module (the model class is passed in).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from hooked_attnres._atomic import MANIFEST, MARKER, file_sha256, version_problems
from hooked_attnres._validation import check_device, non_finite_tensors, require_bool, some_names
from hooked_attnres.config import HookedAttnResConfig

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

CONFIG_NAME = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# every file ``AutoTokenizer`` may read from a Qwen3 / word tokenizer folder (config.json
# included): the files `load_tokenizer` checks for Git LFS pointers. Other files of the
# folder are not read, and may be pointers (``git lfs pull --include "*.safetensors"``)
_TOKENIZER_READS = (
    *_TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)

# what a load of a model folder may read, besides `_TOKENIZER_READS`: this library's
# config, weights and shard index (any ``.json``, ``.safetensors``), and the files of any
# tokenizer class ``AutoTokenizer`` may pick (its templates and vocabularies: ``.jinja``,
# ``.model``, ``.spm``, ``.tiktoken``, ``.codes``, ``.tokenizer``, ``vocab.txt``,
# ``merges.txt``, ``dict.txt``), and other frameworks' weights (``.bin``, ``.pt``, ``.pth``),
# whatever their case; `may_be_read` (a whole digest manifest refuses such a file unlisted)
_READ_SUFFIXES = (
    ".json",
    ".safetensors",
    ".jinja",
    ".model",
    ".spm",
    ".tiktoken",
    ".codes",
    ".tokenizer",
    ".bin",
    ".pt",
    ".pth",
)
_READ_NAMES = frozenset(
    name.lower() for name in (*_TOKENIZER_READS, "vocab.txt", "merges.txt", "dict.txt")
)
# the subfolder of a model folder whose ``*.jinja`` files ``AutoTokenizer`` reads as named
# chat templates (transformers' ``CHAT_TEMPLATE_DIR``; a dotted one too): the one subfolder
# a load reads, so the one a digest manifest compares (`verify_manifest`)
_CHAT_TEMPLATE_DIR = "additional_chat_templates"


def may_be_read(name: str) -> bool:
    """Whether a file named ``name`` in a model folder is of a kind a load may read (this
    library's loaders, or ``AutoTokenizer`` for any tokenizer class): `_READ_SUFFIXES`,
    `_READ_NAMES`, in any case. Notes, a README, a notebook or a plot are not."""
    lowered = name.lower()
    return lowered in _READ_NAMES or lowered.endswith(_READ_SUFFIXES)


def _compared_files(directory: Path) -> list[str]:
    """The files of ``directory`` a digest manifest compares, as paths relative to it
    (``/``-separated): its own (hidden ones, a desktop's ``.DS_Store``, no load reads) and
    those of its `_CHAT_TEMPLATE_DIR` subfolder (dotted ones too: ``AutoTokenizer`` reads
    each ``*.jinja`` there); no other subfolder is read by a load."""
    found = [p.name for p in directory.iterdir() if p.is_file() and p.name[0] != "."]
    templates = directory / _CHAT_TEMPLATE_DIR
    if templates.is_dir():
        found += [f"{_CHAT_TEMPLATE_DIR}/{p.name}" for p in templates.iterdir() if p.is_file()]
    return sorted(found)


def _within_reach(name: str) -> bool:
    """Whether ``name`` (relative to a model folder) is where `_compared_files` looks: a
    file of the folder or of its `_CHAT_TEMPLATE_DIR` subfolder."""
    folder, _, file = name.rpartition("/")
    return folder in ("", _CHAT_TEMPLATE_DIR) and file != ""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


class CheckpointIntegrityError(CheckpointError):
    """A saved checkpoint whose files differ from what its completion marker recorded at
    the save (truncated, bytes altered, a file edited or missing): loading it could give
    a silently different model. The message names each file, its recorded and found size
    and SHA-256, and what to do."""


# what to do about a damaged checkpoint, for the loaders (the trainer says its own)
LOAD_INTACT_COPY = (
    "load an intact copy instead (a backup, or an earlier checkpoint), or save the model "
    "again; if you edited these files on purpose, pass verify=False to load them unchecked"
)


# what to do about a file of a folder that differs from its digest manifest, for the loaders
LOAD_LISTED_COPY = (
    "restore the folder's files from where they came from (for the checkpoints shipped in "
    "hooked_attnres/data/study: reinstall hooked-attnres, or restore the file from its "
    "repository), or write the manifest again if the files are the ones you want listed; "
    "if you changed these files on purpose, pass verify=False to load them unchecked"
)


def verify_saved_files(
    directory: Path, remedy: Optional[str] = None, names: Optional[Collection[str]] = None
) -> None:
    """Refuse a directory whose files differ from what its completion marker records
    (`hooked_attnres._atomic.version_problems`), or, if it has no marker, from what the
    digest manifest that lists its files records (`digest_manifest`, `verify_manifest`:
    the shipped checkpoints); a directory with neither passes unchecked.

    Args:
        directory: the checkpoint directory.
        remedy: what the message says to do; default `LOAD_INTACT_COPY` for a marker,
            `LOAD_LISTED_COPY` for a manifest (the loaders' remedies, ``verify=False``).
        names: check only these files the marker records (relative paths; default every
            one); a directory checked against a manifest is checked whole.

    Raises:
        CheckpointError: a changed file is a Git LFS pointer (`require_not_lfs_pointer`:
            the checkpoint was committed and cloned without ``git lfs``).
        CheckpointIntegrityError: naming every changed file, with ``remedy``.
    """
    directory = Path(directory)
    if not (directory / MARKER).exists():
        manifest = digest_manifest(directory)
        if manifest is not None:
            verify_manifest(directory, manifest, LOAD_LISTED_COPY if remedy is None else remedy)
        return
    problems = version_problems(directory, names)
    for name in problems:
        require_not_lfs_pointer(directory / name)
    if problems:
        remedy = LOAD_INTACT_COPY if remedy is None else remedy
        raise CheckpointIntegrityError(
            f"{directory} was changed after it was saved: {'; '.join(problems.values())}. What is "
            f"read from it would not be what was saved; {remedy}"
        )


def _manifest_lines(manifest: Path) -> list[str]:
    """The lines of a digest manifest (UTF-8; bytes that are not, as `os.fsdecode` gives
    them in file names)."""
    try:
        return manifest.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as error:
        raise CheckpointIntegrityError(
            f"{manifest} cannot be read ({error}), so the files it lists cannot be checked; "
            "make it readable, or pass verify=False to load the files unchecked"
        ) from error


def _manifest_entry(line: str) -> Optional[tuple[str, str]]:
    """A digest manifest line's ``(digest, path)`` as ``sha256sum`` prints it:
    ``{digest}  {path}``, or ``{digest} *{path}`` in binary mode (``sha256sum -b``; the
    ``*`` is no part of the path); ``None`` for a line without both (the digest is not
    checked here: `verify_manifest` refuses one that is no SHA-256)."""
    fields = line.split(maxsplit=1)
    if len(fields) != 2:
        return None
    path = fields[1].strip()
    path = path[1:] if path.startswith("*") else path
    return (fields[0], path) if path else None


def digest_manifest(directory: Path) -> Optional[Path]:
    """The digest manifest that covers ``directory``: the file ``SHA256SUMS`` (`MANIFEST`)
    in the directory's grandparent (of its real path, symbolic links followed), if one of
    its lines names a file of ``directory`` as ``{parent}/{directory}/{file}`` (its path
    relative to the grandparent, ``/``-separated: ``attnres_seed0/model/config.json`` in
    ``hooked_attnres/data/study/SHA256SUMS``). ``None`` otherwise: no such file, one in
    another folder (the parent, or further up), or one that lists other folders only (the
    folders of runs of one's own beside the listed ones). A directory with a completion
    marker is checked against its marker instead (`verify_saved_files`). Whether the
    manifest lists the folder whole or some files of it: `verify_manifest`.

    Raises:
        CheckpointIntegrityError: the grandparent's ``SHA256SUMS`` exists and cannot be read.
    """
    real = Path(directory).resolve()
    if not real.is_dir() or len(real.parts) < 3:
        return None
    manifest = real.parent.parent / MANIFEST
    if not manifest.is_file():
        return None
    prefix = f"{real.parent.name}/{real.name}/"
    for line in _manifest_lines(manifest):
        entry = _manifest_entry(line)
        if entry is not None and entry[1].startswith(prefix):
            return manifest
    return None


def verify_manifest(
    directory: Path, manifest: Path, remedy: str, whole: Optional[bool] = None
) -> None:
    """Refuse ``directory`` unless each file of it listed in the digest manifest
    ``manifest`` exists with the SHA-256 listed, and, if the manifest lists the folder
    whole, each of its files is listed.

    The manifest holds ``{sha256}  {path}`` lines (what ``sha256sum`` prints: 64 lower-case
    hex digits, white space, the path relative to the folder the manifest is in (a link to
    a manifest: the link's), ``/``-separated; ``{sha256} *{path}`` in binary mode);
    ``directory`` must lie under that folder. Files are compared byte for byte (no line
    ending is converted). Hidden files (a desktop's ``.DS_Store``) are read by no loader
    and not compared; subfolders neither, but for the chat templates ``AutoTokenizer``
    reads from ``additional_chat_templates`` (`_compared_files`); nor, unlisted, a file of
    a kind no load reads (`may_be_read`: notes, a README, a notebook, a plot), even in a
    folder listed whole.

    Args:
        directory: the folder checked.
        manifest: its digest manifest (`digest_manifest`).
        remedy: what the message says to do.
        whole: whether the manifest lists every file of the folder, so that a file it does
            not list is refused if a load may read it (`may_be_read`: a
            ``special_tokens_map.json`` or a weights shard would change the model; until
            audit 229 any file, so a ``notes.txt`` made the folder unloadable). Default:
            if it lists the folder's ``config.json`` (the shipped checkpoints' manifest,
            and ``sha256sum */model/*``); one that lists the weights alone (``sha256sum
            */model/model.safetensors``, a check of a retrained run) checks those.

    Raises:
        CheckpointIntegrityError: a line that is no such pair (naming its number; the
            manifest cannot be trusted), or, naming each file: one not listed that a load
            may read (``whole``),
            one with another SHA-256, one listed and missing; each with ``remedy``.
        CheckpointError: a changed file is a Git LFS pointer (`require_not_lfs_pointer`).
    """
    directory = Path(directory)
    # the folder the manifest is in, not the one a link to it points into
    root = Path(manifest).absolute().parent.resolve()
    base = directory.resolve().relative_to(root).as_posix()
    listed: dict[str, str] = {}
    for number, line in enumerate(_manifest_lines(manifest), start=1):
        if not line.strip():
            continue
        entry = _manifest_entry(line)
        if entry is None or not re.fullmatch(r"[0-9a-f]{64}", entry[0]):
            raise CheckpointIntegrityError(
                f"line {number} of {manifest} is no '{{sha256}}  {{file}}' pair ({line!r}), so "
                f"the files it lists cannot be checked; {remedy}"
            )
        listed[entry[1]] = entry[0]
    if whole is None:
        whole = f"{base}/config.json" in listed
    problems = []
    for name in _compared_files(directory):
        path, key = directory / name, f"{base}/{name}"
        if key not in listed:
            if whole and may_be_read(name):  # notes of one's own: read by no load
                problems.append(f"{path} is not listed in {manifest}, so it cannot be checked")
            continue
        found = file_sha256(path)  # the digest every marker records, read in chunks
        if found != listed[key]:
            require_not_lfs_pointer(path)
            problems.append(f"{path} has SHA-256 {found}, not the {listed[key]} {manifest} lists")
    for key in sorted(listed):  # a listed file of this folder that is not there
        name = key[len(base) + 1 :]
        if key.startswith(f"{base}/") and _within_reach(name) and not (directory / name).is_file():
            problems.append(f"{directory / name} is listed in {manifest} but missing")
    if problems:
        raise CheckpointIntegrityError(
            f"{'; '.join(problems)}. What is read from {directory} would not be the files "
            f"{manifest} lists (they were changed after it was written); {remedy}"
        )


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


# safetensors dtype names; only floating-point tensors can become parameters
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def read_safetensors_info(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, safetensors dtype name such as ``"F32"``) without reading tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for key in handle.keys():
                part = handle.get_slice(key)
                out[key] = (tuple(part.get_shape()), str(part.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as error:
        require_not_lfs_pointer(path)
        raise CheckpointError(
            f"could not read {path}: the file is truncated or not a safetensors file ({error})"
        ) from error


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def require_not_lfs_pointer(path: Path) -> None:
    """Refuse a Git LFS pointer file (the small text file that a clone without
    ``git lfs`` leaves where a large file should be), naming it as one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LFS_POINTER))
    except OSError:
        return
    if head == _LFS_POINTER:
        raise CheckpointError(
            f"{path} is a Git LFS pointer file ({path.stat().st_size} bytes), not the file "
            "itself: the repository was cloned without its LFS objects. Run `git lfs pull` "
            "in it (or download the file) and load again"
        )


def stored_float_dtypes(paths) -> set[torch.dtype]:
    """The floating dtypes the tensors of some safetensors files are stored in (headers
    only; other dtypes are refused when the tensors are read)."""
    return {
        _FLOAT_DTYPES[name]
        for path in sorted(set(paths))
        for _, name in read_safetensors_info(path).values()
        if name in _FLOAT_DTYPES
    }


def default_load_dtype(stored: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype a Hugging Face layout loads in when none is asked for, given the floating
    dtypes its weights are stored in: float32 (bfloat16 and float16 weights convert to it
    exactly), or float64 if any weight is float64, which float32 would round. One rule for
    `from_hf_qwen3` and the ``qwen3_attnres`` loader: the default never rounds a weight."""
    return torch.float64 if torch.float64 in set(stored) else torch.float32


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file without reading the tensors."""
    return {key: shape for key, (shape, _) in read_safetensors_info(path).items()}


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """``(start of the data section, {key: (begin, end)})`` from a safetensors header (the
    file has been validated by ``safe_open`` already)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    offsets = {
        key: (int(value["data_offsets"][0]), int(value["data_offsets"][1]))
        for key, value in header.items()
        if key != "__metadata__"
    }
    return 8 + length, offsets


def _read_copy(
    handle, start: int, shape: tuple[int, ...], dtype: torch.dtype, path: Path
) -> torch.Tensor:
    """A fresh tensor filled from ``handle`` at byte ``start`` (one copy, no mapping)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    view = out.reshape(-1).view(torch.uint8).numpy().data
    handle.seek(start)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise CheckpointError(
                f"could not read {path}: the file ended early (it was truncated while loading)"
            )
        done += got
    return out


def check_float_tensors(
    path: Path,
    info: dict,
    keys,
    expected: Optional[torch.dtype],
    recorded: Optional[dict[str, torch.dtype]] = None,
) -> None:
    """Refuse integer or boolean tensors (a parameter is never cast from them), and, with
    ``expected``, tensors of another floating dtype than ``expected``, or than
    ``recorded[key]`` for the keys ``recorded`` names (the parameters a config records in
    another dtype)."""
    recorded = recorded or {}
    for key in keys:
        _, name = info[key]
        if name not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key} has dtype {name}; parameters must be floating point "
                f"({sorted(_FLOAT_DTYPES)}), and an integer tensor is not cast silently"
            )
        wanted = recorded.get(key, expected)
        if wanted is not None and _FLOAT_DTYPES[name] != wanted:
            source = " (its parameter_dtypes)" if key in recorded else ""
            raise CheckpointError(
                f"{path}: tensor {key} has dtype {name} but config.json says "
                f"{str(wanted).removeprefix('torch.')}{source}; pass dtype=... to convert "
                "on purpose"
            )


def require_finite_weights(
    tensors: dict[str, torch.Tensor],
    where: object,
    stored: Optional[dict[str, torch.Tensor]] = None,
    limit: int = 10,
) -> None:
    """Refuse weights holding NaN or infinite values, naming each tensor and its count.

    Args:
        tensors: name -> tensor as it will be loaded (after any dtype conversion).
        where: the file or module they come from (for the message).
        stored: name -> tensor as stored, for the tensors that were converted; a tensor
            finite there and not after the conversion is reported as an overflow of the
            requested dtype.

    Raises:
        CheckpointError: some tensor is not finite.
    """
    bad = non_finite_tensors(tensors)
    if not bad:
        return
    stored = stored or {}
    parts = []
    for name, count in bad[:limit]:
        tensor = tensors[name]
        text = f"{name} ({count} of {tensor.numel()} elements)"
        original = stored.get(name)
        if original is not None and not non_finite_tensors({name: original}):
            text += (
                f" (finite as stored in {str(original.dtype).removeprefix('torch.')}; it "
                f"overflows {str(tensor.dtype).removeprefix('torch.')}: its largest magnitude "
                f"is {original.abs().max().item():.4g})"
            )
        parts.append(text)
    more = f", ... ({len(bad) - limit} more)" if len(bad) > limit else ""
    raise CheckpointError(
        f"{where} has weights with NaN or infinite values: {', '.join(parts)}{more}; every "
        "output computed through them would be NaN or infinite, so the checkpoint is refused "
        "(load a checkpoint written before training diverged)"
    )


def read_safetensors(
    path: Path,
    keys: Optional[list[str]] = None,
    dtype: Optional[torch.dtype] = None,
    mmap: bool = False,
) -> dict[str, torch.Tensor]:
    """Floating-point tensors of a safetensors file (optionally a subset, optionally cast).

    With ``mmap=False`` (the default) no returned tensor refers to the file: tensors whose
    dtype is kept are read into fresh memory, converted ones are new tensors anyway, so
    changing or truncating the file later cannot touch the model. With ``mmap=True``
    tensors whose dtype is kept are views of a memory map of the file (faster to load, no
    copy; truncating the file later kills the process with SIGBUS, overwriting it in
    place changes the weights).

    Every tensor read into memory is finite (`require_finite_weights`, checked as
    returned, i.e. after a dtype conversion, which can overflow). Mapped tensors
    (``mmap=True``, dtype kept) are not scanned: that would page in the whole file at load
    time, which is what mapping avoids (``docs/loading.md``).

    Raises:
        CheckpointError: a truncated or corrupt file, a non-floating tensor, or a NaN or
            infinite value.
    """
    info = read_safetensors_info(path)
    wanted = list(info) if keys is None else list(keys)
    check_float_tensors(path, info, wanted, None)
    out = {}
    converted: list[str] = []
    mapped: set[str] = set()
    try:
        copies = []
        with safe_open(str(path), framework="pt") as handle:
            for key in wanted:
                file_dtype = _FLOAT_DTYPES[info[key][1]]
                if dtype is not None and dtype != file_dtype:
                    out[key] = handle.get_tensor(key).to(dtype)  # a new tensor
                    converted.append(key)
                elif mmap:
                    out[key] = handle.get_tensor(key)
                    mapped.add(key)
                else:
                    copies.append(key)
        if copies:
            base, offsets = _data_offsets(path)
            copies.sort(key=lambda key: offsets[key][0])  # read the file front to back
            with open(path, "rb", buffering=0) as raw:
                for key in copies:
                    shape, name = info[key]
                    out[key] = _read_copy(
                        raw, base + offsets[key][0], shape, _FLOAT_DTYPES[name], path
                    )
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"could not read {path}: the file is truncated or corrupt ({error})"
        ) from error
    bad = [name for name, _ in non_finite_tensors(i for i in out.items() if i[0] not in mapped)]
    if bad:
        # a converted tensor: not finite as stored either, or an overflow of the dtype?
        with safe_open(str(path), framework="pt") as handle:
            stored = {key: handle.get_tensor(key) for key in bad if key in converted}
        require_finite_weights({key: out[key] for key in bad}, path, stored)
    return out


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory, with clear errors (call it
    inside `hooked_attnres._atomic.reading`, which recovers interrupted saves)."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; a checkpoint is a directory")
    path = directory / CONFIG_NAME
    if not path.exists():
        # a training run's folder (``{condition}_seed{n}``) holds its checkpoint in ``model``
        inside = directory / "model"
        hint = f"; the checkpoint in it is {inside}" if (inside / CONFIG_NAME).is_file() else ""
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; found "
            + (some_names(sorted(p.name for p in directory.iterdir())) or "nothing")
            + hint
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, not the locale's
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        require_not_lfs_pointer(path)
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or ``None`` if there is none.

    Raises:
        CheckpointError: a file the tokenizer is read from (`_TOKENIZER_READS`) is a Git
            LFS pointer (`require_not_lfs_pointer`); ``transformers`` would fail on it with
            a bare ``JSONDecodeError``. Pointers at the weights are named where they are
            read (`read_safetensors_info`); files no loader reads are not looked at."""
    for name in _TOKENIZER_READS:
        require_not_lfs_pointer(Path(directory) / name)
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


def save_tokenizer(model: HookedAttnRes, directory: Path) -> None:
    """Save ``model.tokenizer`` into ``directory`` with the side the model pads strings on
    (`HookedAttnRes.default_padding_side`) written into ``tokenizer_config.json`` as
    ``padding_side`` (``transformers`` reads it back from there, but does not write it: a
    model whose ``model.tokenizer.padding_side`` was set to ``"left"`` after attaching
    used to come back padding on the right)."""
    model.tokenizer.save_pretrained(str(directory))
    path = Path(directory) / _TOKENIZER_FILES[1]
    if path.exists():
        # UTF-8 as transformers writes it (its characters as they are, not the locale's:
        # an ASCII locale failed on a special token outside ASCII)
        values = json.loads(path.read_text(encoding="utf-8"))
        values["padding_side"] = model.default_padding_side
        text = json.dumps(values, indent=2, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")


def model_with_saved_tokenizer(
    cfg: HookedAttnResConfig, directory: Path, model_class: Optional[type] = None
):
    """`empty_model` with the tokenizer saved in ``directory`` (if any) attached as it was
    saved: ``set_tokenizer`` sets the tokenizer's ``padding_side`` to
    ``cfg.default_padding_side``; the side the saved model padded on, which the saved
    tokenizer files hold (`save_tokenizer`), is put back after attaching, so the loaded
    model pads strings where the saved one did (`HookedAttnRes.default_padding_side`).
    Tokenizer files that do not name a side (older saves, other tools) leave the side
    ``set_tokenizer`` chose."""
    tokenizer = load_tokenizer(directory)
    model = empty_model(cfg, tokenizer=tokenizer, model_class=model_class)
    path = Path(directory) / _TOKENIZER_FILES[1]
    if tokenizer is not None and path.exists():
        try:
            side = json.loads(path.read_text(encoding="utf-8")).get("padding_side")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise CheckpointError(f"{path} is not a valid tokenizer config ({error})") from error
        if side in ("right", "left"):
            tokenizer.padding_side = side
    return model


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


def check_load_arguments(device, mmap: Any, verify: Any) -> tuple[bool, bool]:
    """The checks every checkpoint loader makes of its ``device``, ``mmap`` and
    ``verify`` before it reads a file (`check_device`, and `require_bool` for the flags:
    read by truthiness, ``mmap="no"`` memory-mapped and ``verify=0`` skipped the check);
    returns ``(mmap, verify)`` as Python bools."""
    mmap = require_bool("mmap", mmap)
    verify = require_bool("verify", verify)
    check_device(device)
    return mmap, verify


def assign_state_dict(
    model: HookedAttnRes, state: dict[str, torch.Tensor], device: Union[str, torch.device]
):
    """Make ``state``'s tensors the model's parameters (no copies) and finish set-up."""
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    return model
