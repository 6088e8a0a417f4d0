"""Train a HookedAttnRes (any layout) or a vanilla ``Qwen3ForCausalLM`` on probe tasks.

* AdamW (weight decay on every parameter), linear warm-up then cosine decay, clipping by
  the global gradient norm; the objective is `TaskBatch.loss`, the mean cross-entropy
  over the batch's supervised tokens (the answer at the answer position, and any earlier
  answered query of a multi-query prompt). ``docs/training.md`` ("The numbers, exactly")
  gives every formula.
* Seeded and resumable bit for bit: the model is initialised from ``model_seed``; the
  batch of step ``s`` is ``task.sample(batch_size, data_seed, "train", stream=s)``; the
  learning rate is a function of the step; torch's global generators are seeded with
  ``_step_seed(data_seed, s)`` before step ``s`` (dropout of a ``transformers`` model),
  inside ``torch.random.fork_rng`` (the caller's random state is left as it was). A
  checkpoint (model, optimizer, step, history) is written atomically every
  ``checkpoint_every`` steps, at the end, and on ``KeyboardInterrupt`` (Ctrl-C, or
  SIGTERM where the caller's handler raises one, as the command line's does; either waits
  for an optimizer update and its bookkeeping to finish: `_interrupts_deferred`);
  ``train`` resumes from it, for the same settings and model only.
* Held-out accuracy on ``eval_size`` test-split prompts every ``eval_every`` steps; a
  tqdm bar shows loss and accuracy.

Layout of ``out_dir``: ``checkpoint/`` (``model/``, ``optimizer.pt``,
``trainer_state.json``), and at the end ``model/`` (the final model: this package's
format, or Hugging Face's for a vanilla Qwen3, tokenizer included) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, Union, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from hooked_attnres._atomic import (
    DIGESTS,
    CheckpointConflictError,
    atomic_directory,
    backups_of,
    check_outside_package,
    check_replaceable,
    exclusive_job,
    fault_point,
    foreign_files,
    other_save,
    read_marker,
    reading,
    remove_file,
    write_errors_as_os_errors,
    write_text_atomic,
)
from hooked_attnres._environment import numerics_environment, thread_count
from hooked_attnres._study_limits import MAX_THREADS, WHY_MAX_THREADS
from hooked_attnres._validation import (
    as_items,
    is_integer,
    non_finite_tensors,
    require_bool,
    require_finite_number,
    require_integer,
    require_tokenizer,
    some_names,
)
from hooked_attnres.interventions.routing import require_whole_batch_means
from hooked_attnres.loading.io import verify_saved_files
from hooked_attnres.model.hooked_attnres import HookedAttnRes
from hooked_attnres.tasks.base import Task, TaskBatch


@dataclass
class TrainConfig:
    """Optimisation settings. The defaults are a generic recipe (2000 steps, peak lr 2e-3,
    a checkpoint every 500 steps), not the study's: `hooked_attnres.study.study_train_config`
    gives the study's (1200 steps, peak lr 5e-4, a checkpoint every 200); the other
    defaults are shared (docs/training.md).

    Args:
        steps: optimiser steps.
        batch_size: prompts per step.
        lr: peak learning rate; ``min_lr_ratio`` of it at the end of the cosine.
        warmup_steps: linear warm-up: step ``s`` (0-based) uses ``lr * (s + 1) /
            warmup_steps``, so the first step already has ``lr / warmup_steps`` (`lr_at`).
        weight_decay, betas, grad_clip: AdamW (eps 1e-8; decoupled decay of every
            parameter, norm gains and router parameters included) and clipping by the
            global norm of all gradients (``grad_clip=None``: none).
        data_seed: seed of the prompt stream and of the held-out set.
        eval_every, eval_size: held-out accuracy schedule and size.
        stop_accuracy: stop at the first evaluation whose held-out accuracy is at least
            this on every evaluation task (a NaN accuracy, `evaluate`, reaches no
            threshold; the final model is the model of that step;
            ``None``: train all ``steps``; reaching it at the last step is a normal end).
            Evaluations never change the weights, so a run that does not reach it equals
            the same run without it, bit for bit.
        checkpoint_every: steps between checkpoints (``None``: only at the end).
        threads: ``torch.set_num_threads`` during training, restored afterwards (``None``: leave
            as is).
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: Optional[float] = 1.0
    data_seed: int = 0
    eval_every: int = 200
    eval_size: int = 512
    stop_accuracy: Optional[float] = None
    checkpoint_every: Optional[int] = 500
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        def integer(name: str, low: int, optional: bool = False, **bound: Any) -> None:
            value = require_integer(name, getattr(self, name), low, optional, **bound)
            setattr(self, name, value)

        def number(name: str, value: Any) -> float:
            return float(require_finite_number(name, value))

        for name in ("steps", "batch_size", "eval_every", "eval_size"):
            integer(name, 1)
        integer("warmup_steps", 0)
        integer("data_seed", 0)
        integer("checkpoint_every", 1, optional=True)
        # at most what torch.set_num_threads takes, as --threads (one bound, one wording)
        integer("threads", 1, optional=True, maximum=MAX_THREADS, why_maximum=WHY_MAX_THREADS)
        self.lr = number("lr", self.lr)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.min_lr_ratio = number("min_lr_ratio", self.min_lr_ratio)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.stop_accuracy is not None:
            self.stop_accuracy = number("stop_accuracy", self.stop_accuracy)
            if not 0 <= self.stop_accuracy <= 1:
                raise ValueError(
                    f"stop_accuracy must be an accuracy in [0, 1] or None, got "
                    f"{self.stop_accuracy!r}"
                )
        self.weight_decay = number("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.lr * self.weight_decay >= 1:  # the peak step's decay factor 1 - lr * wd
            raise ValueError(
                f"lr * weight_decay must be < 1, got {self.lr!r} * {self.weight_decay!r}: AdamW "
                "multiplies every weight by 1 - lr * weight_decay each step, which would zero "
                "the weights or flip their sign"
            )
        if self.grad_clip is not None:
            self.grad_clip = number("grad_clip", self.grad_clip)
            if self.grad_clip <= 0:
                raise ValueError(
                    f"grad_clip must be > 0 (the largest gradient norm) or None (no clipping), "
                    f"got {self.grad_clip!r}; 0 would zero every update and a negative value "
                    "would reverse them"
                )
        if self.warmup_steps > self.steps:
            note = (
                f" (the default; a run this short sets its own, e.g. "
                f"TrainConfig(steps={self.steps}, warmup_steps=0))"
                if self.warmup_steps == type(self).warmup_steps
                else ""
            )
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}{note}"
            )
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (number("betas[0]", betas[0]), number("betas[1]", betas[1]))
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): ``lr * (step + 1) /
        warmup_steps`` during the warm-up, then the cosine from ``lr`` (at ``step ==
        warmup_steps``) towards ``min_lr_ratio * lr`` (reached at ``step == steps``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        if out["stop_accuracy"] is None:
            # written only when set: runs without it keep the identity recorded before the
            # field existed (their checkpoints resume, their metrics.json stay comparable)
            del out["stop_accuracy"]
        return out


class TrainingDivergedError(FloatingPointError):
    """The loss or the weights became NaN or infinite; training stopped without writing
    them (the last good checkpoint is kept). ``step`` is the step that diverged: the one
    whose loss was not finite, or whose update made the weights so (1 is the first)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # pickled with its step (the default passes the message alone)
        return (type(self), (str(self), self.step))


def _check_finite(model, step: int, where: str) -> None:
    bad = non_finite_tensors(model.named_parameters())
    if bad:
        raise TrainingDivergedError(
            f"parameter {bad[0][0]} is not finite after step {step}; {where}", step
        )


# What earlier versions of the trainer wrote (before completion markers): a directory
# holding only such files may be replaced by the trainer.
_LEGACY_NAMES = re.compile(
    r"^(model/)?(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|chat_template\.jinja|optimizer\.pt|trainer_state\.json|"
    r"model/)$"
)


def _trainer_may_replace(directory: Path) -> bool:
    """Whether ``directory`` holds only what an earlier version of the trainer wrote (no
    completion marker yet); `check_replaceable` refuses such directories otherwise."""
    if read_marker(directory) is not None:
        return False
    foreign = foreign_files(directory)
    return bool(foreign) and all(_LEGACY_NAMES.match(name) for name in foreign)


# remedies in the words of both callers: `train` and the command line (whose run folders
# are OUT/{condition}_seed{seed}, so another --out is another out_dir); a refused resumption
_ANOTHER_OUT_DIR = "choose another out_dir (on the command line: another --out)"
_START_OVER = (
    "use another out_dir or resume=False (on the command line: another --out, or --no-resume)"
)


def _check_output(directory: Path) -> bool:
    """Fail before any work if the trainer may not write ``directory``; returns the
    ``overwrite`` flag for it."""
    legacy = _trainer_may_replace(directory)
    check_replaceable(
        directory,
        overwrite=legacy,
        remedy=f"Move them away or {_ANOTHER_OUT_DIR} (the trainer owns out_dir/model and "
        "out_dir/checkpoint)",
    )
    return legacy


def _progress_text(state: Any) -> str:
    """How far the run of a parsed ``trainer_state.json`` got, ``"step 3 of 8"`` (the step
    it reached, of the steps its config asks for).

    Raises:
        ValueError, KeyError, TypeError: a state without a step of steps."""
    return f"step {int(state['step'])} of {int(state['train_config']['steps'])}"


def _saved_state(out_dir: Union[str, Path]) -> Any:
    """The parsed ``trainer_state.json`` of the checkpoint in ``out_dir/checkpoint`` (a
    run's folder); ``None`` when there is none or it cannot be read. For messages about a
    run, not for resuming (`_Checkpoint.load` checks the files first)."""
    state_file = Path(out_dir) / "checkpoint" / "trainer_state.json"
    try:
        return json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def saved_progress(out_dir: Union[str, Path]) -> Optional[str]:
    """How far the run of the checkpoint in ``out_dir/checkpoint`` (a run's folder) got,
    ``"step 3 of 8"`` (`_progress_text` of its ``trainer_state.json``); ``None`` when there
    is none or it cannot be read (`_saved_state`)."""
    try:
        return _progress_text(_saved_state(out_dir))
    except (ValueError, KeyError, TypeError):
        return None


def saved_threads(out_dir: Union[str, Path]) -> Optional[int]:
    """The torch thread count the run of the checkpoint in ``out_dir/checkpoint`` trained
    with (its ``environment``: a resume with another count is refused, as it moves float
    sums); ``None`` when there is none or it cannot be read (`_saved_state`). For the
    command that resumes the run."""
    state = _saved_state(out_dir)
    environment = state.get("environment") if isinstance(state, dict) else None
    threads = environment.get("threads") if isinstance(environment, dict) else None
    return threads if is_integer(threads) and threads >= 1 else None


def _run_record(state: dict, drop: str) -> str:
    """What identifies a run's weights in a ``trainer_state.json`` or ``metrics.json``
    (``drop``: the key only that file has), as canonical JSON text: its settings, tasks,
    model, step and history, less ``seconds`` (a finished run resumed adds the time of
    its final writes to its checkpoint, not yet to metrics.json). Text, not the values:
    a NaN accuracy is not equal to itself."""
    kept = {k: v for k, v in state.items() if k not in (drop, "seconds")}
    return json.dumps(kept, sort_keys=True)


# how to resume a run on the command line (`info`'s note says only this), and in the words
# of both callers of `checkpoint_run_differs`
RESUME_ON_COMMAND_LINE = "the train command without --no-resume"
_RESUME = (
    "train(...) into the run's out_dir with resume=True (on the command line: "
    f"{RESUME_ON_COMMAND_LINE})"
)


def _rewrite(resume: str) -> str:
    """The remedy that writes a run's ``model/`` and ``metrics.json`` again from its
    checkpoint, ``resume`` saying how to resume it, for a message."""
    return f"resume the run ({resume}), which writes model/ and metrics.json from the checkpoint"


def read_run_metrics(out_dir: Union[str, Path], resume: str = _RESUME) -> dict:
    """``out_dir/metrics.json``, the record a finished run wrote with its model, parsed.

    Raises:
        CheckpointError: the file is no JSON object, or not UTF-8 (truncated or corrupt),
            naming it and what to do: with the run's checkpoint beside it, resume the run
            (``resume`` saying how), which writes it again; without one, restore it or train
            the run again (review 222: a bare JSONDecodeError, which named neither; audit
            225: a bare UnicodeDecodeError).
        OSError: it cannot be read."""
    from hooked_attnres.loading.io import CheckpointError

    out_dir = Path(out_dir)
    metrics_file = out_dir / "metrics.json"
    try:  # decoded in here: a byte that is no UTF-8 is a corrupt file too (audit 225)
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        if not isinstance(metrics, dict):
            raise ValueError(f"it holds a JSON {type(metrics).__name__}, not an object")
    except ValueError as error:
        if (out_dir / "checkpoint" / "trainer_state.json").is_file():
            remedy = _rewrite(resume)
        else:
            remedy = (
                "no checkpoint of the run is beside it to write it again from: restore it "
                "from a backup (a shipped run's: reinstall hooked-attnres), or move "
                f"{out_dir} away and train the run again"
            )
        raise CheckpointError(f"{_unreadable(metrics_file, error)}; {remedy}") from error
    return metrics


def _unreadable(path: Path, error: Exception) -> str:
    """``"could not read PATH: the file is truncated or corrupt (ERROR: first line)"``, the
    start of a message on a run's file that its reader could not parse (`read_run_metrics`,
    `_read_saved`)."""
    lines = str(error).strip().splitlines()
    cause = lines[0] if lines else ""
    corrupt = f"the file is truncated or corrupt ({type(error).__name__}: {cause})"
    return f"could not read {path}: {corrupt}"


def checkpoint_run_differs(out_dir: Union[str, Path], resume: str = _RESUME) -> Optional[str]:
    """Why ``out_dir/checkpoint`` and ``out_dir/metrics.json`` record different runs, and
    what to do (resume the run, ``resume`` saying how), for a message; ``None`` when both
    record the same run (also after a start-over of the same settings and environment
    killed in its final writes: the training is deterministic, the weights are the same)
    or either file is missing. A difference means a run started over (``resume=False``,
    --no-resume) and stopped, or killed, before its final writes, so ``out_dir/model``
    (written with metrics.json) is an earlier finished run's (audit 197: the study read
    such a folder's model as the run's); or a file changed after it was written. A changed
    ``trainer_state.json`` is told by the SHA-256 its checkpoint's completion marker
    records (refused, below); a changed ``metrics.json`` is not (nothing records its
    digest), nor is a ``trainer_state.json`` whose checkpoint records none (an earlier
    version's), so the text names those possibilities too, with what to do in each case,
    and where the two records first differ (`_record_difference`), which the reader can
    judge (audit 218: a digit changed in trainer_state.json was called another run).

    Raises:
        CheckpointError: a ``metrics.json`` that cannot be read (`read_run_metrics`), with
            or without a checkpoint beside it.
        CheckpointIntegrityError: ``trainer_state.json`` differs from the SHA-256 its
            checkpoint's completion marker records (`verify_saved_files`).
        CheckpointError: a ``trainer_state.json`` that cannot be read (`_read_saved`) or
            records no step of steps, naming it: what it holds cannot be compared (review
            207: it was reported as another run, the model as an earlier run's)."""
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint"
    state_file = checkpoint / "trainer_state.json"
    metrics_file = out_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    # a save of the checkpoint killed between moving the last one aside and installing
    # its own left no checkpoint/ in place: recovered first, as a load does
    with reading(checkpoint):
        metrics = read_run_metrics(out_dir, resume)  # named if it cannot be read
        if not state_file.is_file():
            return None
        verify_saved_files(
            checkpoint,
            remedy=f"the run it holds cannot be compared with {metrics_file}; restore "
            f"{checkpoint} from a backup, or {_START_OVER}",
            names=[state_file.name],
        )
        digests = (read_marker(checkpoint) or {}).get(DIGESTS)
        checked = isinstance(digests, dict) and state_file.name in digests
        state = _read_saved(state_file, lambda path: json.loads(path.read_text(encoding="utf-8")))
        try:
            progress = _progress_text(state)
        except (ValueError, KeyError, TypeError) as error:
            from hooked_attnres.loading.io import CheckpointError

            raise CheckpointError(
                f"{state_file} records no step of steps ({type(error).__name__}: {error}), so "
                f"the run it holds cannot be compared with {metrics_file}; restore "
                f"{checkpoint} from a backup, or {_START_OVER}"
            ) from error
    saved, finished = _run_record(state, "initial_weights"), _run_record(metrics, "final_accuracy")
    if saved == finished:
        return None
    where = _record_difference(json.loads(saved), json.loads(finished))
    differ = f"{checkpoint} (at {progress}) and {metrics_file} record different runs ({where})"
    started_over = (
        "either the checkpoint's run was started over (resume=False, --no-resume) and "
        f"stopped or killed before its end, which alone replaces {out_dir / 'model'} and "
        "metrics.json, so both are an earlier finished run's"
    )
    rewrite = _rewrite(resume)
    if checked:
        return (
            f"{differ}: {started_over}; or metrics.json was changed after it was written "
            "(trainer_state.json matches the SHA-256 its checkpoint recorded, but no digest "
            f"of metrics.json is kept, so the two cannot be told apart); in either case {rewrite}"
        )
    return (
        f"{differ}: {started_over}; or metrics.json or trainer_state.json was changed after "
        "it was written (the checkpoint records no digest of trainer_state.json: written by "
        "an earlier version or by hand; none of metrics.json is kept), which cannot be told "
        f"apart; if the run was started over or metrics.json changed, {rewrite}; if "
        f"trainer_state.json changed, restore {checkpoint} from a backup, or {_START_OVER}"
    )


def _record_difference(saved: dict, finished: dict) -> str:
    """Where a checkpoint's run record and a metrics.json's (`_run_record`, parsed) first
    differ, for a message: ``"train_config.lr: 0.001 vs 0.0005"`` (the checkpoint's value
    first); the settings, tasks and model before how far the run got, and that before its
    history. A list of another length is counted (``"history: 2 vs 4 entries"``), another
    container only named."""
    progress = ("step", "stopped_early", "history")
    groups = [[k for k in {**saved, **finished} if k not in progress], *[[k] for k in progress]]
    for keys in groups:
        first = _first_difference(
            {k: saved.get(k) for k in keys}, {k: finished.get(k) for k in keys}
        )
        if first is not None:
            field, before, now = first
            if isinstance(before, list) and isinstance(now, list):
                return f"{field}: {len(before)} vs {len(now)} entries"
            if isinstance(before, (list, dict)) or isinstance(now, (list, dict)):
                return f"{field} differs"
            return f"{field}: {before!r} vs {now!r}"
    # equal as values, not as text: a number written otherwise (4 vs 4.0, true vs 1)
    return "they differ"


def check_run_folder(out_dir: Path) -> None:
    """Refuse, before any work, an ``out_dir`` that is not new, empty or a training run's
    folder: the run writes ``model/``, ``checkpoint/`` and ``metrics.json`` into it and
    replaces a ``model/`` and ``metrics.json`` there. A folder that is itself a save of this
    library (a model checkpoint, a study, a run's ``checkpoint``: it has a completion
    marker) is not a run's folder (one rule with the study's `check_out_dir`); nor are a
    ``model/`` (unless an empty folder) or ``metrics.json`` without the run's checkpoint
    beside them (a shipped checkpoint's folder, or the user's own files), which the run
    replaced (audit 126). Also refused: a file at ``out_dir``, and a ``model/`` or
    ``checkpoint/`` holding files the trainer did not write (`_check_output`), and a folder
    inside the package (`hooked_attnres._atomic.check_outside_package`, audit 169): every
    refusal of ``out_dir`` that `train` makes, so that ``hooked-attnres train`` checks each
    run's folder before the first run trains (review 131)."""
    check_outside_package(out_dir, "out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"out_dir {out_dir} is a file; the trainer writes a directory: move it away or "
            f"{_ANOTHER_OUT_DIR}"
        )
    saved = other_save(out_dir)
    if saved is not None:
        raise CheckpointConflictError(
            f"refusing to train into {out_dir}: it is not a training run's folder but another "
            f"save of this library ({saved}), into which the "
            f"run would write its model, checkpoint and metrics.json; {_ANOTHER_OUT_DIR}: a "
            "new or empty folder, or an earlier run's"
        )
    checkpoint = out_dir / "checkpoint"
    model = out_dir / "model"
    # not an earlier run's folder (resumed, or started over with resume=False): a model/
    # or metrics.json there is not the run's (an empty model/ holds nothing to replace)
    earlier = (checkpoint / "trainer_state.json").is_file() or backups_of(checkpoint)
    held = sorted(p.name for p in model.iterdir()) if model.is_dir() else []
    theirs = [
        name
        for name in ("model", "metrics.json")
        if (out_dir / name).exists() and not (name == "model" and model.is_dir() and not held)
    ]
    if theirs and not earlier:
        listed = [
            f"model/ (holding {some_names(held)})" if n == "model" and held else n for n in theirs
        ]
        raise CheckpointConflictError(
            f"refusing to train into {out_dir}: its {' and '.join(listed)} "
            f"{'is' if len(theirs) == 1 else 'are'} not a training run's (there is no "
            "checkpoint/trainer_state.json beside them: e.g. a shipped checkpoint's folder "
            "or your own files), and the run would replace them; "
            f"move them away or {_ANOTHER_OUT_DIR}"
        )
    _check_output(model)
    _check_output(checkpoint)


@dataclass
class TrainResult:
    """What `train` returns (a finished run's also written to ``out_dir/metrics.json``;
    a call that stopped before the end writes none, and a ``metrics.json`` there is an
    earlier finished run's)."""

    out_dir: Path
    # ``out_dir/model`` once the run is finished; ``None`` when this call stopped before the
    # end (``stop_after``): only a finished run writes ``out_dir/model``, and a model there
    # is an earlier run's (its state is in ``out_dir/checkpoint/model``)
    model_dir: Optional[Path]
    steps: int
    final_accuracy: dict[str, float]
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False  # `TrainConfig.stop_accuracy` was reached before `steps`


def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_vocab]`` logits of a HookedAttnRes or a HF causal LM."""
    if isinstance(model, HookedAttnRes):
        return model(tokens)
    return model(input_ids=tokens).logits


class _RecordedWrites:
    """A binary file for torch.save whose failed writes are appended to ``failed``
    (torch reports them as a bare "unexpected pos": `write_errors_as_os_errors`)."""

    def __init__(self, handle, failed: list[OSError]):
        self.handle, self.failed = handle, failed

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.failed.append(error)
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(value, path: Path) -> None:
    """``torch.save(value, path)``; a failed write raised as its `OSError`."""
    with write_errors_as_os_errors() as failed, open(path, "wb") as handle:
        # torch.save calls write (and flush) only
        torch.save(value, cast(IO[bytes], _RecordedWrites(handle, failed)))


def save_model(model, directory: Path, tokenizer=None, progress: bool = True) -> None:
    """Write a HookedAttnRes (this package's format) or a HF model (``save_pretrained``)
    into an existing directory, with ``tokenizer`` (a HookedAttnRes: its attached one, or
    ``tokenizer`` when none is attached). Called inside `atomic_directory`, which raises a
    failed write (a full disk) as its `OSError` (`write_errors_as_os_errors`).
    ``progress=False`` hides the bar ``transformers`` draws while it writes a HF model
    (``Writing model shards``: `_transformers_bars_hidden`)."""
    if isinstance(model, HookedAttnRes):
        from hooked_attnres.loading.own_format import write_checkpoint_files

        write_checkpoint_files(model, directory)  # with the attached tokenizer, if any
        if model.tokenizer is None and tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    else:
        # save_pretrained sets the model's config.architectures (and config.dtype) in
        # memory; put them back so that saving does not change the model's identity (a
        # run continued with the same model object would be refused as another run's)
        architectures, dtype = model.config.architectures, model.config.dtype
        with _transformers_bars_hidden(not progress):
            model.save_pretrained(str(directory))
        model.config.architectures, model.config.dtype = architectures, dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))


@contextmanager
def _transformers_bars_hidden(hidden: bool = True) -> Iterator[None]:
    """Inside the block ``transformers`` draws no progress bar (if ``hidden``): every bar
    it makes is made disabled (`transformers.utils.logging.set_tqdm_hook`, public since
    transformers 5.9, the oldest this package takes); the hook it had, a caller's or
    none, is put back after (by the last to end, where saves of several threads overlap).
    Before audit 188 ``progress=False`` (``--no-progress``) left its ``Writing model
    shards`` bar on stderr at every save of a vanilla model."""
    if not hidden:
        yield
        return
    from transformers.utils import logging as hf_logging

    with _HIDING_LOCK:  # the hook is global: saves of several threads share one hiding
        if not _hiding:
            _hiding.append(hf_logging.set_tqdm_hook(_disabled_bar))
        _hiding.append(_disabled_bar)
    try:
        yield
    finally:
        with _HIDING_LOCK:  # the last save to end puts the hook found back (review 194:
            # A starts, B starts, A ends put the caller's hook back under B's save, and
            # B's end the hiding hook, for good)
            _hiding.pop()
            if len(_hiding) == 1:
                hf_logging.set_tqdm_hook(_hiding.pop())


def _disabled_bar(factory: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """A transformers tqdm hook: the bar made disabled (`_transformers_bars_hidden`)."""
    return factory(*args, **{**kwargs, "disable": True})


# `_transformers_bars_hidden` of the saves running now: the hook found first, then one
# entry per save
_HIDING_LOCK = threading.Lock()
_hiding: list[Any] = []


def _saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files `save_model` wrote into ``directory``
    (one that cannot be read: `_read_saved`)."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(_read_saved(path, lambda p: load_file(str(p))))
    return state


def _read_saved(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)`` of a checkpoint's file; a file its reader cannot parse (truncated or
    corrupt) raised as a `CheckpointError` naming it, where the readers named neither the
    file nor a remedy (audit 197: torch's ``PytorchStreamReader failed reading zip
    archive``, safetensors' ``incomplete metadata, file not fully covered``, a bare
    JSONDecodeError). A checkpoint with a completion marker was checked against its save
    first (`verify_saved_files`); one without (an earlier version's, or assembled by
    hand) was not, which the message says."""
    from safetensors import SafetensorError

    from hooked_attnres.loading.io import CheckpointError

    try:
        return read(path)
    except (ValueError, RuntimeError, EOFError, SafetensorError) as error:
        checkpoint = next((p for p in path.parents if p.name == "checkpoint"), path.parent)
        unchecked = (
            f" ({checkpoint} has no completion marker, written by an earlier version or by "
            "hand, so its files are not checked against their save)"
            if read_marker(checkpoint) is None
            else ""
        )
        raise CheckpointError(
            f"{_unreadable(path, error)}{unchecked}; restore {checkpoint} from a backup, or "
            f"{_START_OVER}"
        ) from error


def _weights_identity(model) -> str:
    """SHA-256 of every parameter (name, dtype, shape and bytes): the weights a run starts
    from, which the model's configuration does not always say (a ``transformers`` model
    does not record its seed)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor = param.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(param.shape)}\n".encode())
        # the bytes read in place (``tobytes`` copied each tensor first; the same digest):
        # 1.2 s instead of 1.6 s for Qwen3-0.6B's 0.6e9 float32 parameters, one thread
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


# model object -> (the initial weights of the run it was left part-way through, its weights
# then): by an error (a step or more past the run's last checkpoint: an error between two
# checkpoints writes none), so resuming it continues its own run; or by Ctrl-C or
# ``stop_after`` (at its checkpoint), so starting it over from step 0 is refused too
_LEFT_PART_WAY: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def _note_left_part_way(model, initial: Optional[str]) -> None:
    """Record that an error, Ctrl-C or ``stop_after`` left ``model`` part-way through the
    run that started from ``initial`` (`_LEFT_PART_WAY`), for `_Checkpoint.load` and
    `_require_not_left_part_way`; nothing if that cannot be done (e.g. an out-of-memory
    error again: resuming then needs the run's freshly built model)."""
    if initial is None:
        return
    try:
        _LEFT_PART_WAY[model] = (initial, _weights_identity(model))
    except Exception:  # the caller's error is the one to see
        pass


def _require_not_left_part_way(model, weights: str, start: str) -> None:
    """Refuse to train ``model`` from step 0 (``start`` says why: no checkpoint to resume,
    or ``resume=False``) if an error, Ctrl-C or ``stop_after`` left it part-way through a
    run (`_LEFT_PART_WAY`) with other weights than that run's initial ones and it still has
    them (``weights``, its `_weights_identity` now): it would start from partly trained
    weights, silently not the run asked for (audit 150: final weights 1.5e-2 off after an
    error in the second update, before the first checkpoint; review 155: 1.0e-2 off with
    ``resume=False`` after ``stop_after=3`` of 4 steps)."""
    left = _LEFT_PART_WAY.get(model)
    if left is not None and left[1] == weights and left[0] != weights:
        raise ValueError(
            "this model object was left part-way through a run by an error, Ctrl-C or "
            f"stop_after (some optimizer updates were made, and {start}), so training it now "
            "would start from its partly trained weights, not from the run's initial ones, "
            "and would not equal an uninterrupted run; to continue that run, train it with "
            "resume=True into that run's out_dir (if a checkpoint was written there); to "
            "start over, build the model afresh (the same seed and settings) and train it"
        )


def load_model_state(model, directory: Path) -> None:
    """Copy the weights saved by `save_model` into ``model`` (in place)."""
    state = _saved_weights(directory)
    if not isinstance(model, HookedAttnRes) and model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def evaluate(model, batches: dict[str, TaskBatch], chunk: int = 256) -> dict[str, float]:
    """Answer accuracy of ``model`` on each named batch: ``{name: fraction of the batch's
    prompts whose argmax at ``answer_pos`` is ``answer``}`` (a prompt whose answer ties
    ``k - 1`` other tokens for the largest logit counts ``1 / k``, `TaskBatch.correct`;
    summed in float64, so the result is `TaskBatch.accuracy` of the batch whatever
    ``chunk``: review 185), in eval mode (the caller's
    mode is restored, also on an error), ``chunk`` prompts (an integer >= 1) per forward
    pass. An empty batch is refused (it has no accuracy). A prompt whose argmax is
    undefined (NaN logits, e.g. of an overflow; `TaskBatch.correct`) makes its batch's
    accuracy NaN, not a guess. A batch of more than one chunk is refused while a
    ``value="mean"`` patch is attached (`require_whole_batch_means`)."""
    # a chunk <= 0 gave an empty range: no prompt scored, accuracy 0.0 silently
    chunk = require_integer("chunk", chunk, 1)
    for name, batch in batches.items():
        if len(batch) == 0:
            raise ValueError(f"evaluate: batch {name!r} has no prompts, so it has no accuracy")
        if isinstance(model, HookedAttnRes):  # an attached value="mean" patch: one pass
            require_whole_batch_means(model, len(batch), chunk, "evaluate")
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, batch in batches.items():
            correct = 0.0
            for start in range(0, len(batch), chunk):
                part = batch[start : start + chunk]
                # a float64 sum, exact for the float32 shares: the chunk does not round it,
                # and the result is TaskBatch.accuracy's (a float32 sum rounded 1/3 shares)
                scores = part.correct(model_logits(model, part.tokens))
                correct += scores.double().sum().item()
            out[name] = correct / len(batch)
    finally:
        model.train(was_training)
    return out


class _Checkpoint:
    """The resumable state in ``out_dir/checkpoint``."""

    def __init__(self, out_dir: Path, progress: bool = True):
        self.directory = out_dir / "checkpoint"
        self.progress = progress  # False: transformers' bar of a vanilla save is hidden
        self.overwrite = _check_output(self.directory)
        self.step: Optional[int] = None  # the step of the last checkpoint written or read
        # `_weights_identity` of the run's model before its first step, written with every
        # checkpoint (not into metrics.json); None: unknown (a checkpoint written before it
        # was recorded)
        self.initial_weights: Optional[str] = None

    def save(self, model, optimizer, state: dict, tokenizer) -> None:
        _check_finite(model, state["step"], f"it is not written; {self.describe()}")
        if self.initial_weights is not None:
            state = {**state, "initial_weights": self.initial_weights}
        with atomic_directory(self.directory, overwrite=self.overwrite) as tmp:
            (tmp / "model").mkdir()
            save_model(model, tmp / "model", tokenizer, self.progress)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(
                json.dumps(state, indent=2) + "\n", encoding="utf-8"
            )
        self.overwrite = False  # written with a completion marker from now on
        self.step = state["step"]

    def _require_same_run(self, saved: dict, identity: dict[str, Any]) -> None:
        for key, value in identity.items():
            if key not in saved:
                raise ValueError(
                    f"{self.directory} does not record its run's {key!r} (written by an older "
                    f"version), so resuming it cannot be checked; {_START_OVER}"
                )
            if key == "vocabulary" and saved[key] != value:
                raise ValueError(
                    f"{self.directory} was written by a run with another tokenizer: the "
                    f"vocabulary differs (SHA-256 {str(saved[key])[:12]}... vs {value[:12]}...), "
                    "so every prompt would be other token ids, even with the same words and "
                    f"size; pass the run's tokenizer, or {_START_OVER}"
                )
            if key == "environment" and saved[key] != value:
                # the settings (compared first) are equal, so a differing thread count is
                # the caller's (TrainConfig.threads None): TrainConfig(threads=...) would be
                # another run's settings, refused in turn
                threads = saved[key]["threads"]
                remedies = []
                if threads != value["threads"]:
                    remedies.append(
                        f"set the caller's thread count to {threads} (torch.set_num_threads("
                        f"{threads}); on the command line --threads {threads}), since this "
                        "run's TrainConfig leaves it to the caller (threads=None)"
                    )
                if saved[key]["versions"] != value["versions"]:
                    remedies.append(f"install torch, NumPy {saved[key]['versions']}")
                remedy = " and ".join(remedies)
                raise ValueError(
                    f"{self.directory} was written with {threads} threads and "
                    f"torch, NumPy {saved[key]['versions']}; this run has {value['threads']} "
                    f"and {value['versions']}: resumed, it would not equal an uninterrupted "
                    f"run (both move float sums); to resume, {remedy}; or {_START_OVER}"
                )
            difference = _first_difference(saved[key], value)
            if difference is not None:
                field, before, now = difference
                where = f"{key}.{field}" if field else key
                raise ValueError(
                    f"{self.directory} was written by a different run ({where} differs: "
                    f"{before!r} vs {now!r}); {_START_OVER}"
                )

    def _require_run_model(self, model) -> None:
        """Refuse a model that is neither the run's initial model nor one an error left in
        the run (`_LEFT_PART_WAY`; both checked by the caller) nor the checkpoint's (the
        same model object continuing its run): its weights would
        be replaced by the checkpoint's, so the result would be the checkpoint's run, not
        the one asked for (e.g. a model of another seed, which a ``transformers`` config
        does not record)."""
        saved = _saved_weights(self.directory / "model")
        params = dict(model.named_parameters())
        if saved.keys() >= params.keys() and all(
            torch.equal(saved[name], param.detach().cpu()) for name, param in params.items()
        ):
            return
        raise ValueError(
            f"{self.directory} was written by a run that started from other weights: the "
            "model passed is neither that run's freshly built model nor its checkpoint's "
            "(e.g. a model of another seed), and resuming would replace its weights by the "
            f"other run's; pass the run's freshly built model, or {_START_OVER}"
        )

    def describe(self) -> str:
        if self.step is None:
            return f"no checkpoint had been written to {self.directory} yet"
        return f"the last good checkpoint ({self.directory}, step {self.step}) is kept"

    def load(self, model, optimizer, identity: dict[str, Any]) -> Optional[dict]:
        """The saved trainer state (model and optimizer restored in place), or ``None``
        if there is no checkpoint; an interrupted save is recovered first. The run's
        ``identity`` (its settings, model and vocabulary) must equal the saved one, checked
        before anything is restored, and every file must be as saved (its size and SHA-256
        in the completion marker; `CheckpointIntegrityError` otherwise)."""
        with reading(self.directory):
            # each save replaces the last, so there is no earlier checkpoint to fall back to
            verify_saved_files(
                self.directory,
                remedy="no earlier checkpoint is kept (each checkpoint replaces the previous "
                f"one): restore {self.directory} from a backup, or {_START_OVER}",
            )
            if not (self.directory / "trainer_state.json").exists():
                return None
            state = _read_saved(
                self.directory / "trainer_state.json",
                lambda path: json.loads(path.read_text(encoding="utf-8")),
            )
            if "vocabulary" not in state:
                # written before the vocabulary was part of the identity: the tokenizer
                # saved with the checkpoint's model tells it (none saved: refused below)
                state["vocabulary"] = _saved_vocabulary(self.directory / "model")
                if state["vocabulary"] is None:
                    del state["vocabulary"]
            self._require_same_run(state, identity)
            initial = state.pop("initial_weights", None)
            left_by_error = _LEFT_PART_WAY.get(model) == (initial, self.initial_weights)
            if initial is not None and initial != self.initial_weights and not left_by_error:
                self._require_run_model(model)
            self.initial_weights = initial
            load_model_state(model, self.directory / "model")
            optimizer.load_state_dict(
                _read_saved(
                    self.directory / "optimizer.pt",
                    lambda path: torch.load(path, weights_only=True),
                )
            )
        self.step = state["step"]
        return state


def _require_full_precision(model) -> None:
    """Refuse trainable bfloat16 / float16 parameters: AdamW updates them in their own
    dtype, where an update below half a step of the weight rounds away (in bfloat16 at lr
    5e-4 a norm gain of 1.0, whose step is 2**-7, never moves) and eps 1e-8 underflows to
    0 in float16 (the first update overflows). A frozen one (``requires_grad`` False) gets
    no gradient, so AdamW never updates it (nor decays it): it is accepted."""
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            precision = str(param.dtype).removeprefix("torch.")
            raise ValueError(
                f"train needs float32 or float64 parameters; {name} is {precision}: AdamW "
                f"would update it in {precision}, where updates smaller than half a step "
                "of the weight round away (bfloat16: every norm gain stays at 1.0 at lr "
                "5e-4) and eps 1e-8 underflows (float16: the first update overflows). "
                "Train in float32 (model.float()) and convert the trained model afterwards"
            )


def _json_values(name: str, value: Any) -> Any:
    """``value`` as the JSON it is saved as (tuples become lists, NumPy scalars Python
    numbers, keys strings, a torch dtype or device its name, e.g. ``"torch.float64"``), so
    that a resumed run's value equals the one read back from its checkpoint; what JSON
    cannot hold (or NaN, never equal to itself) is refused before any work, not at the
    first checkpoint."""

    def default(item: Any) -> Any:
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, (torch.dtype, torch.device)):  # e.g. train_condition(shape=)
            return str(item)
        raise TypeError(f"{type(item).__name__} {item!r} is not a JSON value")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must hold JSON values (dicts, lists, strings, finite numbers, bools, "
            f"None; NumPy scalars are converted), since it is saved with the run: {error}"
        ) from None


def _as_list(name: str, tasks: Any) -> list:
    """One task as ``[task]``, else ``tasks`` read once as a list (`as_items`)."""
    return [tasks] if isinstance(tasks, Task) else as_items(name, tasks)


# the spawn key of the per-step torch seeds (`_step_seed`); the task streams use their own
_STEP_RNG_STREAM = 0x5EED5


def _step_seed(data_seed: int, step: int) -> int:
    """The seed of torch's global random generators during optimiser step ``step``
    (0-based): a function of ``data_seed`` and ``step`` only, like the step's batch, so
    that randomness inside a step (dropout) is the same in a resumed run."""
    sequence = np.random.SeedSequence(data_seed, spawn_key=(_STEP_RNG_STREAM, step))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


@contextmanager
def _own_rng(model) -> Iterator[Callable[[int], None]]:
    """Give the block torch's global generators (CPU and the CUDA devices the model is
    on) and restore the caller's states afterwards (`torch.random.fork_rng`). Yields the
    function that seeds exactly those generators (``torch.manual_seed`` would also reseed
    CUDA devices the model is not on, whose state the fork does not restore)."""
    devices = sorted(
        {
            param.device.index if param.device.index is not None else torch.cuda.current_device()
            for param in model.parameters()
            if param.device.type == "cuda"
        }
    )

    def seed(value: int) -> None:
        torch.default_generator.manual_seed(value)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)

    with torch.random.fork_rng(devices=devices):
        yield seed


# the signals that stop a training run with a checkpoint: Ctrl-C (SIGINT; Python's
# default handler raises KeyboardInterrupt) and SIGTERM (`timeout`, docker stop, SLURM
# preemption) where the caller's handler raises a KeyboardInterrupt for it, as the command
# line's does (`hooked_attnres.cli`); a library call installs no handler of its own
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _interrupts_deferred(deliver: bool = True, writing: Optional[str] = None) -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) and SIGTERM inside the block and deliver them right
    after: the optimizer update and the step's bookkeeping are then never cut apart, so
    the checkpoint written on `KeyboardInterrupt` always has as many updates as steps.
    Only a signal whose handler is a Python function is held back (Ctrl-C's default,
    `signal.default_int_handler`; the command line's SIGTERM handler): the caller's
    handler gets it afterwards (``signal.raise_signal``), in the order received, the first
    to raise ending the delivery (the first signal decides: SIGINT then SIGTERM raises
    `KeyboardInterrupt`, exit code 130 on the command line); ``deliver=False`` drops them
    instead (the checkpoint written because of an interrupt: the run is stopping already,
    and a second Ctrl-C or SIGTERM aborted that write until audit 197). A signal
    left to the system (SIGTERM's default: the process ends at once), or ignored, is not
    touched; outside the main thread, where Python handles no signal, nothing is changed.
    ``writing``: what the block writes (e.g. "the final checkpoint"), for a long block: the
    first signal held is answered on stderr (`_held_signal_notice`: the run stops once that
    is written, and how to end it at once), since a Ctrl-C that seems to do nothing is
    pressed again or followed by ``kill -9`` (review 207: it said nothing).
    A holding handler left in place after the block (an interrupt raised while the handlers
    are put back: a Ctrl-C right after SIGINT's) passes each signal on to the caller's
    handler; until review 194 it kept them for good (SIGTERM never reached the caller)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: cast(Callable[[int, Any], Any], handler)
        for signum in _STOP_SIGNALS
        if callable(handler := signal.getsignal(signum))
    }
    received: list[int] = []
    over = False  # the block is done: the signals the holder still gets are passed on

    def hold(signum: int, frame: Any) -> Any:
        if over:
            return previous[signal.Signals(signum)](signum, frame)
        if writing is not None and not received:
            _held_signal_notice(signum, writing)
        received.append(signum)
        return None

    for held in previous:
        signal.signal(held, hold)
    try:
        yield
    finally:
        over = True
        for held, handler in previous.items():
            signal.signal(held, handler)
        for arrived in dict.fromkeys(received) if deliver else ():
            signal.raise_signal(arrived)  # the first to raise ends the delivery


def _held_signal_notice(signum: int, writing: str) -> None:
    """Tell the user on stderr that a stop signal is held while ``writing`` is written
    (`_interrupts_deferred`); a failing stderr never stops the write."""
    try:
        print(
            f"hooked_attnres: {signal.Signals(signum).name} received while {writing} is "
            "written: the run stops once it is written (Ctrl-\\ or kill -9 ends it at once, "
            "keeping the checkpoint before)",
            file=sys.stderr,
            flush=True,
        )
    except (OSError, ValueError, RuntimeError):  # closed, full or reentered stderr
        pass


def _same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are equal, a NaN equal to a NaN (as JSON text, NaN is)."""
    return bool(a == b) or json.dumps(a, sort_keys=True, default=str) == json.dumps(
        b, sort_keys=True, default=str
    )


def _first_difference(saved: Any, now: Any, path: str = "") -> Optional[tuple[str, Any, Any]]:
    """``(field, saved value, value now)`` where two JSON values first differ, descending
    into dicts and into lists of one length (``field`` dotted, ``[i]`` for a list's item,
    ``""`` for the values themselves; a NaN equals a NaN: `_same_json`); ``None`` if
    equal."""
    if _same_json(saved, now):
        return None
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now), key=str):
            if not _same_json(saved.get(key), now.get(key)):
                field = f"{path}.{key}" if path else str(key)
                return _first_difference(saved.get(key), now.get(key), field)
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for index, (item, other) in enumerate(zip(saved, now, strict=True)):
            if not _same_json(item, other):  # "history[1].loss", not two whole histories
                return _first_difference(item, other, f"{path}[{index}]")
    return path, saved, now


def _vocabulary_identity(vocab: dict[str, int]) -> str:
    """SHA-256 of a tokenizer's vocabulary (every token and its id): two vocabularies of
    one size give the same model shapes and task reprs, but other token ids for every
    prompt, so a run resumed with another one would silently train on other prompts."""
    items = sorted((str(token), int(index)) for token, index in vocab.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _saved_vocabulary(directory: Path) -> Optional[str]:
    """`_vocabulary_identity` of the tokenizer saved in ``directory`` (``None``: none)."""
    from hooked_attnres.loading.io import load_tokenizer

    tokenizer = load_tokenizer(directory)
    return None if tokenizer is None else _vocabulary_identity(tokenizer.get_vocab())


def _model_identity(model) -> dict[str, Any]:
    """What a resumed run's model must share with the checkpoint's: its class, its
    configuration (not where it runs), its parameters' dtypes and which of them are
    frozen, as JSON values (a model of another layout, depth, number of blocks or dtype
    would load the same tensors; one with another parameter frozen would update it, or
    not, from the resumed step on). ``frozen`` is present only when some parameter is, so
    that the checkpoints of runs that train every parameter keep resuming."""
    if isinstance(model, HookedAttnRes):
        config = model.cfg.to_dict()
        config.pop("device", None)
    else:  # a transformers model: its config, less what names the files and the version
        config = model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            config.pop(volatile, None)
    identity = {
        "class": type(model).__name__,
        "config": config,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        identity["frozen"] = frozen
    return json.loads(json.dumps(identity, default=str))


def train(
    model,
    tasks: Union[Task, Sequence[Task]],
    config: TrainConfig,
    out_dir: Union[str, Path],
    tokenizer=None,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    description: Optional[dict] = None,
    eval_tasks: Union[Task, Sequence[Task], None] = None,
) -> TrainResult:
    """Train ``model`` in place on ``tasks`` and write checkpoints to ``out_dir``.

    Args:
        model: a `HookedAttnRes` or a ``transformers`` causal LM, freshly initialised,
            with float32 or float64 parameters (trainable bfloat16 / float16 ones are
            refused; frozen ones, ``requires_grad`` False, are never updated).
        tasks: one task, or several (step ``s`` draws from ``tasks[s % len(tasks)]``).
        config: a `TrainConfig`.
        out_dir: output directory (see the module docstring).
        tokenizer: saved with the model (default: ``model.tokenizer`` for HookedAttnRes).
        resume: continue from ``out_dir/checkpoint`` if it exists (the configuration must
            match, and ``model`` must be the run's freshly built model or the same object
            continuing it, also after an error; the result equals an uninterrupted run).
            An object an error left part-way through a run with no checkpoint to return
            to is refused (`ValueError`; also with ``resume=False``): build it afresh. So is
            one stopped part-way (``stop_after``, Ctrl-C) started over (``resume=False``
            or another ``out_dir``): resume it, or build it afresh.
        progress: show a tqdm bar.
        stop_after: stop (with a checkpoint) after this many steps in this call, without
            finishing; used to test and demonstrate resumption.
        description: extra JSON-able facts stored with the checkpoint and metrics (e.g.
            the condition and model seed), taken as their JSON before any work (a tuple
            is a list, a NumPy scalar a number, a torch dtype its name); must match on
            resume.
        eval_tasks: tasks whose test split measures accuracy (default: ``tasks``); e.g.
            train on multi-query prompts and evaluate on the single-query probe. A task
            whose test split is not held out from a training task's (`Task.leaks_into`:
            a shorter `InductionCopy`) is refused.

    Returns:
        A `TrainResult`; ``final_accuracy`` is the held-out accuracy per task of the last
        step taken, ``{}`` if that step was no evaluation step (a ``stop_after`` call can
        stop between evaluations; its earlier ones are in ``history``); ``model_dir`` is
        ``out_dir/model``, or ``None`` if this call stopped before the run's end
        (``stop_after``), which writes no final model and no ``metrics.json`` (one there
        is an earlier finished run's, as the model is).
    """
    # each list read once: a generator read a second time is empty (eval_tasks was read
    # three times, so a generator's tasks were never evaluated: final_accuracy {})
    tasks = _as_list("tasks", tasks)
    if not tasks:
        raise ValueError("train needs at least one task")
    if eval_tasks is not None:
        eval_tasks = _as_list("eval_tasks", eval_tasks)
    for name, listed in (("tasks", tasks), ("eval_tasks", eval_tasks or [])):
        for task in listed:  # by the argument's own name
            if not isinstance(task, Task):
                raise TypeError(f"{name} must be Task objects, got {type(task).__name__}")
    for held_out in [] if eval_tasks is None else eval_tasks:
        for trained in tasks:  # a held-out answer trained on would inflate the accuracy
            leak = held_out.leaks_into(trained)
            if leak is not None:
                raise ValueError(f"eval_tasks: {leak}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    # checked again: a field set after the config was built was never checked (e.g.
    # ``cfg.steps = 3`` on the study's config kept its 100 warm-up steps, so the rate never
    # left the warm-up; ``cfg.grad_clip = 0`` zeroed every update)
    config = dataclasses.replace(config)
    description = _json_values("description", {} if description is None else description)
    stop_after = require_integer("stop_after", stop_after, 1, optional=True)
    # read by truthiness before: resume="no" resumed, progress="False" showed the bar
    resume = require_bool("resume", resume)
    progress = require_bool("progress", progress)
    require_tokenizer("tokenizer", tokenizer)
    _require_full_precision(model)
    out_dir = Path(out_dir)
    check_run_folder(out_dir)  # before any work
    model_dir = out_dir / "model"
    model_overwrite = _check_output(model_dir)
    checkpoint = _Checkpoint(out_dir, progress)
    attached = getattr(model, "tokenizer", None)
    if tokenizer is None:
        tokenizer = attached
    if tokenizer is None:
        raise ValueError("train needs a tokenizer (pass tokenizer= or attach one to the model)")
    vocab = tokenizer.get_vocab()
    if isinstance(model, HookedAttnRes) and attached is not None and attached is not tokenizer:
        if attached.get_vocab() != vocab:
            # the model is saved with its attached tokenizer: its ids would not be the ids
            # it was trained on, and every later prompt would be another one
            raise ValueError(
                "the model's attached tokenizer and tokenizer= have different vocabularies: "
                "the run would train on tokenizer='s ids and save the model with the attached "
                "one; attach the tokenizer you train with (model.tokenizer = tokenizer) or "
                "pass no tokenizer="
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    # one run at a time per out_dir (two would pair one's model with the other's metrics)
    with (
        exclusive_job(out_dir, "training run"),
        thread_count(config.threads),
        _own_rng(model) as seed_step,
    ):
        eval_tasks = tasks if eval_tasks is None else eval_tasks
        eval_batches = {
            t.name: t.sample(config.eval_size, config.data_seed, "test", vocab) for t in eval_tasks
        }
        if len(eval_batches) != len(eval_tasks):
            raise ValueError("evaluation tasks need distinct names (task.name)")
        if not eval_batches and config.stop_accuracy is not None:
            raise ValueError("stop_accuracy needs at least one evaluation task (eval_tasks=[])")
        identity = {
            "train_config": config.to_dict(),
            "tasks": [repr(t) for t in tasks],
            "eval_tasks": [repr(t) for t in eval_tasks],
            "description": description,
            "model": _model_identity(model),
            "vocabulary": _vocabulary_identity(vocab),
            # the thread count (config.threads, set above, or the caller's) and versions
            "environment": numerics_environment(),
        }

        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        step, history, seconds = 0, [], 0.0
        # the weights this run starts from (a resumed run must start from its own)
        checkpoint.initial_weights = _weights_identity(model)
        saved = checkpoint.load(model, optimizer, identity) if resume else None
        if saved is not None:
            step, history, seconds = saved["step"], saved["history"], saved["seconds"]
        else:  # step 0, from the model's weights: they must be the run's initial ones
            _require_not_left_part_way(
                model,
                checkpoint.initial_weights,
                f"{checkpoint.directory} holds no checkpoint to resume"
                if resume
                else "resume=False starts over",
            )
        stopped = bool(saved.get("stopped_early", False)) if saved is not None else False

        def evaluate_into(record: dict[str, Any]) -> bool:
            """Add the held-out accuracy to ``record``; whether the run stops there."""
            record["accuracy"] = evaluate(model, eval_batches)
            return (
                config.stop_accuracy is not None
                and record["step"] < config.steps
                # every task (``min`` with a NaN accuracy depended on the tasks' order)
                and all(v >= config.stop_accuracy for v in record["accuracy"].values())
            )

        def evaluation_due(at: int) -> bool:
            return at % config.eval_every == 0 or at == config.steps

        if history and history[-1]["step"] == step and "accuracy" not in history[-1]:
            if evaluation_due(step):  # interrupted during this step's evaluation: finish it
                stopped = evaluate_into(history[-1])

        def state() -> dict:
            out = {**identity, "step": step, "history": history, "seconds": seconds}
            if config.stop_accuracy is not None:
                out["stopped_early"] = stopped
            return out

        if saved is None and model_dir.is_dir() and any(model_dir.iterdir()):
            # started over beside an earlier finished run's model (and metrics.json), which
            # only this run's end replaces: its checkpoint says from now on that the folder
            # holds another run (`checkpoint_run_differs`), also if it is killed before its
            # first periodic checkpoint (audit 197: the earlier run's checkpoint was left,
            # and the study read the earlier model as this run's)
            checkpoint.save(model, optimizer, state(), tokenizer)

        model.train()
        last_loss = float("nan")
        bar = tqdm(
            total=config.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True
        )
        started, steps_this_call = time.perf_counter(), 0
        consistent, updating = True, step  # whether state() matches the weights
        try:
            while (
                step < config.steps
                and not stopped
                and (stop_after is None or steps_this_call < stop_after)
            ):
                task = tasks[step % len(tasks)]
                batch = task.sample(
                    config.batch_size, config.data_seed, "train", vocab, stream=step
                )
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step)
                seed_step(_step_seed(config.data_seed, step))  # e.g. dropout masks
                loss = batch.loss(model_logits(model, batch.tokens))
                last_loss = loss.item()
                if not math.isfinite(last_loss):
                    if step > 0:  # the weights themselves, if the last update broke them
                        _check_finite(
                            model,
                            step,
                            f"its update made them so (the loss before it was finite): "
                            f"training stopped; {checkpoint.describe()} and no final model "
                            "was written. Lower lr or clip the gradients",
                        )
                    raise TrainingDivergedError(
                        f"the training loss is {last_loss} at step {step + 1} (lr "
                        f"{config.lr_at(step):.3g}, grad_clip {config.grad_clip}): training "
                        f"stopped; {checkpoint.describe()} and no final model was written. Lower "
                        "lr or clip the gradients",
                        step + 1,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                # the update and its bookkeeping are one unit: Ctrl-C waits until both are
                # done, and any other interrupt in between leaves the last checkpoint as is
                consistent, updating = False, step + 1
                with _interrupts_deferred():
                    optimizer.step()
                    step += 1
                    steps_this_call += 1
                    # the step's record goes into the history at once: a checkpoint written
                    # on Ctrl-C during the evaluation keeps it, and resuming finishes it
                    record: dict[str, Any] = {
                        "step": step,
                        "loss": last_loss,
                        "lr": config.lr_at(step - 1),
                    }
                    history.append(record)
                    consistent = True
                fault_point("train_step")  # fault injection for the crash tests (no-op otherwise)
                if evaluation_due(step):
                    stopped = evaluate_into(record)
                    bar.set_postfix(
                        loss=f"{last_loss:.3f}",
                        acc=" ".join(f"{v:.3f}" for v in record["accuracy"].values()),
                    )
                elif step % 10 == 0:
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                bar.update(1)
                if (
                    config.checkpoint_every
                    and step % config.checkpoint_every == 0
                    and step < config.steps
                    and not stopped
                ):
                    seconds_now = seconds + time.perf_counter() - started
                    checkpoint.save(
                        model, optimizer, {**state(), "seconds": seconds_now}, tokenizer
                    )
        except KeyboardInterrupt:
            seconds += time.perf_counter() - started
            bar.close()
            if consistent:
                try:
                    # written whole: a second Ctrl-C or SIGTERM (pressed again, a scheduler's
                    # after Ctrl-C) is dropped, the first decides how the run ends; it aborted
                    # this write before audit 197, losing the steps since the last checkpoint
                    writing = "the interrupted run's checkpoint"
                    with _interrupts_deferred(deliver=False, writing=writing):
                        checkpoint.save(model, optimizer, state(), tokenizer)
                finally:  # part-way through the run, at its checkpoint or past it
                    _note_left_part_way(model, checkpoint.initial_weights)
            else:  # raised inside an optimizer update (not by Ctrl-C, which waits)
                _note_left_part_way(model, checkpoint.initial_weights)
                warnings.warn(
                    f"interrupted inside the optimizer update of step {updating}: the weights "
                    f"may be partly updated, so no checkpoint was written; "
                    f"{checkpoint.describe()}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            raise
        except BaseException:
            bar.close()
            _note_left_part_way(model, checkpoint.initial_weights)
            raise
        bar.close()
        seconds += time.perf_counter() - started
        finished = step >= config.steps or stopped
        try:
            # Ctrl-C or SIGTERM waits for the final checkpoint (audit 197: it aborted the
            # write, and the steps since the last periodic checkpoint were trained again)
            with _interrupts_deferred(writing="the final checkpoint"):
                checkpoint.save(model, optimizer, state(), tokenizer)
        except BaseException:  # e.g. a full disk: the model is past its last checkpoint
            _note_left_part_way(model, checkpoint.initial_weights)
            raise
        if not finished:  # stop_after: at its checkpoint, part-way through the run
            _note_left_part_way(model, checkpoint.initial_weights)
        final = history[-1].get("accuracy", {}) if history else {}
        if finished:
            try:
                model.eval()
                _check_finite(model, step, "the final model is not written")
                # the model and metrics.json are two writes: an earlier run's metrics go
                # first, so that a crash between them never pairs this model with another
                # run's history and accuracy (e.g. train(resume=False) over a finished run;
                # the resumed run writes both)
                remove_file(out_dir / "metrics.json")
                with atomic_directory(model_dir, overwrite=model_overwrite) as tmp:
                    save_model(model, tmp, tokenizer, progress)
                metrics = {**state(), "final_accuracy": final}
                write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            except BaseException:  # its final checkpoint is written: resuming finishes it
                _note_left_part_way(model, checkpoint.initial_weights)
                raise
        return TrainResult(
            out_dir, model_dir if finished else None, step, final, seconds, history, stopped
        )
