"""hooked-attnres: train the study's conditions, run the study, describe a checkpoint.

    hooked-attnres train --condition hard_cumulative_L8 --seeds 0 1 2 --out runs
    hooked-attnres study [--checkpoints runs] --out study_out
    hooked-attnres info CHECKPOINT_DIR
    hooked-attnres list                      # every condition and its shipped seeds

``train`` writes ``OUT/{condition}_seed{seed}/`` and resumes an interrupted run in place.
This module imports nothing heavy until a command runs, so ``--help`` answers at once.
Errors print one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from hooked_attnres.__main__ import PROG, Terminated, interrupted
from hooked_attnres._study_limits import (
    MAX_BOOTSTRAP,
    MAX_PROBE_PROMPTS,
    MAX_SEED,
    MAX_THREADS,
    WHY_MAX_BOOTSTRAP,
    WHY_MAX_PROBE_PROMPTS,
    WHY_MAX_SEED,
    WHY_MAX_THREADS,
)

if TYPE_CHECKING:  # torch, imported when a command needs it
    from hooked_attnres.training.trainer import TrainingDivergedError


class CommandError(Exception):
    """A usage problem found while running a command (printed as one line)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block; the handler found is put back after.
    The command line's only: the library installs no handler of its own. Outside the main
    thread, where the handler was set outside Python (it could not be put back), or where
    SIGTERM is ignored (``trap '' TERM``: it stays ignored, as Python leaves an ignored
    SIGINT to the system; until review 194 it ended the command with 143), nothing is
    changed."""
    previous = signal.getsignal(signal.SIGTERM)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is None
        or previous == signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_threads() -> int:
    """Threads for torch: ``OMP_NUM_THREADS`` if it is set to a count (>= 1), else the
    cores this process may use, minus those the machine's load already occupies (at least
    1). torch's own default takes every core, which on a busy machine makes each operation
    wait for the slowest thread (10-100x slower)."""
    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    if asked.isascii() and asked.isdigit() and int(asked) >= 1:
        return int(asked)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, round(cores - load)))


def _integer_at_least(minimum: int, maximum: Optional[int] = None, why_maximum: str = ""):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``, if given; its reason
    ``why_maximum``), refused at parse time, before any work."""

    def parse(text: str) -> int:
        # one message for every bad value, naming the accepted range (argparse prefixes
        # the flag): "argument --steps: must be an integer >= 1, got '1.5'"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer <= {maximum} ({why_maximum}), got {value}"
            )
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its message
    return parse


POSITIVE = _integer_at_least(1)
NON_NEGATIVE = _integer_at_least(0)
SEED = _integer_at_least(0, MAX_SEED, WHY_MAX_SEED)  # a model seed the study holds


def _condition_name(text: str) -> str:
    """An argparse type: a condition name, ``both`` or ``grid`` (`_conditions` expands
    them), refused at parse time naming the option and every accepted name (audit 169: a
    wrong name was refused after torch was loaded, exit code 1, naming neither the option
    nor 'both' and 'grid'). Reads the light table of condition names (no torch: until
    audit 198 it loaded torch, about 5 s, before a wrong name was refused)."""
    from hooked_attnres._validation import require_choice
    from hooked_attnres.study.recipes import CONDITIONS

    try:
        return require_choice(
            "NAME", text, ("both", "grid", *CONDITIONS), why="`hooked-attnres list` describes them"
        )
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: Sequence[str], what: str, takes: type) -> dict:
    """``--{what} key=value ...`` as keyword arguments of the dataclass ``takes`` (a key
    it has no field for is refused naming those it has: the dataclass said
    "TrainConfig.__init__() got an unexpected keyword argument", a Python call). A value
    is read as JSON (a number, ``null``, a list), or kept as the text given where it is
    not JSON or its field is text (a ``str`` field: ``name=5`` named the task by the
    integer 5). A text field takes all the text after ``=``, quotes included
    (``name="probe"`` is the name ``"probe"``, with its quotes: the text is not read as
    JSON, docs/training.md)."""
    import dataclasses
    import typing

    known = [f.name for f in dataclasses.fields(takes) if f.init]
    text = {key for key, kind in typing.get_type_hints(takes).items() if kind is str}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise CommandError(f"--{what} takes key=value pairs, got {pair!r}")
        key, value = pair.split("=", 1)
        if not key.strip():
            raise CommandError(f"--{what} takes key=value pairs, got {pair!r} (no key)")
        key = key.replace("-", "_")
        if key not in known:
            raise CommandError(
                f"--{what} {pair}: {takes.__name__} has no setting {key!r}; --{what} takes "
                f"{', '.join(known)}"
            )
        if key in out:  # the last one would silently win
            raise CommandError(f"--{what} gives {key!r} twice; give it once")
        out[key] = value if key in text else _parse_value(value)
    return out


def _conditions(names: Sequence[str]) -> list[str]:
    from hooked_attnres.study import CONDITIONS, get_condition

    out: list[str] = []
    for name in names:
        if name == "both":
            out += ["attnres", "vanilla"]
        elif name == "grid":
            out += [c for c in CONDITIONS if not get_condition(c).legacy]
        else:
            get_condition(name)
            out.append(name)
    return list(dict.fromkeys(out))


