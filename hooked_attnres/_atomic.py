"""Atomic writes: a checkpoint directory or file is either the old one or the new one.

Everything is written into a hidden sibling first, flushed to disk, and renamed into
place. A crash mid-write leaves the previous version untouched (plus a hidden
temporary directory that the next write to the same place removes). A crash in the
instant between moving the old directory aside and moving the new one in leaves the
old one as ``.{name}.old-*``; `recover` (called by every write and by the checkpoint
loader) moves it back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Union

CHECKPOINT_MARKERS = ("config.json",)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def backups_of(target: Union[str, Path]) -> list[Path]:
    """Previous versions left behind by a crash between the two renames of a replace."""
    target = Path(target).absolute()
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def recover(target: Union[str, Path]) -> bool:
    """If ``target`` is missing but a backup of it exists, move the backup back."""
    target = Path(target).absolute()
    backups = backups_of(target)
    if target.exists() or not backups:
        return False
    os.rename(backups[-1], target)
    return True


@contextlib.contextmanager
def atomic_directory(
    target: Union[str, Path], markers: tuple[str, ...] = CHECKPOINT_MARKERS
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` atomically.

    An existing ``target`` is replaced only if it is empty or contains one of
    ``markers`` (so a typo cannot wipe an unrelated folder). On an exception the
    temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target).absolute()
    recover(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"cannot write a directory to {target}: a file is there")
        contents = list(target.iterdir())
        if contents and not any((target / marker).exists() for marker in markers):
            raise FileExistsError(
                f"refusing to replace {target}: it is a non-empty directory without "
                f"{' or '.join(markers)}, so it does not look like a checkpoint"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
