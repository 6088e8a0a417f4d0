"""A crash between any two writes of a training run or a study, then a resume.

Every write that makes something durable ends in a rename (`hooked_attnres._atomic`: a
file's temporary sibling, a checkpoint's completion marker, a version moved aside or
installed, a recovery). A forked child runs the whole job with ``os.rename`` set to kill
it (SIGKILL) instead of performing its ``k``-th rename, for every ``k`` of the
uninterrupted job; the parent then runs the job again, which must resume and give exactly
the uninterrupted job's final weights, history and tables, with no leftover. A second
variant raises an exception there instead (the error paths of the same writes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from crash_helpers import KILLED, run_forked
from helpers import blocks_of

from hooked_attnres import HookedAttnRes
from hooked_attnres._atomic import leftovers_of


class _Crash(Exception):
    """What the raising variant throws from inside a write."""


def _renames_until(k: int, kill: bool):
    """Make ``os.rename`` kill the process (or raise `_Crash`) instead of its ``k``-th call
    (0-based) from now on; returns the list of renames done so far (its length counts
    them)."""
    real = os.rename
    done: list[tuple] = []

    def rename(src, dst, *args, **kwargs):
        if len(done) == k:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            os.rename = real  # one crash; the cleanup that follows may rename
            raise _Crash(f"crash instead of rename {k}: {src} -> {dst}")
        real(src, dst, *args, **kwargs)
        done.append((str(src), str(dst)))

    os.rename = rename
    return real, done


def _counted(job, *args) -> int:
    real, done = _renames_until(-1, kill=False)
    try:
        job(*args)
    finally:
        os.rename = real
    return len(done)


def _killed_at(k: int, job, *args) -> None:
    _renames_until(k, kill=True)  # a forked child: it never returns to the test
    job(*args)


def _assert_no_leftovers(root) -> None:
    left = [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    left += [p for p in root.rglob("*") if ".partial" in p.name and p.is_file()]
    assert not left, left
    for path in root.rglob("*"):
        if path.is_dir():
            assert not leftovers_of(path), path


# --- training ----------------------------------------------------------------------------

# 4 steps, a checkpoint every 2: checkpoints after steps 2 and 4, the final model, metrics
# first save: marker, install; next: marker, aside, install, the old version renamed to
# be discarded (`_atomic._discard`)
TRAIN_RENAMES = 2 + 4 + 2 + 1


def _train(out_dir, model_kind: str = "attnres", lr: float = 3e-3, resume: bool = True) -> None:
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
    from hooked_attnres.training import TrainConfig, train

    task = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6, n_queries=1)
    tok = task_tokenizer(task)
    shape = dict(
        d_model=16, n_layers=2, n_heads=2, n_key_value_heads=1, d_head=8, d_mlp=24, n_ctx=32
    )
    shape["rotary_base"] = 10_000.0
    config = TrainConfig(
        steps=4,
        batch_size=8,
        lr=lr,
        warmup_steps=1,
        eval_every=2,
        eval_size=8,
        checkpoint_every=2,
        threads=1,  # the forked child trains with one thread; every run must match it
    )
    model = build_model(model_kind, 0, tok, shape, **blocks_of(model_kind))
    train(model, task, config, out_dir, tokenizer=tok, progress=False, resume=resume)


def _final(out_dir, model_kind: str):
    if model_kind == "attnres":
        weights = HookedAttnRes.from_pretrained(out_dir / "model").state_dict()
    else:
        from safetensors.torch import load_file

        weights = load_file(str(out_dir / "model" / "model.safetensors"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics.pop("seconds")
    return weights, metrics


@pytest.fixture(scope="module", params=["attnres", "vanilla"])
def whole_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        renames = _counted(_train, out, request.param)
    finally:
        torch.set_num_threads(threads)
    return request.param, renames, _final(out, request.param), out


def whole_run_dir(whole_run):
    return whole_run[3]


def _assert_resumes_to(out, whole_run) -> None:
    kind, _, (weights, metrics), _ = whole_run
    _train(out, kind)  # resumes from what the crash left
    resumed_weights, resumed_metrics = _final(out, kind)
    assert resumed_weights.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert resumed_metrics == metrics  # the history and accuracies too
    _assert_no_leftovers(out.parent)


def test_the_training_job_makes_every_rename_counted_here(whole_run):
    assert whole_run[1] == TRAIN_RENAMES


@pytest.mark.parametrize("k", range(TRAIN_RENAMES))
def test_training_killed_at_any_write_resumes_to_the_uninterrupted_run(tmp_path, whole_run, k):
    out = tmp_path / "run"
    assert run_forked(_killed_at, k, _train, out, whole_run[0]) == KILLED
    _assert_resumes_to(out, whole_run)


@pytest.mark.parametrize("whole_run", ["attnres"], indirect=True)  # the writes' error paths
@pytest.mark.parametrize("k", range(TRAIN_RENAMES))  # do not depend on the model
def test_training_failing_at_any_write_resumes_to_the_uninterrupted_run(tmp_path, whole_run, k):
    out = tmp_path / "run"  # _train trains with threads=1 (it set 1 here, never restored)
    real, _ = _renames_until(k, kill=False)
    try:
        with pytest.raises(_Crash):
            _train(out, whole_run[0])
    finally:
        os.rename = real
    _assert_resumes_to(out, whole_run)


# a run started over (resume=False) in the folder of a finished run with other settings:
# every save replaces a version (marker, aside, install, discard): its step-0 checkpoint
# (audit 197: written at once beside the earlier run's model), its step-2 and final
# checkpoints and its model; then metrics.json
RESTART_RENAMES = 4 + 4 + 4 + 4 + 1


def test_a_run_started_over_makes_every_rename_counted_here(tmp_path, whole_run):
    out = tmp_path / "run"
    shutil.copytree(whole_run_dir(whole_run), out)
    assert _counted(_train, out, "attnres", 1e-3, False) == RESTART_RENAMES


@pytest.mark.parametrize("whole_run", ["attnres"], indirect=True)
@pytest.mark.parametrize("k", range(RESTART_RENAMES))
def test_a_run_started_over_and_killed_never_pairs_its_model_with_the_old_metrics(
    tmp_path, whole_run, k
):
    """``train(resume=False)`` over a finished run with other settings, killed at any
    write: ``model/`` and ``metrics.json`` must describe one run (or the metrics be gone),
    never the new model with the old run's history and accuracy; and where they are the
    earlier run's, its checkpoint is too or `checkpoint_run_differs` says it is not
    (audit 197: the study read the earlier model as the new run's)."""
    from hooked_attnres.training.trainer import checkpoint_run_differs

    out = tmp_path / "run"
    shutil.copytree(whole_run_dir(whole_run), out)
    old_weights, old_metrics = whole_run[2]
    assert run_forked(_killed_at, k, _train, out, "attnres", 1e-3, False) == KILLED
    weights = HookedAttnRes.from_pretrained(out / "model").state_dict()
    old_model = all(torch.equal(weights[name], t) for name, t in old_weights.items())
    if (out / "metrics.json").exists():
        lr = json.loads((out / "metrics.json").read_text())["train_config"]["lr"]
        assert lr == (old_metrics["train_config"]["lr"] if old_model else 1e-3)
        differs = checkpoint_run_differs(out)  # first: it recovers a checkpoint moved aside
        state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
        if state["train_config"]["lr"] != lr:  # the checkpoint is the new run's
            assert differs is not None and f"(at step {state['step']} of 4)" in differs, k
        else:
            assert differs is None, k


@pytest.mark.parametrize("whole_run", ["attnres"], indirect=True)
def test_a_second_training_run_into_the_same_folder_is_refused(tmp_path, whole_run, monkeypatch):
    """Audit finding: two runs into one out_dir (e.g. the same command started twice,
    once with other settings) each wrote whole versions, but the one writing its model
    last was paired with the other's ``metrics.json``: here a run with lr 1e-3, started
    while a run with lr 3e-3 was between its model and its metrics, left its model with
    the 3e-3 run's history and accuracy. The second run is refused now, before any work."""
    from hooked_attnres._atomic import DirectoryBusyError
    from hooked_attnres.training import trainer as trainer_module

    out = tmp_path / "run"
    real = trainer_module.write_text_atomic
    refused = []

    def second_run_meanwhile(path, text):
        if not refused:
            refused.append(True)
            with pytest.raises(
                DirectoryBusyError,
                match=r"run is being written by another training run \(process \d+\).*"
                "choose another folder",
            ):
                _train(out, "attnres", 1e-3, False)  # even started over
        real(path, text)

    monkeypatch.setattr(trainer_module, "write_text_atomic", second_run_meanwhile)
    _train(out, "attnres")  # with threads=1 (it set 1 here too, never restored)
    assert refused
    weights, metrics = _final(out, "attnres")
    reference_weights, reference_metrics = whole_run[2]  # the uninterrupted 3e-3 run
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():  # was the 1e-3 run's (off by 9e-3)
        assert torch.equal(weights[name], tensor), name
    assert metrics == reference_metrics
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.json", "model"]
    _assert_no_leftovers(tmp_path)


def test_a_folder_the_run_cannot_write_is_refused_before_any_training(tmp_path, monkeypatch):
    """A read-only out_dir (simulated: creating anything in it is refused; the tests may
    run as root) failed only at the first checkpoint, after training up to it (with
    ``checkpoint_every=None``, after the whole run). The run's lock file is created before
    the first step now, so the error comes before any work."""
    from hooked_attnres.training import trainer as trainer_module

    out = tmp_path / "run"
    out.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return Path(path).parent == out

    def read_only_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_mkdir(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    steps = []
    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    monkeypatch.setattr(trainer_module, "fault_point", steps.append)
    with pytest.raises(PermissionError, match=r"Permission denied.*run/"):
        _train(out, "attnres")
    assert steps == [] and list(out.iterdir()) == []


# --- the study ---------------------------------------------------------------------------

STUDY_CONDITION = "hard_kimi_L8"
# each model's kept tables (one file each), then the study folder: marker, (aside), install,
# (the earlier study renamed to be discarded)
STUDY_RENAMES = {"new": 2 + 2, "over an earlier study": 2 + 4}


def _study(out, runs, n_bootstrap: int = 5):
    from hooked_attnres.study import run_study

    return run_study(
        out,
        checkpoints=runs,
        n_prompts=6,
        n_bootstrap=n_bootstrap,
        progress=False,
        plots=False,
        robustness=False,  # the second prompt set writes nothing more
    )


def _study_files(out) -> dict[str, bytes]:
    """Every file the study wrote, less the seconds it took (``run.json`` and the reports
    record them)."""
    seconds = re.compile(rb"(&quot;|\")seconds(&quot;|\"): [0-9.]+")
    return {
        p.name: seconds.sub(b"seconds", p.read_bytes())
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def study_reference(tmp_path_factory):
    from helpers import tiny_study_runs

    root = tmp_path_factory.mktemp("study")
    tiny_study_runs(root / "runs", STUDY_CONDITION, (0, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the forked children use (the kept runs record it)
    try:
        earlier = root / "earlier"
        _study(earlier, root / "runs", n_bootstrap=7)  # an earlier study, other numbers
        renames = {}
        for case in STUDY_RENAMES:
            out = root / case.replace(" ", "_")
            if case != "new":
                shutil.copytree(earlier, out)
            renames[case] = _counted(_study, out, root / "runs")
        reference = _study_files(out)
    finally:
        torch.set_num_threads(threads)
    return root / "runs", renames, reference, earlier


def test_the_study_makes_every_rename_counted_here(study_reference):
    assert study_reference[1] == STUDY_RENAMES


def _study_cases():
    for case, count in STUDY_RENAMES.items():
        for k in range(count):
            yield case, k
        yield case, "rmtree"  # after every rename: killed while the kept tables are removed


@pytest.mark.parametrize(("case", "k"), list(_study_cases()))
def test_a_study_killed_at_any_write_resumes_to_the_uninterrupted_study(
    tmp_path, study_reference, case, k, monkeypatch
):
    from hooked_attnres.study import run as study_module

    runs, _, reference, earlier_study = study_reference
    out = tmp_path / "out"
    if case != "new":
        shutil.copytree(earlier_study, out)
        earlier = _study_files(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if k == "rmtree":

            def killed_removing(path, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            def job():
                study_module.shutil.rmtree = killed_removing
                _study(out, runs)

            assert run_forked(job) == KILLED
        else:
            assert run_forked(_killed_at, k, _study, out, runs) == KILLED
        if out.exists():  # the previous results or the whole new study, never a mix
            assert _study_files(out) in ([earlier] if case != "new" else []) + [reference]
        _study(out, runs)
    finally:
        torch.set_num_threads(threads)
    assert _study_files(out) == reference
    assert not study_module.partial_dir(out).exists()
    _assert_no_leftovers(tmp_path)