def cmd_list(args: argparse.Namespace) -> int:
    # the light recipes and checkpoint folders: no torch (audit 198: `list` took about 5 s)
    from hooked_attnres.study.checkpoints import available
    from hooked_attnres.study.recipes import RECIPES

    shipped = available()
    print(
        f"{'condition':24s} {'kind':8s} {'layout':11s} {'layers':>6s} {'task':10s} {'steps':>6s}"
        "  shipped seeds"
    )
    for name, c in RECIPES.items():
        seeds = " ".join(map(str, shipped.get(name, []))) or "-"
        print(
            f"{name:24s} {c.kind:8s} {str(c.layout or '-'):11s} {c.n_layers:6d} {c.task:10s} "
            f"{c.steps:6d}  {seeds}"
        )
    return 0


def _checkpoint_version(checkpoint: Path) -> tuple[bool, object]:
    """Whether ``checkpoint`` exists and its marker's sequence, which every save raises: the
    same before and after a run, the run wrote no checkpoint."""
    from hooked_attnres._atomic import read_marker

    return checkpoint.is_dir(), (read_marker(checkpoint) or {}).get("sequence")


def cmd_train(args: argparse.Namespace) -> int:
    from hooked_attnres._atomic import (
        check_outside_package,
        other_save,
        updating,
        write_text_atomic,
    )
    from hooked_attnres._validation import is_integer, require_selection
    from hooked_attnres.study import (
        get_condition,
        run_dir,
        study_task,
        study_train_config,
        train_condition,
    )
    from hooked_attnres.study.checkpoints import study_command
    from hooked_attnres.study.recipes import BASE_STEPS, BASE_WARMUP
    from hooked_attnres.tasks import KeyValueRetrieval
    from hooked_attnres.training import TrainConfig
    from hooked_attnres.training.trainer import (
        TrainingDivergedError,
        _interrupts_deferred,
        check_run_folder,
    )

    conditions = _conditions(args.condition)
    # a seed given twice would train (or, resuming, rewrite) the same run twice and list it
    # twice in the summary
    require_selection("--seeds", args.seeds, why="nothing would be trained")
    check_outside_package(args.out, name="--out")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(
            f"--out {args.out} is a file; training writes one folder per run into the "
            "--out folder: choose a folder (new or holding earlier runs)"
        )
    saved = other_save(args.out)
    if saved is not None:  # a model, a study, a run's checkpoint (audit 126)
        raise CommandError(
            f"refusing to train into --out {args.out}: it is not a folder of runs but another "
            f"save of this library ({saved}); choose another "
            "--out (new or holding earlier runs)"
        )
    runs = [(name, n) for n in args.seeds for name in conditions]  # in the order trained
    for condition, seed in runs:  # every run's folder before the first run trains
        check_run_folder(run_dir(args.out, condition, seed))
    custom = bool(args.set or args.task_arg or args.steps is not None)
    kwargs: dict = {}
    if custom:
        fixed = [c for c in conditions if not get_condition(c).legacy]
        if fixed:
            verb = "is a fixed recipe" if len(fixed) == 1 else "are fixed recipes"
            raise CommandError(
                f"{', '.join(fixed)} {verb}; --steps / --set / --task-arg vary only 'attnres' "
                "and 'vanilla'"
            )
        values = _key_values(args.set, "set", TrainConfig)
        if args.steps is not None:
            if "steps" in values and values["steps"] != args.steps:
                raise CommandError(
                    f"--steps {args.steps} and --set steps={values['steps']} disagree; give one"
                )
            values["steps"] = args.steps
        if "steps" in values and is_integer(values["steps"]) and values["steps"] > 0:
            # however the steps are given, the warm-up keeps its share of the study run
            # (BASE_WARMUP of BASE_STEPS) unless it is set too
            values.setdefault("warmup_steps", round(BASE_WARMUP * values["steps"] / BASE_STEPS))
        kwargs = dict(
            config=study_train_config(**values),
            task=study_task(**_key_values(args.task_arg, "task-arg", KeyValueRetrieval)),
        )
    if args.threads is not None:
        _check_training_threads(args.threads, conditions, kwargs.get("config"))
    summary = Path(args.out) / TRAIN_SUMMARY
    _earlier_summary(summary)  # refused before any run trains, not after the first
    results: list[dict] = []
    # what each run needs is listed however such a command ends once a run has started
    # (audit 218: Ctrl-C or an error of the machine; audit 226: also a refusal, a
    # divergence, an error of a later run or of the summary's write)
    listed = args.no_resume and len(runs) > 1
    index, stage = 0, "not started"  # the run the command is at, and how far it got
    try:
        for index in range(len(runs)):  # `index` read after the loop, in the handler
            condition, seed = runs[index]
            stage = "not started"
            out_dir = run_dir(args.out, condition, seed)
            print(f"[{PROG}] training {condition} seed {seed} -> {out_dir}", flush=True)
            checkpoint = out_dir / "checkpoint"
            # one still there after a stop is an earlier run's, which --no-resume does not
            # resume
            before = _checkpoint_version(checkpoint)
            stage = "training"
            try:
                result = train_condition(
                    condition,
                    seed,
                    out_dir,
                    progress=not args.no_progress,
                    resume=not args.no_resume,
                    **kwargs,
                )
            # Ctrl-C: the trainer wrote a checkpoint on its way out; an error of the machine
            # (a full disk, out of memory; not a refusal, FileExistsError): the last one is
            # kept, and the run resumes from it once the cause is fixed (audit 150: the
            # command said only the error)
            except (KeyboardInterrupt, OSError, MemoryError) as error:
                # a refusal is no stop; several runs started over are listed below
                if not isinstance(error, FileExistsError) and not listed and checkpoint.is_dir():
                    # its own checkpoint is kept unless it was started over (--no-resume)
                    # and stopped before its first one (e.g. a full disk while its step-0
                    # checkpoint was written): then the folder is as it was, and resuming
                    # would resume the earlier run, refused for other settings (review 207)
                    own = not args.no_resume or _checkpoint_version(checkpoint) != before
                    cause = _fix_first(error)
                    if not args.no_resume:  # it and the runs after it, each resumed
                        commands = _train_commands(args, runs[index:], resume=True)
                        rest = " it and finish this command's runs" if index + 1 < len(runs) else ""
                        again = f": {cause}run {_quoted(commands)} to resume{rest}"
                    elif own:  # the command itself, not "without --no-resume" (audit 226)
                        command = _quoted(_train_commands(args, [runs[index]], resume=True))
                        again = f": {cause}run {command} to resume"
                    else:
                        again = f"; {cause}run the same command again to start it over"
                    print(
                        f"[{PROG}] {_stopped_run(condition, seed, out_dir, own)}{again}",
                        file=sys.stderr,
                    )
                raise
            stage = "unlisted"  # finished, not yet in the summary
            accuracy = ", ".join(f"{k} {v:.1%}" for k, v in result.final_accuracy.items())
            results.append(
                {
                    "condition": condition,
                    "seed": seed,
                    "out_dir": str(out_dir),
                    "accuracy": result.final_accuracy,
                    "seconds": round(result.seconds, 1),
                }
            )
            # after every run, so that Ctrl-C or a crash later keeps the finished ones; runs
            # of earlier commands into the same folder stay listed, and so do those another
            # command running at the same time listed meanwhile (read again, under the
            # lock); before the line that reports the run, which fails if the reader of
            # stdout has closed it (`train | head -1`: the finished run went unlisted until
            # review 180)
            done = {(row["condition"], row["seed"]) for row in results}
            with updating(summary):
                earlier = _earlier_summary(summary)
                kept = [r for r in earlier if (r.get("condition"), r.get("seed")) not in done]
                write_text_atomic(summary, json.dumps(kept + results, indent=2) + "\n")
                stage = "finished"
            print(
                f"[{PROG}] {condition} seed {seed}: held-out accuracy {accuracy} in "
                f"{result.seconds:.0f} s",
                flush=True,
            )
    except (Exception, KeyboardInterrupt) as error:  # reported by `main`, after the list
        ending: RunEnding = "not started"
        if stage == "finished":  # e.g. its line into a closed pipe: the next is not started
            index += 1
        elif stage == "unlisted":
            ending = "unlisted"
        elif stage == "training":
            if isinstance(error, TrainingDivergedError):
                ending = "diverged"
            else:  # its own checkpoint, or the folder as it was (review 207)
                ending = "kept" if _checkpoint_version(checkpoint) != before else "stopped"
        if listed and (ending != "not started" or 0 < index < len(runs)):
            # whole: a Ctrl-C or SIGTERM while it is printed (pressed again while the
            # command ends) is dropped, not raised in its place, which cut the list and
            # replaced the error (review 231)
            with _interrupts_deferred(deliver=False):
                _print_how_to_finish(args, runs, index, ending, error)
        elif ending == "diverged":  # one run, or several resumed: said only the error
            assert isinstance(error, TrainingDivergedError)
            condition, seed = runs[index]
            others = _train_commands(args, runs[index + 1 :], resume=True)
            after = (
                f"; to finish this command's other runs, run {_quoted(others)}" if others else ""
            )
            print(f"[{PROG}] {_diverged_run(condition, seed, error)}{after}", file=sys.stderr)
        raise
    print(f"\n{'condition':24s} {'seed':>4s} {'accuracy':>9s} {'seconds':>8s}  model")
    for row in results:
        final = float(next(iter(row["accuracy"].values()), float("nan")))
        print(
            f"{row['condition']:24s} {row['seed']:4d} {final:9.1%} {row['seconds']:8.0f}  "
            f"{row['out_dir']}/model"
        )
    print(f"\nsummary: {summary}; run the study on these with `{study_command(args.out)}`")
    return 0


