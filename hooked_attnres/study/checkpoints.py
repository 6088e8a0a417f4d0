"""Where the study's checkpoints live: the one place that knows the path convention.

A training run of one condition and model seed writes ``{root}/{condition}_seed{seed}/``
(`run_dir`) with the model in ``model/`` (`checkpoint_dir`) and its ``metrics.json``. The
shipped checkpoints use the same convention under ``hooked_attnres/data/study``
(`SHIPPED`), so ``checkpoints=None`` means "the shipped ones".

This module imports no model or trainer at import (`available` serves ``hooked-attnres list``,
which loads no torch).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from hooked_attnres._atomic import MANIFEST
from hooked_attnres._validation import as_items, require_integer
from hooked_attnres.study.recipes import CONDITIONS

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "study"
# in `SHIPPED`: ``{digest}  {condition}_seed{n}/model/{file}`` lines, the loaders' digest
# manifest (`hooked_attnres.loading.io.digest_manifest`)
SHIPPED_SUMS = MANIFEST
PathLike = Union[str, Path]


SEED_DIGITS = "0|[1-9][0-9]*"  # how `run_dir` writes a seed, as a regular expression


def run_dir(root: PathLike, condition: str, seed: int) -> Path:
    """``{root}/{condition}_seed{seed}``: what training one condition and seed writes.
    ``seed`` is an integer >= 0 (`require_integer`; ``seed=True`` named ``..._seedTrue``,
    ``2.5`` ``..._seed2.5``, and `checkpoint_dir` said "no shipped checkpoint" for them)."""
    return Path(root) / f"{condition}_seed{require_integer('seed', seed, 0)}"


def checkpoint_dir(condition: str, seed: int = 0, checkpoints: Optional[PathLike] = None) -> Path:
    """The ``model`` directory of a condition and seed, under ``checkpoints`` or, when it is
    ``None``, among the shipped checkpoints; a clear error if there is none."""
    from hooked_attnres.study.conditions import get_condition

    get_condition(condition)
    root = SHIPPED if checkpoints is None else Path(checkpoints)
    path = run_dir(root, condition, seed) / "model"
    if not (path / "config.json").exists():
        if checkpoints is None:
            shipped = sorted(p.name for p in SHIPPED.glob("*_seed*")) if SHIPPED.exists() else []
            raise FileNotFoundError(
                f"no shipped checkpoint for {condition} seed {seed} (shipped: {shipped}); train "
                f"it with `{train_command([condition], [seed], 'runs')}` and pass the runs "
                "directory to the study"
            )
        raise FileNotFoundError(
            f"{path} holds no checkpoint; train it with "
            f"`{train_command([condition], [seed], checkpoints)}`"
        )
    return path


def verify_shipped(model_dir: Path) -> bool:
    """Refuse a shipped checkpoint (``model_dir`` under `SHIPPED`) whose files (weights,
    ``config.json``, tokenizer) are not the ones `SHIPPED_SUMS` lists (another SHA-256, not
    listed, or listed and missing), with the shipped checkpoints' remedy (reinstall). The
    check is the loaders' digest manifest (`hooked_attnres.loading.io.verify_manifest`, audit
    211: ``HookedAttnRes.from_pretrained`` of a shipped folder makes it too), made here
    against `SHIPPED_SUMS` even for a folder it lists nothing of. Before audit 197 nothing
    checked the shipped checkpoints (a byte flipped inside a tensor loaded silently), and
    until session 23 the list held the weights only (an edited ``config.json`` loaded).

    Returns:
        ``True`` if ``model_dir`` is a shipped checkpoint (checked), ``False`` otherwise
        (nothing done).

    Raises:
        CheckpointIntegrityError: naming each file, its digest and the remedy; or a line of
            `SHIPPED_SUMS` that is no ``{digest}  {path}`` pair.
    """
    from hooked_attnres.loading.io import verify_manifest

    root = SHIPPED.resolve()
    try:
        model_dir.resolve().relative_to(root)
    except ValueError:
        return False
    verify_manifest(
        model_dir,
        root / SHIPPED_SUMS,
        remedy="the shipped checkpoints' files: reinstall hooked-attnres (or restore the file "
        "from the repository)",
        whole=True,  # every file of a shipped folder is listed, even one listed nowhere
    )
    return True


def metrics_path(condition: str, seed: int = 0, checkpoints: Optional[PathLike] = None) -> Path:
    """The ``metrics.json`` written when that checkpoint was trained."""
    return checkpoint_dir(condition, seed, checkpoints).parent / "metrics.json"


def seeds_found(checkpoints: Optional[PathLike], conditions: Sequence[str]) -> list[int]:
    """The model seeds that have a checkpoint for every one of ``conditions`` (a list of
    names, or one name)."""
    # one name, not its letters; a list read once (a generator was empty in the message)
    conditions = [conditions] if isinstance(conditions, str) else as_items("conditions", conditions)
    found = available(checkpoints)
    common = set.intersection(*(set(found.get(c, [])) for c in conditions)) if conditions else set()
    if not common:
        root = SHIPPED if checkpoints is None else Path(checkpoints)
        raise FileNotFoundError(
            f"{root} holds no {{condition}}_seed{{n}}/model for all of {list(conditions)}"
        )
    return sorted(common)


def available(checkpoints: Optional[PathLike] = None) -> dict[str, list[int]]:
    """``{condition: [seeds]}`` of every known condition with a checkpoint under
    ``checkpoints`` (default: the shipped ones), in `CONDITIONS` order."""
    root = SHIPPED if checkpoints is None else Path(checkpoints)
    out: dict[str, list[int]] = {}
    for condition in CONDITIONS:
        # only the folder `run_dir` names: "_seed00" or "_seed01" would be read as seed 0 or
        # 1 (twice, or one whose folder is another), and "_seed\u00b2" is a digit to isdigit
        seeds = sorted(
            int(path.name.rsplit("_seed", 1)[1])
            for path in root.glob(f"{condition}_seed*")
            if re.fullmatch(SEED_DIGITS, path.name.rsplit("_seed", 1)[1])
            and (path / "model" / "config.json").exists()
        )
        if seeds:
            out[condition] = seeds
    return out


def unfinished_runs(
    checkpoints: PathLike, conditions: Sequence[str], seeds: Optional[Sequence[int]] = None
) -> list[tuple[str, int, str]]:
    """``(condition, seed, progress)`` of every run folder ``{condition}_seed{n}`` under
    ``checkpoints`` (of ``conditions``; of ``seeds``, default any) that holds no
    ``model/config.json``: a training run started and not finished (killed, interrupted
    or failed before its model was written), which `available` does not list. ``progress``
    says how far it got (``"step 3 of 8"``, or ``"no checkpoint yet"``) for a message."""
    from hooked_attnres.training.trainer import saved_progress

    root = Path(checkpoints)
    out = []
    for condition in conditions:
        for path in sorted(root.glob(f"{condition}_seed*")):
            seed_text = path.name.rsplit("_seed", 1)[1]
            if not re.fullmatch(SEED_DIGITS, seed_text) or not path.is_dir():
                continue
            seed = int(seed_text)
            if (seeds is not None and seed not in seeds) or (
                path / "model" / "config.json"
            ).exists():
                continue
            progress = saved_progress(path) or (
                "a checkpoint" if (path / "checkpoint").exists() else "no checkpoint yet"
            )
            out.append((condition, seed, progress))
    return out


def train_command(
    conditions: Sequence[str], seeds: Sequence[int], root: PathLike, options: Sequence[str] = ()
) -> str:
    """The ``hooked-attnres train`` command line that trains ``conditions`` x ``seeds`` into
    ``root`` with ``options`` (its further arguments, e.g. ``["--no-resume"]``), quoted for
    a POSIX shell (`shlex.join`: a folder with a space stays one argument), for a message.
    A folder named with a leading dash is given as ``--out=-runs``: ``--out -runs`` is
    refused by the parser (expected one argument)."""
    seed_texts = [str(seed) for seed in seeds]
    return shlex.join(
        ["hooked-attnres", "train", "--condition", *conditions, "--seeds", *seed_texts]
        + [*_folder_option("--out", root), *options]
    )


def study_command(checkpoints: PathLike) -> str:
    """The ``hooked-attnres study`` command line that studies the runs under
    ``checkpoints``, quoted for a POSIX shell as `train_command` is, for a message."""
    return shlex.join(["hooked-attnres", "study", *_folder_option("--checkpoints", checkpoints)])


def _folder_option(option: str, folder: PathLike) -> list[str]:
    """``[option, folder]`` for a command line, or ``[f"{option}={folder}"]`` for a folder
    named with a leading dash, which the parser would take for an option (``--out -runs``:
    expected one argument)."""
    return [f"{option}={folder}"] if str(folder).startswith("-") else [option, str(folder)]


def resume_options(folder: PathLike) -> list[str]:
    """The ``train`` options that a resume of the run in ``folder`` (a run's folder) needs
    besides its settings: ``["--threads", "N"]``, the thread count its checkpoint was
    written with (`saved_threads`); ``[]`` if it holds no checkpoint that records one.
    Without --threads a command trains with the machine's default, the free cores, which
    changes with its load, and a resume with another count is refused (it moves float
    sums: "checkpoint was written with 1 threads ... this run has 2"; review 231)."""
    from hooked_attnres.training.trainer import saved_threads

    threads = saved_threads(folder)
    return [] if threads is None else ["--threads", str(threads)]


def finish_command(condition: str, seed: int, root: PathLike) -> str:
    """How to finish the training run of ``condition`` and ``seed`` under ``root`` (stopped
    before its model and ``metrics.json`` were both written): the ``train`` command that
    resumes it from its checkpoint, with the thread count it was written with
    (`resume_options`), for a message. The original two recipes (``legacy``) also train
    with other settings, which a resume needs again: without them it is refused as another
    run, whose remedy (--no-resume or another --out) would discard this one (review
    155)."""
    from hooked_attnres.study.conditions import get_condition

    options = (
        ", with the --steps / --set / --task-arg options it was started with, if any"
        if get_condition(condition).legacy
        else ""
    )
    command = train_command(
        [condition], [seed], root, resume_options(run_dir(root, condition, seed))
    )
    return f"{command}{options}: it resumes from its checkpoint"
