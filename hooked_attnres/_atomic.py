"""Crash-safe, serialised checkpoint directories (the protocol of ``docs/loading.md``).

A checkpoint is a directory ``NAME``. A *version* of it is a directory that carries a
completion marker, ``MARKER`` (``.hooked_attnres_complete.json``), written last and
fsynced: ``{"sequence": n, "written_at": ..., "files": {relative path: size}, "sha256":
{relative path: SHA-256 hex digest}}`` (``sha256`` since audit 98). The sequence number
grows by one with every save to ``NAME``. `version_problems` compares a version's files
with its marker (loads refuse a version changed after its save).

Writer (`atomic_directory`), holding the exclusive lock:

1. recover (below), then refuse if ``NAME`` holds files no save wrote (``overwrite``);
2. write the new version into ``.NAME.tmp-<id>``, fsync every file;
3. write the marker with sequence ``n + 1`` and fsync it: **the commit point**;
4. rename ``NAME`` to ``.NAME.old-<id>``, rename the new version to ``NAME``, fsync the parent;
5. discard the old version: rename it to ``.NAME.tmp-<id>``, delete its marker (fsynced),
   then its files (`_discard`).

Recovery (`recover`, run by every save and by every load that finds leftovers), under the
exclusive lock: among ``NAME``, ``.NAME.tmp-*`` and ``.NAME.old-*``, a leftover is complete
iff its marker parses and every file it lists exists with the listed size and digest
(`version_problems`); ``NAME`` is complete iff it has a marker (it only ever receives
complete versions). The complete version with the highest sequence becomes ``NAME``;
every other candidate is discarded (marker first). Directory names carry no order; only
the marker's sequence does.

Lock: ``flock`` on the parent directory (no lock file is created; readable directories on
read-only file systems work too); a lock file ``.hooked_attnres.lock`` in the parent is the
fallback where a directory cannot be locked. Writers take it exclusively for the whole save; readers
(`reading`) take it shared for the whole read, so a reader sees one complete version,
never a mixed or empty directory. Locks are re-entrant within a thread.

Leftovers are named exactly ``.NAME.tmp-<id>`` / ``.NAME.old-<id>`` (8 hex digits).
Symbolic links in a path are followed (`_real`). `exclusive_job` holds an output folder for
one job (a training run, a study) at a time.

Fault injection (tests only): ``HOOKED_ATTNRES_CRASH_AT=<step>[:<n>]`` makes the process
SIGKILL itself the ``n``-th time (default 1) it reaches ``step`` (see `FAULT_STEPS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from hooked_attnres._validation import some_names

try:  # POSIX; elsewhere saves and loads are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MARKER = ".hooked_attnres_complete.json"
# a digest manifest (``{sha256}  {path}`` lines), where a folder without a marker may be
# listed (`hooked_attnres.loading.io.digest_manifest`: the shipped checkpoints)
MANIFEST = "SHA256SUMS"
MARKER_FORMAT = "hooked_attnres.complete"
# the marker's ``{relative path: SHA-256 hex digest}`` of every file it lists (markers
# written before audit 98 have none: their files are checked by size only)
DIGESTS = "sha256"
TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"
SIBLING_ID = "[0-9a-f]{8}"  # the <id> of `sibling`'s names, as a regular expression


def sibling(target: Path, infix: str) -> Path:
    """A new hidden sibling of ``target`` named ``.NAME{infix}<id>`` (``<id>``: 8 random hex
    digits, `SIBLING_ID`): the temporary, set-aside and partial files of the writes here."""
    return target.parent / f".{target.name}{infix}{uuid.uuid4().hex[:8]}"


def sibling_pattern(name: str, *infixes: str) -> re.Pattern:
    """The names `sibling` makes for a target named ``name`` with any of ``infixes``, whole
    names only (use ``fullmatch``): a prefix would take the siblings of a target named
    ``NAME.old-x`` for ``NAME``'s."""
    alternatives = "|".join(map(re.escape, infixes))
    return re.compile(rf"\.{re.escape(name)}(?:{alternatives}){SIBLING_ID}")