def _stopped_run(condition: str, seed: int, out_dir: Path, kept: bool) -> str:
    """What the folder of a run ``train`` stopped holds, for its message: ``kept``, the
    run's own last checkpoint; else (started over with --no-resume and stopped before it
    wrote one) what it held before (`_held_run`)."""
    if kept:
        return (
            f"{condition} seed {seed} stopped; its last checkpoint is kept in "
            f"{out_dir / 'checkpoint'}"
        )
    return f"{condition} seed {seed} stopped before it wrote a checkpoint: {_held_run(out_dir)}"


def _held_run(out_dir: Path) -> str:
    """What a run folder ``train --no-resume`` has not yet written to holds, read from it:
    the earlier run (how far its checkpoint got, if it can be read), or nothing."""
    from hooked_attnres._atomic import backups_of
    from hooked_attnres.training.trainer import saved_progress

    checkpoint = out_dir / "checkpoint"
    if not (checkpoint.exists() or backups_of(checkpoint) or (out_dir / "model").exists()):
        return f"{out_dir} holds no run yet"
    progress = saved_progress(out_dir)
    at = f" (its checkpoint at {progress})" if progress is not None else ""
    return f"{out_dir} still holds the earlier run, as it was{at}"


# how the run a ``train --no-resume`` command of several runs ended at stands
# (`_print_how_to_finish`)
RunEnding = Literal["not started", "kept", "stopped", "diverged", "unlisted"]


def _fix_first(error: BaseException) -> str:
    """What a message's remedy says before "run ...": nothing after Ctrl-C or SIGTERM (a
    `KeyboardInterrupt`), "fix the cause and " after an error."""
    return "" if isinstance(error, KeyboardInterrupt) else "fix the cause and "


def _options(args: argparse.Namespace) -> list[str]:
    """The ``train`` command's options as given, less the runs, --out and --no-resume: for
    the commands a stopped command prints (`train_command`). Each --set / --task-arg pair
    is KEY=VALUE, so none reads as an option."""
    options = ["--steps", str(args.steps)] if args.steps is not None else []
    options += ["--set", *args.set] if args.set else []
    options += ["--task-arg", *args.task_arg] if args.task_arg else []
    options += ["--threads", str(args.threads)] if args.threads is not None else []
    options += ["--no-progress"] if args.no_progress else []
    return options


def _train_commands(
    args: argparse.Namespace, runs: Sequence[tuple[str, int]], resume: bool
) -> list[str]:
    """The ``train`` commands that train ``runs`` (``(condition, seed)``, in the order
    trained) into the --out of a ``train`` of ``args``, with its options (`_options`):
    resumed (``resume``), or started over (--no-resume). Resumed, a run whose folder holds
    a checkpoint is given the thread count it was written with (`resume_options`) if the
    command gave no --threads: the default, the free cores, changes with the machine's
    load, and a resume with another count is refused (it moves float sums; review 231:
    printed after --no-resume; review 234: also after a stop without it, which said "run
    the same command again"). One command per thread count and set of conditions, with
    the seeds that need it, in the order trained; ``[]`` for no runs."""
    from hooked_attnres.study import run_dir
    from hooked_attnres.study.checkpoints import resume_options, train_command

    options = _options(args) + ([] if resume else ["--no-resume"])
    by_seed: dict[tuple[tuple[str, ...], int], list[str]] = {}  # (threads, seed) -> conditions
    for condition, seed in runs:
        folder = run_dir(args.out, condition, seed)
        needs = resume_options(folder) if resume and args.threads is None else []
        by_seed.setdefault((tuple(needs), seed), []).append(condition)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for (threads, seed), names in by_seed.items():
        groups.setdefault((threads, tuple(names)), []).append(seed)
    return [
        train_command(names, seeds, args.out, [*options, *threads])
        for (threads, names), seeds in groups.items()
    ]


def _quoted(commands: Sequence[str]) -> str:
    """``commands`` in backquotes for a message: ```a```, or ```a`, then `b```."""
    return ", then ".join(f"`{command}`" for command in commands)


def _diverged_run(condition: str, seed: int, error: TrainingDivergedError) -> str:
    """What a run of ``condition`` and ``seed`` that diverged (``error``, a
    `TrainingDivergedError`, at its ``step``) needs, for a message: nothing ``train`` can
    do. Training is deterministic (measured, review 234: a run diverging at step 8,
    resumed from its step-6 checkpoint or started over, on 1 or 2 threads, diverged at
    step 8 again, its kept checkpoints bitwise equal), so its settings diverge again; and
    settings are fixed before results are seen (docs/study.md, the pre-registered
    criteria; docs/training.md), so one seed's settings changed after it diverged would
    make the condition's seeds runs of different settings, chosen by their results."""
    from hooked_attnres.study import get_condition

    fixed = "" if get_condition(condition).legacy else " (a new condition: its recipe is fixed)"
    return (
        f"{condition} seed {seed} diverged at step {error.step} with these settings (the error "
        "below): training is deterministic, so resumed or started over with them it diverges "
        "again at that step, and changing this seed's settings alone after seeing it diverge "
        "breaks the study's pre-registration (settings are fixed before results are seen): "
        f"report it as diverged, or train every seed of {condition} again with new settings{fixed}"
    )