CRASH_ENV = "HOOKED_ATTNRES_CRASH_AT"
LOCK_FILE = ".hooked_attnres.lock"  # the fallback lock (`_open_lock`)

# Where `fault_point` can kill the process, in the order a save reaches them.
FAULT_STEPS = (
    "locked",  # the writer holds the lock, nothing written yet
    "payload",  # the new version's files are written, not yet fsynced
    "fsynced",  # files fsynced, no marker
    "marker_tmp",  # marker written to a temporary name, not yet renamed into place
    "committed",  # marker in place (the commit point)
    "moved_aside",  # NAME renamed to .NAME.old-*, the new version not yet in place
    "installed",  # the new version is NAME, the old one not yet discarded
    "discard_marker",  # the old version's marker deleted, its files not yet
    "discard_partial",  # some of the old version's files deleted
    "done",  # everything finished, lock still held
    # recovery (run by the next save or load)
    "recover_moved_aside",  # recovery moved an older NAME aside, the newest not yet in place
    "recover_installed",  # recovery installed the newest version, leftovers not yet discarded
    # the trainer
    "train_step",  # after an optimiser step, before any checkpoint of that step
)


class CheckpointConflictError(FileExistsError):
    """A save would delete files it did not write (pass ``overwrite=True`` to allow it)."""