def _print_how_to_finish(
    args: argparse.Namespace,
    runs: list[tuple[str, int]],
    index: int,
    ending: RunEnding,
    error: BaseException,
) -> None:
    """After ``train --no-resume`` of several ``runs`` (``(condition, seed)`` in the order
    trained) ended at ``runs[index]`` by ``error``, the runs before it finished, print to
    stderr what each run's folder holds and needs, and the commands that finish them
    (`_train_commands`; what they need first, `_fix_first`): the runs not started (and a
    stopped one without its checkpoint) started over (--no-resume); a stopped run with its
    checkpoint resumed (without --no-resume), and so a finished one the summary does not
    list yet (which writes its model again and lists it); the finished ones not again; a
    diverged one by none (`_diverged_run`: its settings diverge again), the commands then
    for "this command's other runs", with no cause to fix first (until review 234 it was
    started over in the command of the runs not started, "with settings that do not
    diverge", which that command repeated). The same command again restarted the finished
    runs, and without --no-resume it resumed, or refused, the earlier runs of the folders
    not yet started (audit 218).

    ``ending`` says how ``runs[index]`` ended: ``"not started"``; ``"kept"`` (stopped, its
    own checkpoint kept); ``"stopped"`` (stopped before its first checkpoint, the folder as
    it was: also a refusal of the run); ``"diverged"`` (`TrainingDivergedError`: resumed
    or started over, it diverges again); ``"unlisted"`` (finished, but the command ended before
    ``train_summary.json`` listed it: it may still list an earlier run of the folder).
    Every ending of such a command once a run has started prints this list (audit 226:
    only Ctrl-C and an error of the machine did)."""
    from hooked_attnres.study import run_dir
    from hooked_attnres.training.trainer import TrainingDivergedError, saved_progress

    restart: list[tuple[str, int]] = []  # the runs to start over
    commands = []
    print(f"[{PROG}] this command's runs and what each needs:", file=sys.stderr)
    for position, (condition, seed) in enumerate(runs):
        out_dir = run_dir(args.out, condition, seed)
        if position < index:
            needs = f"{condition} seed {seed} finished in this command: nothing"
        elif position == index and ending in ("kept", "unlisted"):
            if ending == "kept":
                progress = saved_progress(out_dir)
                at = f" (at {progress}, written by this command)" if progress is not None else ""
                state = f"{_stopped_run(condition, seed, out_dir, True)}{at}"
                needs = f"{state}: resume it (without --no-resume)"
            else:  # resuming a finished run writes its model again, and the command lists it
                needs = (
                    f"{condition} seed {seed} finished in this command, but "
                    f"{Path(args.out) / TRAIN_SUMMARY} does not list it (the command ended "
                    "before it was written): resume it (without --no-resume), which lists it"
                )
            commands += _train_commands(args, [(condition, seed)], resume=True)
        elif position == index and ending == "diverged":
            assert isinstance(error, TrainingDivergedError), error
            needs = _diverged_run(condition, seed, error)
        else:
            if position == index and ending == "stopped":
                state = _stopped_run(condition, seed, out_dir, False)
            else:
                state = f"{condition} seed {seed} not started: {_held_run(out_dir)}"
            needs = f"{state}; start it over (--no-resume)"
            restart.append((condition, seed))
        print(f"  {needs}", file=sys.stderr)
    # at most two commands start runs over: the rest of the stopped seed's conditions, and
    # every condition of the later seeds
    commands += _train_commands(args, restart, resume=False)
    if not commands:  # the last run diverged
        return
    whose = "other runs, " if ending == "diverged" else f"runs, {_fix_first(error)}"
    print(f"[{PROG}] to finish this command's {whose}run:", file=sys.stderr)
    for command in commands:
        print(f"  {command}", file=sys.stderr)


def _check_training_threads(threads: int, conditions: Sequence[str], config) -> None:
    """Refuse ``--threads`` where the run would not use it: the trainer sets its
    `TrainConfig.threads` inside the run, a grid condition's recipe fixes 1
    (`Condition.threads`: the order of float sums depends on it) and ``--set threads=``
    another; only a count left to the caller (``None``) is the one ``--threads`` sets."""
    from hooked_attnres.study import get_condition

    if config is not None and config.threads is not None and config.threads != threads:
        raise CommandError(
            f"--threads {threads} and --set threads={config.threads} disagree; give one"
        )
    for condition in conditions:
        fixed = get_condition(condition).threads if config is None else None
        if fixed is not None and fixed != threads:
            raise CommandError(
                f"--threads {threads} would be ignored: {condition} trains with {fixed} "
                "thread(s), part of its recipe (the order of float sums depends on it); "
                "leave --threads out"
            )


TRAIN_SUMMARY = "train_summary.json"  # in --out: the runs `train` trained there
_SUMMARY_KEYS = {"condition", "seed", "out_dir", "accuracy", "seconds"}  # of every row


def _earlier_summary(path: Path) -> list[dict]:
    """The runs an earlier ``train`` listed in ``path`` (none if it is missing).

    Raises:
        CommandError: ``path`` is not a summary this command wrote (e.g. the user's own
            file): the command would replace it (it did, silently, before audit 126).
    """
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rows = None
    if not isinstance(rows, list) or not all(
        isinstance(row, dict) and _SUMMARY_KEYS <= row.keys() for row in rows
    ):
        raise CommandError(
            f"refusing to replace {path}: it is not a summary written by `{PROG} train`, and "
            "the command writes its summary there; move it away or choose another --out"
        )
    return rows


def _unfinished_run_note(model_dir: Path) -> str:
    """A line for ``info`` when ``model_dir`` is a training run's ``model`` and the run
    folder's checkpoint and ``metrics.json`` record different runs (`checkpoint_run_differs`:
    one started over with --no-resume / ``resume=False`` and stopped or killed, so
    ``model`` and ``metrics.json`` are an earlier finished run's; or a file changed after
    its write, which it cannot always tell apart), or when either file cannot be read or
    ``trainer_state.json`` differs from its recorded SHA-256 (the `CheckpointError`); ``""``
    otherwise. The study refuses such a folder."""
    from hooked_attnres.training.trainer import RESUME_ON_COMMAND_LINE, checkpoint_run_differs

    if model_dir.name != "model":
        return ""
    from hooked_attnres.loading.io import CheckpointError
    from hooked_attnres.study.checkpoints import resume_options

    # with the thread count the checkpoint was written with: the default may be another
    threads = " ".join(resume_options(model_dir.parent))
    resume = f"{RESUME_ON_COMMAND_LINE}, with {threads}" if threads else RESUME_ON_COMMAND_LINE
    try:
        other = checkpoint_run_differs(model_dir.parent, resume=resume)
    except CheckpointError as error:  # a file unreadable or changed: what it holds is unknown
        return f"\nnote: {error}"
    except (OSError, ValueError):  # a file the OS does not let it read: the note is advice
        return ""
    return "" if other is None else f"\nnote: {other}"


def cmd_info(args: argparse.Namespace) -> int:
    from hooked_attnres import HookedAttnRes
    from hooked_attnres._atomic import reading
    from hooked_attnres.loading.io import read_config_json, verify_saved_files

    path = Path(args.checkpoint)
    # checked and loaded under one read lock (the loaders take it again), which recovers an
    # interrupted save first (the folder may be moved aside)
    with reading(path):
        if not args.no_verify:  # the loaders' remedy (verify=False) is a Python argument
            verify_saved_files(
                path,
                remedy="restore it from a backup, or save the model again; if you edited "
                "these files on purpose, pass --no-verify to describe them as they are now",
            )
        vanilla = path.is_dir() and read_config_json(path).get("model_type") == "qwen3"
        # a vanilla run's model (train --condition vanilla): from_pretrained refuses it with
        # a Python remedy (from_hf_qwen3), which the command line has no option for
        model = (
            HookedAttnRes.from_hf_qwen3(path, wrap="none", verify=False)
            if vanilla
            else HookedAttnRes.from_pretrained(path, verify=False)
        )
    if vanilla:
        cfg = model.cfg
        print(
            f"{args.checkpoint}: vanilla Qwen3 (no routers), {cfg.n_layers} layers, "
            f"d_model {cfg.d_model}, {sum(p.numel() for p in model.parameters()):,} "
            f"parameters, tokenizer {'yes' if model.tokenizer is not None else 'no'}; the "
            "study reads it through HookedAttnRes.from_hf_qwen3(path, wrap='recency') "
            "(docs/loading.md)" + _unfinished_run_note(path)
        )
        return 0
    cfg = model.cfg
    # the blocks the model has (attnres_num_blocks is unused without routers or with a
    # block per sublayer, and may exceed the count: 5 layers, 4 asked, 3 blocks)
    blocks = model.routing_layout.blocks_text()
    print(
        f"{args.checkpoint}: layout {cfg.attnres_layout}, {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, {blocks}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"tokenizer {'yes' if model.tokenizer is not None else 'no'}"
    )
    for site in model.sites():
        print(f"  {str(site):20s} {model.source_labels(site)}")
    note = _unfinished_run_note(path)
    if note:
        print(note.lstrip("\n"))
    return 0


@contextlib.contextmanager
def _few_resamples_said_once(n_bootstrap: int) -> Iterator[None]:
    """Too few bootstrap resamples for the study's 95 % intervals said once, as
    ``--bootstrap N``: the study's warning named ``n_bootstrap``, which the command line
    has not, twice per model (the mass summary's and the effects' intervals)."""
    import re
    import warnings

    from hooked_attnres.analysis.bootstrap import too_few_resamples, too_few_resamples_text
    from hooked_attnres.analysis.motifs import PREREGISTERED_CONFIDENCE as LEVEL

    with warnings.catch_warnings():
        if too_few_resamples(n_bootstrap, LEVEL):
            said = too_few_resamples_text(f"--bootstrap {n_bootstrap}", LEVEL)
            print(f"[{PROG}] warning: {said}", file=sys.stderr, flush=True)
            python = too_few_resamples_text(f"n_bootstrap={n_bootstrap}", LEVEL)
            warnings.filterwarnings("ignore", re.escape(python), RuntimeWarning)
        yield