def fault_point(step: str) -> None:
    """SIGKILL this process at ``step`` if ``HOOKED_ATTNRES_CRASH_AT`` asks for it."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != step:
        return
    seen = _FAULT_COUNTS.get(step, 0) + 1
    _FAULT_COUNTS[step] = seen
    if seen >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}


def _real(path: Union[str, Path]) -> Path:
    """``path`` made absolute with every symbolic link resolved: a save to a link replaces
    the directory (or file) it points to and keeps the link, and every spelling of a
    directory takes the same lock (a link to a checkpoint used to be replaced by a new
    directory, leaving the linked one stale, and readers through the link took another
    lock than writers of the real path)."""
    return Path(os.path.realpath(path))


# --- fsync helpers ----------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_modes(root: Path) -> None:
    """Give every file below ``root`` the mode a plain ``open`` would have given it, read
    from ``root`` itself (``mkdir`` applied the umask or the parent's default ACL):
    safetensors >= 0.8 and other writers create owner-only (0600) files, which a shared
    checkpoint folder cannot use. A file system that refuses ``chmod`` keeps its modes."""
    mode = root.stat().st_mode & 0o666
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            with contextlib.suppress(OSError):
                path.chmod(mode)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(path)
    _fsync_dir(root)


def _files(root: Path) -> dict[str, int]:
    """``{relative path: size}`` of every regular file below ``root`` (the marker excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER:
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


# --- markers ----------------------------------------------------------------------------


def read_marker(directory: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The parsed completion marker of a version directory, or ``None`` if it has none (or
    an unreadable one)."""
    try:
        values = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(values, dict)
        or values.get("format") != MARKER_FORMAT
        or not isinstance(values.get("sequence"), int)
        or not isinstance(values.get("files"), dict)
    ):
        return None
    return values


def other_save(directory: Union[str, Path], keeps: tuple[str, ...] = ()) -> Optional[str]:
    """The files of ``directory`` if it is itself a save of this library (it has a completion
    marker: a model, a study, a training run's checkpoint) that does not list every name of
    ``keeps``, named for a message (`some_names`); ``None`` otherwise (no marker, e.g. a new
    folder, a file or a folder of runs, or a save listing ``keeps``). The one test of "another
    save" by which a study's or a training run's output folder is refused."""
    marker = read_marker(directory)
    if marker is None or (keeps and set(keeps) <= set(marker["files"])):
        return None
    return some_names(sorted(marker["files"]))


PACKAGE = Path(__file__).resolve().parent  # the installed package, hooked_attnres/


def check_outside_package(path: Union[str, Path], name: str) -> None:
    """Refuse an output folder ``path`` (called ``name`` in the message: ``"--out"``,
    ``"out_dir"``) that is the package's own folder or inside it (links resolved): pip
    deletes what is there on an upgrade or uninstall, and a run written into the shipped
    checkpoints' folder (`hooked_attnres.study.SHIPPED`) would be listed and studied as
    shipped (audit 169).

    Raises:
        ValueError: naming the package's folder and the remedy.
    """
    target = Path(path).resolve()
    if target == PACKAGE or PACKAGE in target.parents:
        raise ValueError(
            f"{name} {path} is inside the package hooked_attnres ({PACKAGE}): pip deletes "
            "what is written there on an upgrade or uninstall, and runs written beside the "
            "shipped checkpoints would be taken for shipped ones; choose a folder outside it"
        )


def file_sha256(path: Union[str, Path]) -> str:
    """The SHA-256 hex digest of a file's bytes (what ``sha256sum`` prints), read in 1 MiB
    chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_marker(directory: Path, sequence: int) -> None:
    files = _files(directory)
    marker = {
        "format": MARKER_FORMAT,
        "sequence": sequence,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pid": os.getpid(),
        "files": files,
        DIGESTS: {name: file_sha256(directory / name) for name in files},
    }
    partial = directory / (MARKER + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fault_point("marker_tmp")
    os.rename(partial, directory / MARKER)
    _fsync_dir(directory)


def _line_endings_only(path: Path, expected: str) -> bool:
    """Whether a JSON file or a chat template (``.jinja``) differs from the saved bytes
    (SHA-256 ``expected``) in its line endings only: git converts them in text files
    (``core.autocrlf``: CRLF on a Windows checkout, LF on commit). JSON allows no raw line
    break inside a string, so every CR and LF is whitespace between values and the file
    parses to the saved values; ``transformers`` reads a chat template in text mode
    (universal newlines: CRLF read as LF), so the template is the saved one unless it holds
    a CR of its own (read as a line break: refused)."""
    if path.suffix not in (".json", ".jinja"):
        return False
    lf = path.read_bytes().replace(b"\r\n", b"\n")
    if path.suffix == ".jinja" and b"\r" in lf:
        return False
    return any(
        hashlib.sha256(data).hexdigest() == expected for data in (lf, lf.replace(b"\n", b"\r\n"))
    )


def version_problems(
    directory: Union[str, Path], names: Optional[Collection[str]] = None
) -> dict[str, str]:
    """How the files of a saved version differ from what its completion marker records:
    ``{relative path: sentence}`` for each file missing, of another size, or whose SHA-256
    differs (truncated, altered or edited after the save); empty if they match (a JSON file
    whose line endings alone differ matches: `_line_endings_only`). ``names``: only these
    recorded files are checked (default: every one). A directory
    without a marker (the shipped checkpoints, other tools' folders) records nothing, so
    nothing is found (the loaders check such a folder against a digest manifest that lists
    it instead, `hooked_attnres.loading.io.verify_saved_files`); a marker that is there but
    cannot be read is a problem. Markers written before audit 98 record sizes only. Every
    recorded file is read once (a JSON file whose digest differs, twice)."""
    directory = Path(directory)
    path = directory / MARKER
    if not path.exists():
        return {}
    marker = read_marker(directory)
    digests = marker.get(DIGESTS, {}) if marker is not None else None
    if marker is None or not isinstance(digests, dict):
        return {MARKER: f"{MARKER} (the completion marker) cannot be read"}
    problems = {}
    for name, size in marker["files"].items():
        if names is not None and name not in names:
            continue
        try:
            found_size = (directory / name).stat().st_size
        except OSError:
            problems[name] = f"{name} is missing (the save wrote {size} bytes)"
            continue
        expected = digests.get(name)
        found = file_sha256(directory / name) if expected is not None else None
        if found_size == size and found == expected:
            continue
        if expected is not None and _line_endings_only(directory / name, expected):
            continue
        what = []
        if found_size != size:
            shorter = " (shorter: truncated or rewritten)" if found_size < size else ""
            what.append(f"{found_size} bytes{shorter} (saved: {size})")
        if found != expected:
            what.append(f"SHA-256 {found} (saved: {expected})")
        problems[name] = f"{name} has {' and '.join(what)}"
    return problems


def _leftover_complete(directory: Path) -> Optional[int]:
    """The sequence of a complete leftover version (every listed file present with its
    listed size and digest: `version_problems`), else ``None``."""
    marker = read_marker(directory)
    if marker is None or version_problems(directory):
        return None
    return marker["sequence"]


# --- locking ----------------------------------------------------------------------------

_HELD = threading.local()  # lock key -> [mode, depth] held by this thread


def _held() -> dict:
    if not hasattr(_HELD, "locks"):
        _HELD.locks = {}
    return _HELD.locks


def _open_lock(target: Path) -> Optional[int]:
    """A file descriptor to ``flock`` for ``target``: its parent directory, else the lock
    file ``.hooked_attnres.lock`` in it (one per parent, like the directory lock); ``None``
    where neither is possible (then nobody can write there). Only a directory that may not
    be opened (no permission) falls back to the lock file: any other error (e.g. too many
    open files) is raised, since the lock file is another lock than the directory that
    other processes hold (a save would not be serialised with theirs)."""
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except PermissionError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return fd
        except BlockingIOError:
            return fd  # lockable, just held by someone else right now
        except OSError:
            os.close(fd)
    try:
        return os.open(target.parent / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def _locked(target: Path, exclusive: bool) -> Iterator[bool]:
    """Hold the lock of ``target``; yields whether a lock is held (``False`` where the
    parent cannot be opened, i.e. nothing can be written there)."""
    if fcntl is None or not target.parent.is_dir():
        yield False
        return
    key = str(target.parent)
    held = _held()
    if key in held:
        mode, depth = held[key]
        if exclusive and mode == "shared":
            raise RuntimeError(
                f"this thread reads {target} and tries to write it at the same time; "
                "finish the read first"
            )
        held[key] = [mode, depth + 1]
        try:
            yield True
        finally:
            held[key][1] -= 1
        return
    fd = _open_lock(target)
    if fd is None:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        held[key] = ["exclusive" if exclusive else "shared", 1]
        try:
            yield True
        finally:
            del held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


RUN_LOCK = ".hooked_attnres_job.lock"


class DirectoryBusyError(RuntimeError):
    """Another job (a training run, a study) is writing the same output folder."""


@contextlib.contextmanager
def exclusive_job(directory: Union[str, Path], job: str) -> Iterator[None]:
    """Hold ``directory`` (created if missing) for one job at a time, across processes and
    threads: an exclusive, non-blocking ``flock`` of the file `RUN_LOCK` in it, removed
    when the job ends. Two jobs writing one folder would each write whole versions, but
    pair one's model with the other's metrics (or delete the other's kept tables).

    Raises:
        DirectoryBusyError: another job holds ``directory`` (naming its process id);
            nothing is written.
        OSError: the lock file cannot be created (e.g. a read-only folder), before any work.
    """
    directory = _real(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RUN_LOCK
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise DirectoryBusyError(
                f"{directory} is being written by another {holder or 'job'} right now (it "
                f"holds {path}); wait for it to finish, or choose another folder for this {job}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder removed after this process opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{job} (process {os.getpid()})".encode())
        yield
    finally:
        try:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
        finally:  # even on an interrupt there: the lock must not outlive the job
            os.close(fd)


# --- leftovers and recovery -------------------------------------------------------------


def _leftover_name(name: str) -> re.Pattern:
    """``.NAME.tmp-<id>`` and ``.NAME.old-<id>`` (`sibling_pattern`)."""
    return sibling_pattern(name, TMP_INFIX, OLD_INFIX)


def leftovers_of(target: Union[str, Path]) -> list[Path]:
    """The ``.NAME.tmp-<id>`` and ``.NAME.old-<id>`` siblings of ``target`` (unordered
    meaning; sorted for display only)."""
    target = _real(target)
    if not target.parent.is_dir():
        return []
    pattern = _leftover_name(target.name)
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def backups_of(target: Union[str, Path]) -> list[Path]:
    """Leftover versions of ``target`` (``.NAME.tmp-*`` and ``.NAME.old-*``); empty once a
    save or load has recovered it."""
    return leftovers_of(target)


def _discard(path: Path) -> None:
    """Delete a version: a set-aside one (``.NAME.old-<id>``) renamed to ``.NAME.tmp-<id>``
    first, then its marker (fsynced), so a partly deleted version is never complete, then
    its files. The rename takes it out of reach of the legacy restore of `_recover_locked`
    (a lone ``.NAME.old-*`` without a marker, when ``NAME`` is gone, is installed as
    ``NAME``): a kill after its marker was deleted left it there, and once ``NAME`` was
    deleted it came back as ``NAME``, older or half deleted (audit 150); a ``.tmp-*``
    without a marker is never installed."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    set_aside = _SET_ASIDE.fullmatch(path.name)
    if set_aside is not None:
        renamed = path.with_name(f".{set_aside[1]}{TMP_INFIX}{set_aside[2]}")
        try:
            os.rename(path, renamed)
        except OSError:  # deleted where it is, marker first, as before
            pass
        else:
            _fsync_dir(path.parent)
            path = renamed
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
        _fsync_dir(path)
    fault_point("discard_marker")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if files:
        with contextlib.suppress(FileNotFoundError):
            files[0].unlink()
        fault_point("discard_partial")
    shutil.rmtree(path, ignore_errors=True)


# a set-aside version's name, ``.NAME.old-<id>``: ``(NAME, <id>)``
_SET_ASIDE = re.compile(rf"\.(.+){re.escape(OLD_INFIX)}({SIBLING_ID})")


def _recover_locked(target: Path) -> bool:
    """Recovery under the exclusive lock (module docstring). Returns whether another
    version was installed as ``target``."""
    others = leftovers_of(target)
    if not others:
        return False
    complete = [(seq, path) for path in others if (seq := _leftover_complete(path)) is not None]
    own = read_marker(target) if target.is_dir() else None
    installed = False
    if complete:
        best_seq, best = max(complete, key=lambda item: item[0])
        if own is None or best_seq > own["sequence"]:
            if target.exists() or target.is_symlink():
                aside = sibling(target, OLD_INFIX)
                os.rename(target, aside)
                _fsync_dir(target.parent)
                others.append(aside)
                fault_point("recover_moved_aside")
            os.rename(best, target)
            _fsync_dir(target.parent)
            others.remove(best)
            installed = True
            fault_point("recover_installed")
    elif not target.exists():
        # No complete version. A ``.old-*`` without a marker and no NAME is what the
        # protocol before completion markers left after a crash between its two renames
        # (a complete version); restore it if it is the only one.
        legacy = [p for p in others if OLD_INFIX in p.name and read_marker(p) is None]
        if len(legacy) == 1:
            os.rename(legacy[0], target)
            _fsync_dir(target.parent)
            others.remove(legacy[0])
            installed = True
        elif legacy:
            raise FileNotFoundError(
                f"no complete version of {target}: found {len(legacy)} backups without a "
                f"completion marker ({[p.name for p in legacy]}), written by an older version "
                "of this library; rename the right one to "
                f"{target.name} by hand"
            )
    for path in others:
        _discard(path)
    return installed


def recover(target: Union[str, Path]) -> bool:
    """Bring ``target`` to its newest complete version and remove every leftover
    (``.NAME.tmp-*``, ``.NAME.old-*``); see the module docstring. Returns whether a leftover
    version was installed as ``target``."""
    target = _real(target)
    if not leftovers_of(target):
        return False
    with _locked(target, exclusive=True):
        return _recover_locked(target)


@contextlib.contextmanager
def reading(target: Union[str, Path]) -> Iterator[Path]:
    """Hold ``target`` still while it is read: the shared lock, after recovering leftovers
    (under the exclusive lock, which is then kept for the read)."""
    target = _real(target)
    with _locked(target, exclusive=False) as locked:
        if not leftovers_of(target):
            yield target
            return
        if not locked:
            raise PermissionError(
                f"{target} has leftovers of an interrupted save ({leftovers_of(target)}) "
                "and cannot be locked to recover them here; load it once from a process that "
                "can write to its parent directory"
            )
        if _held()[str(target.parent)][0] == "exclusive":
            _recover_locked(target)
            yield target
            return
    with _locked(target, exclusive=True):
        _recover_locked(target)
        yield target


# --- writing ----------------------------------------------------------------------------


def foreign_files(target: Union[str, Path]) -> list[str]:
    """Paths in ``target`` that no save wrote (not listed in its completion marker; folders
    end with ``/``); everything, for a directory without a marker."""
    target = Path(target)
    if not target.is_dir():
        return []
    marker = read_marker(target)
    ours = set(marker["files"]) if marker else set()
    ours.add(MARKER)
    folders = {str(parent) for name in ours for parent in PurePosixPath(name).parents}
    out = []
    for path in sorted(target.rglob("*")):
        name = path.relative_to(target).as_posix()
        if path.is_dir() and not path.is_symlink():
            if name not in folders:
                out.append(name + "/")
        elif name not in ours:
            out.append(name)
    return out


def check_replaceable(
    target: Union[str, Path], overwrite: bool = False, remedy: Optional[str] = None
) -> None:
    """Raise unless a save may replace ``target``: it does not exist, is an empty directory,
    or holds only files that a save of this library wrote (``overwrite=True`` allows any
    directory). A file is never replaced. ``remedy`` replaces the advice of the error.

    Raises:
        CheckpointConflictError: (a ``FileExistsError``) naming what would be deleted.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointConflictError(
            f"cannot write a directory to {target}: a file is there; remove it or choose "
            "another path"
        )
    if overwrite:
        return
    foreign = foreign_files(target)
    if foreign:
        shown = some_names(foreign)
        legacy = (
            ""
            if read_marker(target)
            else " (it has no completion marker: it was not written by this version of the library)"
        )
        raise CheckpointConflictError(
            f"refusing to replace {target}: it holds files this library did not write ({shown})"
            f"{legacy}; saving would delete them. "
            + (
                remedy
                or "Pass overwrite=True to replace the whole directory, or choose another one"
            )
        )


@contextlib.contextmanager
def write_errors_as_os_errors() -> Iterator[list[OSError]]:
    """Raise a failed write inside the block (a full disk: ENOSPC) as the `OSError` it is:
    safetensors raises ``SafetensorError: ... I/O error: No space left on device (os error
    28)`` and torch.save, given a file object that records its write errors (the trainer's
    ``_torch_save`` appends them to the list yielded), ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos ...``, naming no cause. The command line
    names the checkpoint kept and how to resume after an `OSError` only (audit 178).
    `atomic_directory` applies it to every save (audit 188: ``save_pretrained`` in either
    format raised the ``SafetensorError``; only the trainer converted it)."""
    failed: list[OSError] = []
    try:
        yield failed
    except OSError:
        raise
    except Exception as error:
        if failed:
            raise failed[0] from error
        code = re.search(r"\(os error (\d+)\)", str(error))
        if type(error).__name__ == "SafetensorError" and code is not None:
            number = int(code[1])
            raise OSError(number, os.strerror(number)) from error
        raise


@contextlib.contextmanager
def atomic_directory(target: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an exception it
    becomes the new version of ``target`` (protocol in the module docstring).

    Args:
        target: the directory to write.
        overwrite: replace ``target`` even if it holds files no save wrote (they are
            deleted). Without it such a directory raises `CheckpointConflictError` before
            anything is written.

    On an exception before the commit point the temporary directory is removed and
    ``target`` is left as it was; a failed write of the block (a full disk) is raised as
    its `OSError` (`write_errors_as_os_errors`), whatever wrote it.
    """
    target = _real(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target, exclusive=True):
        fault_point("locked")
        _recover_locked(target)
        check_replaceable(target, overwrite)
        marker = read_marker(target) if target.is_dir() else None
        sequence = (marker["sequence"] if marker else 0) + 1
        tmp = sibling(target, TMP_INFIX)
        tmp.mkdir()
        committed = False
        try:
            with write_errors_as_os_errors():
                yield tmp
            fault_point("payload")
            _default_modes(tmp)
            _fsync_tree(tmp)
            fault_point("fsynced")
            _write_marker(tmp, sequence)
            committed = True
            fault_point("committed")
            aside = None
            if target.exists() or target.is_symlink():
                aside = sibling(target, OLD_INFIX)
                os.rename(target, aside)
                fault_point("moved_aside")
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            fault_point("installed")
            if aside is not None:
                with contextlib.suppress(OSError):  # the next save or load removes it
                    _discard(aside)
            fault_point("done")
        except BaseException:
            if committed:
                _recover_locked(target)  # finish installing the committed version
            else:
                _discard(tmp)
            raise


def remove_file(path: Union[str, Path]) -> None:
    """Delete a file written by `write_bytes_atomic`, durably (the parent is fsynced), under
    the parent's lock; nothing happens if it does not exist."""
    path = _real(path)
    with _locked(path, exclusive=True):
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write a small text file atomically (a temporary sibling, fsynced, renamed)."""
    write_bytes_atomic(path, text.encode("utf-8"))


PARTIAL_INFIX = ".partial-"


@contextlib.contextmanager
def updating(path: Union[str, Path]) -> Iterator[None]:
    """Hold the exclusive lock of ``path``'s parent for a read-modify-write of the file
    (`write_text_atomic` inside it takes the same lock, re-entrantly): another process
    updating the file waits, so neither update is lost."""
    with _locked(_real(path), exclusive=True):
        yield


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> None:
    """Write a file atomically (a temporary sibling ``.NAME.partial-<id>``, fsynced,
    renamed): a reader finds the old file or the whole new one, never a part. Writers hold
    the exclusive lock of the parent (`_locked`), so a temporary sibling found under it
    was left by a writer that was killed: it is deleted (it used to stay forever, one per
    crash)."""
    path = _real(path)
    partial = sibling(path, PARTIAL_INFIX)
    with _locked(path, exclusive=True) as locked:
        if locked:
            mine = sibling_pattern(path.name, PARTIAL_INFIX)
            for stale in path.parent.iterdir():
                if mine.fullmatch(stale.name):
                    with contextlib.suppress(OSError):
                        stale.unlink()
        try:
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        _fsync_dir(path.parent)


__all__ = [
    "MARKER",
    "CheckpointConflictError",
    "DirectoryBusyError",
    "atomic_directory",
    "check_replaceable",
    "exclusive_job",
    "foreign_files",
    "reading",
    "read_marker",
    "recover",
    "remove_file",
    "version_problems",
    "write_bytes_atomic",
    "write_errors_as_os_errors",
    "write_text_atomic",
]