def cmd_study(args: argparse.Namespace) -> int:
    from hooked_attnres._atomic import DirectoryBusyError
    from hooked_attnres.study import run_study
    from hooked_attnres.study.run import check_out_dir, check_study_arguments, partial_dir

    conditions = _conditions(args.conditions) if args.conditions else None
    check_out_dir(args.out, name="--out")  # run_study checks it too, naming out_dir
    arguments = {
        "out_dir": args.out,
        "checkpoints": args.checkpoints,
        "seeds": args.seeds,
        "conditions": conditions,
        "n_prompts": args.prompts,
        "n_bootstrap": args.bootstrap,
        "progress": not args.no_progress,
        "plots": True,
        "robustness": not args.no_robustness,
        "bootstrap_seed": args.bootstrap_seed,
    }
    try:
        # every argument refused before the warning about too few resamples, not after it
        check_study_arguments(**arguments)
        with _few_resamples_said_once(args.bootstrap):
            result = run_study(**arguments)
    except DirectoryBusyError:
        raise  # the kept models are the other study's, and it holds them
    except BaseException:
        kept = partial_dir(args.out)
        if kept.is_dir() and any(kept.glob("*.pkl")):
            print(
                f"[{PROG}] the models finished so far are kept in {kept}: run the same "
                "command again to resume",
                file=sys.stderr,
            )
        raise
    out = Path(args.out)
    print(
        f"[{PROG}] study of {len(result.accuracy)} model(s) in {result.seconds:.0f} s: "
        f"report {out / 'report.html'} (text: {out / 'report.md'}; tables: {out}/*.csv)"
    )
    return 0


class _Refused(argparse.Action):
    """An option a command refuses when given, with ``reason`` as argparse's error (exit
    code 2, ``argument --threads: {reason}``): one the other commands take, so that
    giving it is not answered with a bare ``unrecognized arguments``."""

    def __init__(self, *args, reason: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.reason)


class _Gathered(argparse.Action):
    """A list option whose every occurrence counts (``--seeds 0 --seeds 1`` is ``--seeds
    0 1``: argparse kept the last occurrence, silently dropping ``--set lr=1e-3`` before
    ``--set batch_size=8``), refusing one given no value with ``empty`` as argparse's error
    (exit code 2, ``argument --set: {empty}``): ``--set`` alone trained the full recipe."""

    def __init__(self, *args, empty: str = "expected at least one value", **kwargs):
        super().__init__(*args, **kwargs)
        self.empty = empty

    def __call__(self, parser, namespace, values, option_string=None):
        if not values:
            raise argparse.ArgumentError(self, self.empty)
        earlier = getattr(namespace, self.dest, None)
        first = earlier is self.default or earlier is None  # the default is replaced
        setattr(namespace, self.dest, list(values) if first else [*earlier, *values])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where they say nothing: an option whose help
    names its own default (``default: the shipped``) and a flag's or unset option's ``None``
    / ``False`` / ``[]`` (argparse appended ``(default: None)`` after ``(default: the
    shipped)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, []):
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], formatter_class=formatter
    )
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    common.add_argument(
        "--threads",
        type=_integer_at_least(1, MAX_THREADS, WHY_MAX_THREADS),
        default=None,
        help="torch threads (default: OMP_NUM_THREADS if set, else the free cores; "
        f"{default_threads()} now; more threads than free cores is slower; train refuses a "
        "count other than the one its condition's recipe or --set threads= fixes)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        formatter_class=formatter,
        parents=[common],
        help="train conditions of the study (or a variant of the original two)",
    )
    train.add_argument(
        "--condition",
        type=_condition_name,
        nargs="+",
        action=_Gathered,
        default=["both"],
        metavar="NAME",
        help="condition names (`hooked-attnres list` shows them and their shipped seeds), "
        "'both' (the original attnres and vanilla) or 'grid' (every grid condition)",
    )
    train.add_argument(
        "--seeds", type=SEED, nargs="+", action=_Gathered, default=[0], help="model seeds"
    )
    train.add_argument("--out", default="runs", help="output folder")
    train.add_argument(
        "--steps",
        type=POSITIVE,
        default=None,
        help="optimiser steps (default: the recipe's, 1200; the warm-up keeps its 100-of-1200 "
        "share unless --set warmup_steps= is given; so does --set steps=); original two only",
    )
    train.add_argument(
        "--set",
        nargs="*",
        action=_Gathered,
        empty="expected KEY=VALUE pairs, e.g. lr=1e-3; got none",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig fields, one or more, e.g. lr=1e-3 batch_size=32; original two only",
    )
    train.add_argument(
        "--task-arg",
        nargs="*",
        action=_Gathered,
        empty="expected KEY=VALUE pairs, e.g. n_pairs=8; got none",
        default=[],
        metavar="KEY=VALUE",
        help="KeyValueRetrieval settings, one or more, e.g. n_pairs=8 name=probe (a text "
        "setting keeps the text given, quotes included; numbers are read as JSON); original "
        "two only",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--no-resume", action="store_true", help="start over even if a checkpoint exists"
    )
    train.set_defaults(func=cmd_train)

    study = sub.add_parser(
        "study",
        formatter_class=formatter,
        parents=[common],
        help="routing mass vs causal effect, with the pre-registered verdicts",
    )
    study.add_argument(
        "--checkpoints",
        default=None,
        help="folder of {condition}_seed{seed}/model runs (default: the shipped)",
    )
    study.add_argument(
        "--conditions",
        type=_condition_name,
        nargs="+",
        action=_Gathered,
        default=None,
        metavar="NAME",
        help="conditions to study (default: every one with a checkpoint); 'both' and "
        "'grid' as for train",
    )
    study.add_argument(
        "--seeds",
        type=SEED,
        nargs="+",
        action=_Gathered,
        default=None,
        help="model seeds (default: every seed found)",
    )
    study.add_argument(
        "--prompts",
        type=_integer_at_least(2, MAX_PROBE_PROMPTS, WHY_MAX_PROBE_PROMPTS),
        default=256,
        help="held-out probe prompts per model",
    )
    study.add_argument(
        "--bootstrap",
        type=_integer_at_least(1, MAX_BOOTSTRAP, WHY_MAX_BOOTSTRAP),
        default=1000,
        help="bootstrap resamples",
    )
    study.add_argument(
        "--bootstrap-seed",
        type=NON_NEGATIVE,
        default=0,
        help="seed of the bootstrap's resampled prompts (default 0; recorded in run.json)",
    )
    study.add_argument(
        "--out", default="study_out", help="output folder (report.html, report.md, CSV)"
    )
    study.add_argument(
        "--no-robustness",
        action="store_true",
        help="skip the verdicts on a second, disjoint prompt set",
    )
    study.add_argument("--no-progress", action="store_true", help="no progress lines")
    study.set_defaults(func=cmd_study)

    info = sub.add_parser(
        "info",
        formatter_class=formatter,
        parents=[common],
        help="describe a Block AttnRes checkpoint folder (or a vanilla Qwen3 run's model)",
    )
    info.add_argument("checkpoint", help="a checkpoint folder")
    info.add_argument(
        "--no-verify",
        action="store_true",
        help="describe files changed after their save as they are now (default: refused; "
        "docs/loading.md)",
    )
    info.set_defaults(func=cmd_info)

    listing = sub.add_parser(
        "list", formatter_class=formatter, parents=[debug], help="list the study's conditions"
    )
    listing.add_argument(  # refused, saying why (it was accepted and ignored)
        "--threads",
        nargs="?",
        action=_Refused,
        reason="list computes nothing with torch, so it takes no thread count",
        help=argparse.SUPPRESS,
    )
    listing.set_defaults(func=cmd_list)
    return parser


# the status of a command cut short because its reader closed stdout (``| head -1``): what
# a Unix tool killed by SIGPIPE (signal 13) reports, 128 + 13
CLOSED_OUTPUT_STATUS = 141


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at ``os.devnull`` after a write into a closed pipe
    failed (the Python docs' handling of SIGPIPE): the output still buffered would fail
    again when Python flushes it at exit, printing "Exception ignored ... BrokenPipeError"
    and ending with status 120. A stdout without a descriptor (a test's capture) is left."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); its exit code: 0, 1 (an
    error, one line on stderr; ``--debug`` shows the traceback), 2 (an option refused
    when parsed), 130 (Ctrl-C), 143 (SIGTERM) or `CLOSED_OUTPUT_STATUS` (141, with no
    error line) when the reader of stdout closed it (``hooked-attnres list | head -1``; it
    printed "error: [Errno 32] Broken pipe" and ended with 1 until audit 173). What a
    command cut short kept for resuming is named on stderr as after Ctrl-C. ``--help``
    into a closed pipe ends with argparse's status (0), quietly."""
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help or a usage error: argparse's status
        try:
            sys.stdout.flush()  # a help still buffered fails here, not at Python's exit
        except BrokenPipeError:
            _stdout_to_devnull()
        raise
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (`Terminated`)
        # while the options are read (a condition name loaded torch then, until audit
        # 198): Ctrl-C ended in a KeyboardInterrupt traceback (audit 178)
        return interrupted(error)
    # the caller's torch thread count is put back when the command returns (main called
    # in a process that goes on: the tests, a notebook); it stayed at the command's
    threads = contextlib.ExitStack()
    try:
        if args.command != "list":
            from hooked_attnres._environment import thread_count
            from hooked_attnres.runtime import tune_from_environment

            threads.enter_context(
                thread_count(args.threads if args.threads is not None else default_threads())
            )
            tune_from_environment()  # reuse freed memory (HOOKED_ATTNRES_TUNE_MALLOC=0: don't)
        status = args.func(args)
        sys.stdout.flush()  # output still buffered fails here, not at Python's exit
        return status
    except BrokenPipeError:  # the reader closed stdout: no error of the command
        if args.debug:  # a broken pipe of something else than stdout: its traceback
            raise
        _stdout_to_devnull()
        return CLOSED_OUTPUT_STATUS
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (`Terminated`)
        return interrupted(error)
    except Exception as error:  # one clear line; --debug for the traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"{PROG}: error: {message} ({type(error).__name__}; --debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        threads.close()


if __name__ == "__main__":
    sys.exit(main())
