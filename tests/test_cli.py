"""The command line: lazy imports (``--help`` loads no torch), help text for every option,
one-line errors, readable endings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hooked_attnres import cli


def test_help_imports_neither_torch_nor_transformer_lens():
    code = (
        "import sys, hooked_attnres.cli as c; c.build_parser().format_help(); "
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


HEAVY = ("torch", "transformers", "transformer_lens", "plotly", "pandas")


@pytest.mark.parametrize(
    "argv, status, said",
    [
        (["list"], 0, "hard_cumulative_L8"),
        (["--help"], 0, "usage: hooked-attnres"),
        (["train", "--help"], 0, "--condition NAME"),
        (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["train", "--condition", "nope"], 2, "argument --condition: NAME must be one of"),
        (["study", "--conditions", "grid", "--seeds", "-1"], 2, "argument --seeds: must be"),
        (["list", "--threads", "2"], 2, "list computes nothing with torch"),
    ],
)
def test_light_commands_import_no_torch(argv, status, said):
    """Audit 198: ``list``, a condition name and the errors of parsing loaded torch,
    transformers, TransformerLens, plotly and pandas (about 5 s) through the study package,
    though none of them uses any: they are loaded where a command computes with them."""
    code = (
        "import sys\n"
        "from hooked_attnres.cli import main\n"
        "try:\n    status = main(sys.argv[1:])\n"
        "except SystemExit as end:\n    status = end.code\n"
        f"print('status', status, 'heavy', *[m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1].split() == ["status", str(status), "heavy"]
    assert said in out.stdout + out.stderr


def test_every_option_has_help_text_and_shows_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"train", "study", "info", "list"}
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "(default:" in text, name
    assert "``" not in parser.format_help()


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hooked-attnres: error: no checkpoint directory")
    with pytest.raises(FileNotFoundError):
        cli.main(["info", str(tmp_path / "missing"), "--debug"])
    assert cli.main(["train", "--condition", "hard_kimi_L8", "--steps", "20"]) == 1
    assert "is a fixed recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "x", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
        # audit 116: torch.set_num_threads takes a C int; 2**31 failed with "Overflow when
        # unpacking long", exit code 1
        (["info", "x", "--threads", str(2**31)], f"--threads: must be an integer <= {2**31 - 1}"),
        (["study", "--threads", str(2**64)], f"--threads: must be an integer <= {2**31 - 1} ("),
        (["study", "--prompts", "1"], "argument --prompts: must be an integer >= 2, got 1"),
        # audit 56: 10**9 drew prompts for days (a Python loop) towards a terabyte
        (["study", "--prompts", "16385"], "argument --prompts: must be an integer <= 16384 ("),
        (["study", "--prompts", "1000000000"], "must be an integer <= 16384 (the most probe"),
        (["study", "--bootstrap", "-1"], "argument --bootstrap: must be an integer >= 1, got -1"),
        (["study", "--bootstrap", "100001"], "--bootstrap: must be an integer <= 100000 (the"),
        (["study", "--seeds", "0", "-2"], "argument --seeds: must be an integer >= 0, got -2"),
        (["train", "--seeds", "-1"], "argument --seeds: must be an integer >= 0, got -1"),
        # audit 116: past torch's seeds, train started the run and failed in the model's
        # init ("Overflow when unpacking long long"); the study's are the same model seeds.
        # Audit 122: from 2**63 (past int64) the study failed after the model's work
        # (KeyError numpy.ulonglong) or, beside seed 0, read the seeds as floats
        (["train", "--seeds", str(2**64)], f"--seeds: must be an integer <= {2**63 - 1} (the"),
        (["train", "--seeds", str(2**63)], f"--seeds: must be an integer <= {2**63 - 1} (the"),
        (["study", "--seeds", str(2**63)], f"--seeds: must be an integer <= {2**63 - 1} (the"),
        (["train", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        # a non-integer named neither the range nor what was accepted ('abc' is not an integer)
        (["train", "--steps", "abc"], "argument --steps: must be an integer >= 1, got 'abc'"),
        (["train", "--steps", "1.5"], "argument --steps: must be an integer >= 1, got '1.5'"),
        (["train", "--seeds", "0.5"], "argument --seeds: must be an integer >= 0, got '0.5'"),
        (["study", "--prompts", "1e3"], "argument --prompts: must be an integer >= 2, got '1e3'"),
        (["study", "--bootstrap", ""], "argument --bootstrap: must be an integer >= 1, got ''"),
        (["info", "x", "--threads", "two"], "argument --threads: must be an integer >= 1, got"),
        (
            ["study", "--bootstrap-seed", "-1"],
            "argument --bootstrap-seed: must be an integer >= 0, got -1",
        ),
    ],
)
def test_bad_numbers_are_refused_before_any_work(argv, message, monkeypatch, capsys):
    # --bootstrap 0 used to fail after the first model's whole sweep; --seeds -1 trained
    # {condition}_seed-1, which the study never finds; --threads 0 failed inside torch
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("studied"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_steps_scale_the_warm_up_and_train_ends_with_a_summary(tmp_path, monkeypatch, capsys):
    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    seen = {}

    def fake_train(condition, seed, out_dir, config=None, task=None, **kwargs):
        seen[condition] = config
        return TrainResult(out_dir, out_dir / "model", config.steps, {"retrieval": 0.75}, 3.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    assert cli.main(["train", "--condition", "both", "--steps", "20", "--out", str(tmp_path)]) == 0
    assert {c: (cfg.steps, cfg.warmup_steps) for c, cfg in seen.items()} == {
        "attnres": (20, 2),
        "vanilla": (20, 2),
    }
    out = capsys.readouterr().out
    assert "attnres                     0     75.0%        3" in out
    assert "summary:" in out and (tmp_path / "train_summary.json").exists()


@pytest.mark.parametrize(
    ("options", "steps_and_warm_up"),
    [
        (["--steps", "600"], (600, 50)),
        (["--set", "steps=600"], (600, 50)),  # once kept the 1200-step run's 100
        (["--steps", "600", "--set", "steps=600"], (600, 50)),
        (["--set", "steps=600", "warmup_steps=7"], (600, 7)),
        (["--steps", "600", "--set", "warmup_steps=0"], (600, 0)),
    ],
)
def test_the_warm_up_keeps_its_share_however_the_steps_are_given(
    options, steps_and_warm_up, tmp_path, monkeypatch
):
    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    seen = []

    def fake_train(condition, seed, out_dir, config=None, task=None, **kwargs):
        seen.append((config.steps, config.warmup_steps))
        return TrainResult(out_dir, out_dir / "model", config.steps, {"retrieval": 0.5}, 1.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv + options) == 0
    assert seen == [steps_and_warm_up]


def test_a_text_setting_keeps_the_text_given(tmp_path, monkeypatch):
    """Audit 127: every ``--task-arg`` value was read as JSON, so ``name=5`` trained the
    task named by the integer 5 (its batches' ``task`` 5). A text field (the task's
    ``name``) keeps the text given, as typed; the numbers stay numbers."""
    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    seen = []

    def fake_train(condition, seed, out_dir, config=None, task=None, **kwargs):
        seen.append(task)
        return TrainResult(out_dir, out_dir / "model", config.steps, {"5": 0.5}, 1.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    assert cli.main([*argv, "--task-arg", "name=5", "n_pairs=5"]) == 0
    assert seen == [study.study_task(name="5", n_pairs=5)]
    assert type(seen[0].name) is str and type(seen[0].n_pairs) is int
    # audit 147: all the text, quotes included (the documented rule: a text setting is not
    # read as JSON), as the shell hands over name='"probe"'
    assert cli.main([*argv, "--no-resume", "--task-arg", 'name="probe"']) == 0
    assert seen[-1] == study.study_task(name='"probe"')


@pytest.mark.parametrize(("option", "example"), [("--set", "lr=1e-3"), ("--task-arg", "n_pairs=8")])
@pytest.mark.parametrize("after", [[], ["--no-progress"]])
def test_a_key_value_option_without_a_pair_is_refused(option, example, after, monkeypatch, capsys):
    """Audit 127: ``train --set`` (or ``--set`` followed by another option) with no pair
    trained the full recipe, as if it were not given. Refused when parsed, naming the
    option and the form it takes."""
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--condition", "attnres", option, *after])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {option}: expected KEY=VALUE pairs, e.g. {example}; got none" in err


def test_list_options_given_twice_are_gathered(tmp_path, monkeypatch):
    """Audit 127: ``--set lr=1e-3 --set batch_size=8`` trained with the recipe's lr, and
    ``--seeds 0 --seeds 1`` trained seed 1 only: argparse kept the last occurrence of an
    option, silently. Every occurrence counts; a key given in two of them is refused as
    one given twice in one."""
    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    seen = []

    def fake_train(condition, seed, out_dir, config=None, task=None, **kwargs):
        seen.append((seed, config.lr, config.batch_size, task.n_pairs))
        return TrainResult(out_dir, out_dir / "model", config.steps, {"retrieval": 0.5}, 1.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    options = ["--set", "lr=1e-3", "--seeds", "0", "--set", "batch_size=8", "--seeds", "1"]
    assert cli.main([*argv, *options, "--task-arg", "n_pairs=5", "--task-arg", "n_keys=20"]) == 0
    assert seen == [(0, 1e-3, 8, 5), (1, 1e-3, 8, 5)]
    with pytest.raises(cli.CommandError, match="--set gives 'lr' twice; give it once"):
        cli.main([*argv, "--debug", "--set", "lr=1e-3", "--set", "lr=2e-3"])


def test_study_list_options_given_twice_are_gathered(tmp_path, monkeypatch):
    """Audit 127: ``study --seeds 0 --seeds 1`` studied seed 1 only (argparse kept the
    last occurrence); so for ``--conditions``. Both count, as one option of both."""
    from hooked_attnres import study
    from hooked_attnres.study import run

    seen = []

    def record(**kw):
        seen.append((kw["conditions"], kw["seeds"]))
        raise RuntimeError("recorded")  # no study

    monkeypatch.setattr(run, "check_study_arguments", record)
    monkeypatch.setattr(study, "run_study", lambda **kw: pytest.fail("studied"))
    argv = ["study", "--out", str(tmp_path / "s"), "--conditions", "attnres", "--seeds", "0"]
    assert cli.main([*argv, "--conditions", "vanilla", "--seeds", "1"]) == 1
    assert seen == [(["attnres", "vanilla"], [0, 1])]


def test_steps_given_twice_with_different_values_are_refused(tmp_path, monkeypatch, capsys):
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--steps", "600"]
    assert cli.main(argv + ["--set", "steps=300"]) != 0
    assert "--steps 600 and --set steps=300 disagree; give one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "lr=1e-3", "lr=2e-3"], "--set gives 'lr' twice; give it once"),
        (["--set", "batch-size=8", "batch_size=16"], "--set gives 'batch_size' twice"),
        (["--task-arg", "n_pairs=4", "n_pairs=8"], "--task-arg gives 'n_pairs' twice"),
    ],
)
def test_a_key_given_twice_is_refused(extra, message, tmp_path, monkeypatch, capsys):
    # before, the last value silently won (batch-size and batch_size are one field)
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "runs"
    assert cli.main(["train", "--condition", "attnres", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("command", ["train", "study"])
def test_a_seed_given_twice_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    # train --seeds 0 0 trained (or resumed and rewrote) one run twice and listed it twice in
    # train_summary.json; study --seeds 0 0 studied each model twice and then failed in the
    # verdicts, after the work
    from hooked_attnres import study
    from hooked_attnres.study import run

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    out = tmp_path / "out"
    argv = [command, "--seeds", "0", "1", "0", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seeds repeats [0] (got [0, 1, 0])" in err[0]
    assert not out.exists()


def test_run_study_refuses_a_condition_or_seed_given_twice_or_none(tmp_path):
    from hooked_attnres.study.run import find_runs

    with pytest.raises(ValueError, match=r"conditions repeats \['vanilla'\]"):
        find_runs(None, ["vanilla", "vanilla"], [0])
    with pytest.raises(ValueError, match="seeds is empty: no model would be studied"):
        find_runs(None, ["vanilla"], [])
    assert find_runs(None, ["vanilla"], [0]) == [("vanilla", 0)]


def test_train_summary_keeps_finished_runs_after_ctrl_c_and_earlier_commands(
    tmp_path, monkeypatch, capsys
):
    import json

    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    def fake_train(condition, seed, out_dir, **kwargs):
        if seed == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        out_dir.mkdir(parents=True, exist_ok=True)
        accuracy = {"attnres": 0.5, "vanilla": 0.25}[condition]
        return TrainResult(out_dir, out_dir / "model", 5, {"retrieval": accuracy}, 2.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    summary = tmp_path / "train_summary.json"

    def listed():
        return [
            (r["condition"], r["seed"], r["accuracy"]["retrieval"])
            for r in json.loads(summary.read_text())
        ]

    out = ["--out", str(tmp_path), "--no-progress"]
    assert cli.main(["train", "--condition", "attnres", "--seeds", "0", "1", *out]) == 130
    assert listed() == [("attnres", 0, 0.5)]  # the finished run is listed (was: no file)
    assert cli.main(["train", "--condition", "vanilla", *out]) == 0
    assert listed() == [("attnres", 0, 0.5), ("vanilla", 0, 0.25)]  # (was: vanilla only)
    assert cli.main(["train", "--condition", "attnres", *out]) == 0  # a rerun replaces its row
    assert listed() == [("vanilla", 0, 0.25), ("attnres", 0, 0.5)]
    capsys.readouterr()


def test_train_summary_keeps_the_runs_of_a_command_running_at_the_same_time(
    tmp_path, monkeypatch, capsys
):
    # the summary was read once when a command started: two `train` commands into one
    # folder at the same time each wrote their own rows over the other's, which were lost
    import json

    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    out = ["--out", str(tmp_path), "--no-progress"]

    def fake_train(condition, seed, out_dir, **kwargs):
        if condition == "attnres":  # meanwhile, another command trains and lists vanilla
            assert cli.main(["train", "--condition", "vanilla", *out]) == 0
        out_dir.mkdir(parents=True, exist_ok=True)
        return TrainResult(out_dir, out_dir / "model", 5, {"retrieval": 0.5}, 2.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    assert cli.main(["train", "--condition", "attnres", *out]) == 0
    rows = json.loads((tmp_path / "train_summary.json").read_text())
    assert [(r["condition"], r["seed"]) for r in rows] == [("vanilla", 0), ("attnres", 0)]
    capsys.readouterr()


@pytest.mark.parametrize("by", ["ctrl_c", "sigterm"])
def test_an_interrupted_study_says_where_the_finished_models_are_kept(
    by, tmp_path, monkeypatch, capsys
):
    # SIGTERM (audit 188): the study was killed at once, without naming the kept models
    import signal

    from hooked_attnres import study
    from hooked_attnres.study.run import partial_dir

    out = tmp_path / "study_out"

    def interrupted(out_dir, **kwargs):
        partial_dir(out_dir).mkdir()
        (partial_dir(out_dir) / "vanilla_seed0.pkl").write_bytes(b"")  # one model finished
        if by == "sigterm":  # what `timeout` or docker stop sends (the default would
            # end pytest itself: the command must have its own handler while it runs)
            assert callable(signal.getsignal(signal.SIGTERM)), "no SIGTERM handler"
            signal.raise_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    code = cli.main(["study", "--out", str(out), "--no-progress"])
    assert code == {"ctrl_c": 130, "sigterm": 143}[by]
    err = capsys.readouterr().err
    assert f"kept in {tmp_path / 'study_out.partial'}: run the same command again" in err
    last = {"ctrl_c": "interrupted", "sigterm": "terminated (SIGTERM)"}[by]
    assert err.endswith(f"hooked-attnres: {last}\n"), err


def test_a_study_refused_as_busy_does_not_offer_another_studys_kept_models(
    tmp_path, monkeypatch, capsys
):
    """Review finding: a study refused because another one writes the same out_dir
    (``DirectoryBusyError``) said the models finished so far were kept and to run the
    same command again: they are the other study's, and the same command is refused
    again while it runs."""
    from hooked_attnres import study
    from hooked_attnres._atomic import DirectoryBusyError
    from hooked_attnres.study.run import partial_dir

    out = tmp_path / "study_out"

    def busy(out_dir, **kwargs):
        partial_dir(out_dir).mkdir()
        (partial_dir(out_dir) / "vanilla_seed0.pkl").write_bytes(b"")  # the other's
        raise DirectoryBusyError(f"{partial_dir(out_dir)} is being written by another study")

    monkeypatch.setattr(study, "run_study", busy)
    assert cli.main(["study", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is being written by another study (DirectoryBusyError" in err
    assert "run the same command again" not in err


def test_study_says_where_the_report_is_even_without_progress(tmp_path, monkeypatch, capsys):
    """... and (audit 169) what the command line is given is what the model is measured
    with: ``--prompts`` prompts, ``--bootstrap`` resamples and ``--bootstrap-seed`` in the
    call of `study_condition` (whose tables hold every interval), recorded in run.json with
    ``--threads``."""
    from hooked_attnres.study import run

    calls = []
    real = run.study_condition

    def recording(model, batch, n_bootstrap=1000, progress=True, seed=0):
        calls.append((len(batch), n_bootstrap, seed))
        return real(model, batch, n_bootstrap, progress, seed)

    monkeypatch.setattr(run, "study_condition", recording)
    code = cli.main(
        [
            "study",
            "--conditions",
            "vanilla",
            "--prompts",
            "16",
            "--bootstrap",
            "20",
            "--bootstrap-seed",
            "7",
            "--threads",
            "1",
            "--no-robustness",
            "--no-progress",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"report {tmp_path / 's' / 'report.html'}" in out[0]
    assert calls == [(16, 20, 7)]
    settings = json.loads((tmp_path / "s" / "run.json").read_text())
    assert settings["runs"] == ["vanilla seed 0"] and settings["threads"] == 1
    assert (settings["n_prompts"], settings["n_bootstrap"], settings["bootstrap_seed"]) == (
        16,
        20,
        7,
    )


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # honoured when set (below)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.default_threads() == 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cli.default_threads() == 2
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cli.default_threads() == 1


@pytest.mark.parametrize(
    "argv", [["list", "--threads", "2"], ["list", "--threads=1"], ["list", "--threads"]]
)
def test_list_refuses_threads_it_would_ignore(argv, capsys):
    """``list`` took ``--threads`` (an option the other commands share) and ignored it: it
    computes nothing with torch. It is refused when parsed, saying why (exit code 2), is
    not in its help, and ``--debug`` is still accepted; the other commands keep it."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "argument --threads: list computes nothing with torch, so it takes no" in err
    subparsers = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert "--threads" not in subparsers.choices["list"].format_help()
    for name in ("train", "study", "info"):
        assert "--threads" in subparsers.choices[name].format_help(), name
    assert cli.main(["list", "--debug"]) == 0


def test_list_names_every_condition_with_its_recipe_and_shipped_seeds(capsys):
    from hooked_attnres.study import CONDITIONS, available, get_condition

    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(CONDITIONS)
    shipped = available()
    for line in lines:
        name, kind, layout, layers, task, steps, *seeds = line.split()
        recipe = get_condition(name)
        assert (kind, int(layers), task, int(steps)) == (
            recipe.kind,
            recipe.n_layers,
            recipe.task,
            recipe.steps,
        )
        assert layout == str(recipe.layout or "-")
        assert seeds == ([str(s) for s in shipped[name]] if name in shipped else ["-"])
    # and independently of available(): rows that must read so
    rows = {line.split()[0]: line.split() for line in lines}
    assert rows["hard_cumulative_L8"][1:] == [
        "attnres",
        "cumulative",
        "8",
        "hard",
        "1200",
        "0",
        "1",
        "2",
    ]
    assert rows["hard_kimi_L16"][-1] == "-"


@pytest.mark.parametrize("command", ["train", "study"])
def test_an_out_path_that_is_a_file_is_refused_before_any_work(
    command, tmp_path, monkeypatch, capsys
):
    # train --out <a file> failed with a raw "[Errno 20] Not a directory" from the trainer
    from hooked_attnres import study
    from hooked_attnres.study import run

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    argv = [command, "--seeds", "0", "--out", str(a_file), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("is a file" in err[0] or "a file is there" in err[0]), err
    assert a_file.read_text() == "kept"


def test_help_shows_each_default_once_and_no_none_or_false():
    # --checkpoints read "(default: the shipped) (default: None)", --threads "(default: the
    # free cores, 1 now; ...) (default: None)", and every flag "(default: False)"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for says_nothing in ("(default: None)", "(default: False)", "(default: [])"):
            assert says_nothing not in text, (name, says_nothing)
        for action in sub._actions:
            if action.option_strings and action.help:
                entry = sub._get_formatter()._expand_help(action)
                assert entry.count("default") <= 1, (name, action.option_strings, entry)
    study_help = " ".join(subparsers.choices["study"].format_help().split())
    assert "(default: the shipped)" in study_help and "(default: 256)" in study_help
    assert "(default: runs)" in " ".join(subparsers.choices["train"].format_help().split())


def test_default_threads_honour_omp_num_threads(monkeypatch):
    # OMP_NUM_THREADS=1 (to share a machine) was overridden by the free cores: the command
    # set torch to 2 threads on an idle 2-core machine
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", " 3 ")  # asked for: not capped by the free cores
    assert cli.default_threads() == 3
    for ignored in ("0", "-2", "two", "1.5", "", "\u00b2"):  # not a count: the free cores
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert cli.default_threads() == 2, ignored
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli.default_threads() == 2


def test_a_command_puts_the_callers_thread_count_back(tmp_path, monkeypatch, capsys):
    """A command sets torch's thread count while it runs (``--threads``, else
    `default_threads`) and puts the caller's back when it returns, also after an error.
    It left its own count in the process: a test calling `cli.main` with ``--threads 3``
    left every later test of its pytest worker on 3 threads (the suite runs two workers
    on two cores, one thread each)."""
    import torch
    from helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    seen = []
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the default count when --threads is not given
    caller = torch.get_num_threads()
    for threads in (["--threads", "3"], []):
        assert cli.main(["info", str(tmp_path / "m"), *threads]) == 0
        assert torch.get_num_threads() == caller
    monkeypatch.undo()  # the real info: a folder that is no checkpoint is an error (1)
    assert cli.main(["info", str(tmp_path / "none"), "--threads", "3"]) == 1
    assert torch.get_num_threads() == caller
    assert seen == [3, 2]
    capsys.readouterr()


@pytest.mark.parametrize("no_resume", [False, True])
def test_an_interrupted_train_says_how_to_resume(no_resume, tmp_path, monkeypatch, capsys):
    """It said only "hooked-attnres: interrupted", though the run's checkpoint was kept
    and the same command resumes it (with --no-resume, the same command would start
    over). With --no-resume it said "run the command without --no-resume again" until
    audit 226, without it "run the same command again" until review 234: it prints that
    command now, its options kept, which read back by a POSIX shell and the parser is the
    command given less --no-resume (a checkpoint of no thread count: none added)."""
    import shlex

    from hooked_attnres import study

    def interrupted(condition, seed, out_dir, **kwargs):
        (out_dir / "checkpoint").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "train_condition", interrupted)
    out = tmp_path / "my runs"
    argv = ["train", "--condition", "attnres", "--seeds", "3", "--out", str(out), "--no-progress"]
    argv += ["--set", "lr=1e-3", "--steps", "4"]
    assert cli.main(argv + ["--no-resume"] * no_resume) == 130
    err = capsys.readouterr().err
    kept = out / "attnres_seed3" / "checkpoint"
    said = f"last checkpoint is kept in {kept}: run "
    assert said in err, err
    assert err.count("`") == 2 and err.split("`")[2].startswith(" to resume\n"), err
    words = shlex.split(err.split("`")[1])
    assert words[:2] == ["hooked-attnres", "train"], words
    parser = cli.build_parser()
    given, again = parser.parse_args(argv), parser.parse_args(words[1:])
    assert vars(again) == vars(given), words


def test_ctrl_c_while_the_arguments_are_read_exits_130_without_a_traceback(monkeypatch, capsys):
    """Audit 178: argparse reads a condition name through `_condition_name`, which loads
    the condition table and with it torch (seconds), before `main`'s handler of Ctrl-C:
    ``hooked-attnres train`` interrupted in its first seconds (1 of 10 SIGINTs at random
    moments) ended in a ``KeyboardInterrupt`` traceback, not the command's one line and
    exit code 130."""

    def interrupted(text: str) -> str:
        raise KeyboardInterrupt  # Ctrl-C while torch loads

    monkeypatch.setattr(cli, "_condition_name", interrupted)
    try:
        code = cli.main(["train", "--condition", "attnres", "--no-progress"])
    except KeyboardInterrupt:
        code = "a KeyboardInterrupt out of main (a traceback)"
    assert code == 130
    assert capsys.readouterr().err == "hooked-attnres: interrupted\n"


def test_a_train_stopped_by_a_full_disk_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Audit 150: an error of the machine during a run (a full disk at a checkpoint, out of
    memory) printed only the error, though the last checkpoint was kept and the same
    command resumes from it once the cause is fixed."""
    from hooked_attnres import study

    def full_disk(condition, seed, out_dir, **kwargs):
        (out_dir / "checkpoint").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(study, "train_condition", full_disk)
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    kept = tmp_path / "attnres_seed0" / "checkpoint"
    assert "No space left on device" in err, err
    said = f"last checkpoint is kept in {kept}: fix the cause and run "
    assert _resume_printed(err, said, argv), err


def _tiny_train_argv(out: Path) -> list[str]:
    """``train`` of the attnres condition into ``out``: 4 steps of 2 prompts, a checkpoint
    every 2 steps, one thread, no progress bar (the forked crash tests' run)."""
    argv = ["train", "--condition", "attnres", "--out", str(out), "--no-progress", "--steps"]
    argv += ["4", "--set", "batch_size=2", "eval_size=4", "checkpoint_every=2", "--threads", "1"]
    return argv


def _resume_printed(err: str, said: str, argv: list[str]) -> bool:
    """Whether ``err`` says ``said`` followed by a command in backquotes and ``to resume``,
    which read by a POSIX shell and the parser is the ``train`` command ``argv``."""
    import shlex

    if said + "`" not in err:
        return False
    command, after = err.split(said + "`", 1)[1].split("`", 1)
    words = shlex.split(command)
    parser = cli.build_parser()
    return (
        after.startswith(" to resume")
        and words[:2] == ["hooked-attnres", "train"]
        and vars(parser.parse_args(words[1:])) == vars(parser.parse_args(argv))
    )


def _tiny_study_argv(checkpoints: Path, out: Path) -> list[str]:
    """``study`` of the runs under ``checkpoints`` into ``out``: 4 prompts, 10 bootstrap
    resamples, no robustness pass, no progress lines, one thread."""
    argv = ["study", "--checkpoints", str(checkpoints), "--out", str(out), "--prompts", "4"]
    argv += ["--bootstrap", "10", "--no-robustness", "--no-progress", "--threads", "1"]
    return argv


def _study_refusal_and_info(study: list[str], run: Path, capsys) -> tuple[str, str]:
    """What the ``study`` command line refusing (exit 1) says on stderr, and what ``info``
    of ``run``'s model (exit 0) prints, output of earlier calls dropped."""
    capsys.readouterr()
    assert cli.main(study) == 1
    err = capsys.readouterr().err
    assert cli.main(["info", str(run / "model")]) == 0
    return err, capsys.readouterr().out


@pytest.mark.parametrize("fails", ["model.safetensors", "optimizer.pt"])
def test_a_checkpoint_write_failing_for_lack_of_space_says_so_and_how_to_resume(tmp_path, fails):
    """Audit 178: ``train`` into a full disk (a tmpfs of 12, 22 and 30 MB) failed with
    ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 7639104 vs
    7638996`` (torch.save of optimizer.pt) and, for the weights, safetensors'
    ``SafetensorError ... No space left on device (os error 28)``: neither an `OSError`,
    so the command named no cause (torch) and did not say that the last checkpoint is kept
    and the same command resumes. Both are raised as the `OSError` they are now. Here a
    file size limit (``RLIMIT_FSIZE``: the write fails with EFBIG, as a full disk fails with
    ENOSPC) is set before the second checkpoint, so the first is kept; in a forked child."""
    import resource
    import signal

    from crash_helpers import fork_and_wait

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    err = tmp_path / "stderr.txt"
    argv = _tiny_train_argv(out)

    def run() -> None:
        saves = []
        original = trainer._Checkpoint.save

        def save(self, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2:  # the disk is full from the second checkpoint on
                weights = self.directory / "model" / "model.safetensors"
                size = weights.stat().st_size
                limit = size - 1 if fails == "model.safetensors" else size + 4096
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not the signal
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            return original(self, *args, **kwargs)

        trainer._Checkpoint.save = save
        sys.stderr = open(err, "w", encoding="utf-8")  # noqa: SIM115 (the child's)
        code = cli.main(argv)
        sys.stderr.flush()
        os._exit(10 + code)

    status = fork_and_wait(run)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 11, status  # main returned 1
    text = err.read_text()
    kept = out / "attnres_seed0" / "checkpoint"
    said = f"last checkpoint is kept in {kept}: fix the cause and run "
    assert _resume_printed(text, said, argv), text
    assert "hooked-attnres: error: [Errno 27] File too large" in text, text
    assert "(OSError; --debug shows the traceback)" in text, text
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 2


def test_info_on_a_big_folder_names_a_few_of_its_files(tmp_path, capsys):
    # it listed every file of the folder in its one line (`info /tmp`: 150 names here)
    for i in range(40):
        (tmp_path / f"file{i:02d}.txt").write_text("")
    assert cli.main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path} has no config.json; found file00.txt, file01.txt, file02.txt, " in err
    assert "file04.txt, ... (40 in all)" in err and "file05.txt" not in err, err
    # and a Hugging Face folder without weights, the same way
    from hooked_attnres.loading.hf_qwen3 import hf_weight_files

    with pytest.raises(
        Exception, match=r"\(found file00.txt, .*, file04.txt, \.\.\. \(40 in all\)\)"
    ):
        hf_weight_files(tmp_path)


@pytest.mark.parametrize("option", ["--set", "--task-arg"])
def test_a_pair_without_a_key_is_refused(option, tmp_path, monkeypatch, capsys):
    # --set =5 said "unknown setting: TrainConfig.__init__() got an unexpected keyword
    # argument ''"
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path / "r"), option, "=5"]
    assert cli.main(argv) == 1
    assert f"{option} takes key=value pairs, got '=5' (no key)" in capsys.readouterr().err


def test_study_checkpoints_that_are_missing_a_file_or_empty_are_named_so(
    tmp_path, monkeypatch, capsys
):
    # a missing folder or a file said "/nonexistent hold no {condition}_seed{n}/model run of
    # a known condition"
    from hooked_attnres.study import run

    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "empty").mkdir()
    expected = {
        tmp_path / "missing": f"no checkpoints folder at {tmp_path / 'missing'}",
        a_file: f"checkpoints {a_file} is a file, not a folder of",
        tmp_path / "empty": f"{tmp_path / 'empty'} holds no {{condition}}_seed{{n}}/model run",
    }
    for checkpoints, message in expected.items():
        argv = ["study", "--checkpoints", str(checkpoints), "--out", str(tmp_path / "s")]
        assert cli.main(argv + ["--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_study_into_the_file_system_root_is_refused_clearly(monkeypatch, capsys):
    # it said "PosixPath('/') has an empty name"
    from hooked_attnres.study import run

    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    assert cli.main(["study", "--out", "/", "--conditions", "vanilla", "--no-progress"]) == 1
    err = capsys.readouterr().err
    # by the option the caller wrote (it said "out_dir", run_study's argument)
    assert "--out / is the file-system root" in err and "out_dir" not in err, err


def test_a_study_refuses_a_foreign_kept_folder_by_the_option_the_caller_wrote(
    tmp_path, monkeypatch, capsys
):
    from hooked_attnres.study import run

    monkeypatch.setattr(run, "load_condition", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "s.partial").write_text("a file of yours")
    argv = ["study", "--out", str(tmp_path / "s"), "--conditions", "vanilla", "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "move it away or choose another --out" in err and "out_dir" not in err, err


def test_study_passes_the_bootstrap_seed(tmp_path, monkeypatch, capsys):
    """run_study's bootstrap seed is a setting of the command too (default 0, as before)."""
    from types import SimpleNamespace

    from hooked_attnres import study

    calls = []

    def fake_study(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(accuracy=[], seconds=0.0)

    monkeypatch.setattr(study, "run_study", fake_study)
    for argv, seed in (([], 0), (["--bootstrap-seed", "5"], 5)):
        assert cli.main(["study", "--out", str(tmp_path / "s"), "--no-progress", *argv]) == 0
        assert calls[-1]["bootstrap_seed"] == seed


def test_study_says_too_few_resamples_once_by_its_flag(tmp_path, monkeypatch, capsys):
    """Audit 95: ``--bootstrap 10`` warned "n_bootstrap=10 leaves fewer than one resampled
    mean ...", an argument the command line has not, twice per model; the command says it
    once, as ``--bootstrap 10`` (the study's warnings, emitted here by the bootstrap the
    study runs, are silenced), and not at all with enough resamples (40 at 95 %)."""
    import warnings
    from types import SimpleNamespace

    import numpy as np

    from hooked_attnres import study
    from hooked_attnres.analysis.bootstrap import bootstrap_ci_rows

    def fake_study(**kwargs):
        for _ in range(4):  # two models' mass summaries and effects
            bootstrap_ci_rows(np.ones((1, 3)), kwargs["n_bootstrap"], resamples_name="n_bootstrap")
        return SimpleNamespace(accuracy=[], seconds=0.0)

    monkeypatch.setattr(study, "run_study", fake_study)
    for n, said in ((10, 1), (40, 0)):
        argv = ["study", "--out", str(tmp_path / "s"), "--no-progress", "--bootstrap", str(n)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cli.main(argv) == 0
        assert [str(w.message) for w in caught if "leaves fewer" in str(w.message)] == []
        err = capsys.readouterr().err
        assert err.count("leaves fewer") == said, err
        if said:
            assert err.startswith(
                f"[hooked-attnres] warning: --bootstrap {n} leaves fewer than one resampled "
                "mean per 2.5 % tail of a 95 % interval (it needs at least 40)"
            ), err


def test_study_refuses_bad_arguments_before_warning_of_too_few_resamples(tmp_path, capsys):
    """Audit 115: ``--bootstrap 10`` with a missing checkpoints folder (or another argument
    run_study refuses) printed the warning about too few resamples first, then the error:
    the arguments are checked first, so only the error is said; with them right, the
    warning comes before any work (the study itself is not run here)."""
    from hooked_attnres import study

    missing = tmp_path / "nope"
    argv = ["study", "--out", str(tmp_path / "s"), "--no-progress", "--bootstrap", "10"]
    assert cli.main([*argv, "--checkpoints", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoints folder at {missing}" in err, err
    assert "leaves fewer" not in err, err
    assert cli.main([*argv, "--conditions", "attnres", "--seeds", "99"]) == 1
    err = capsys.readouterr().err
    assert "no shipped checkpoint for attnres seed 99" in err and "leaves fewer" not in err, err

    def refused(**kwargs):
        raise RuntimeError("the study ran")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "run_study", refused)
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.index("--bootstrap 10 leaves fewer") < err.index("the study ran"), err


def test_a_run_of_other_settings_is_refused_with_the_command_line_remedy(tmp_path, capsys):
    """Training into the folder of a run with other settings is refused; the message gave
    the Python remedy only (``use another out_dir or resume=False``), which names nothing
    a command-line user wrote. It names ``--no-resume`` and ``--out`` too (a real, tiny
    run: one step of two prompts)."""
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    tiny = ["--threads", "1", "--steps", "1", "--set", "batch_size=2", "eval_size=2"]
    assert cli.main(argv + tiny) == 0
    capsys.readouterr()
    assert cli.main(argv + tiny + ["lr=1e-4"]) == 1
    err = capsys.readouterr().err
    assert "train_config.lr differs: 0.0005 vs 0.0001" in err, err
    assert "on the command line: another --out, or --no-resume" in err, err
    assert cli.main(argv + tiny + ["lr=1e-4", "--no-resume"]) == 0


def test_info_describes_a_vanilla_qwen3_run_instead_of_a_python_remedy(tmp_path, capsys):
    """``info`` of a vanilla run's model (what ``train --condition vanilla`` writes, and the
    shipped ``vanilla_seed0/model``) failed with ``load it with
    HookedAttnRes.from_hf_qwen3(directory, wrap=...)``, a Python call the command line has
    no option for. It describes the plain Qwen3 (no routers) and says how the study reads
    it; the numbers are those of the transformers model it was saved from."""
    from helpers import hf_qwen3

    hf = hf_qwen3()
    hf.save_pretrained(tmp_path)
    assert cli.main(["info", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    cfg = hf.config
    assert f"{tmp_path}: vanilla Qwen3 (no routers), {cfg.num_hidden_layers} layers" in out, out
    assert f"d_model {cfg.hidden_size}" in out
    assert f"{sum(p.numel() for p in hf.parameters()):,} parameters" in out
    assert "wrap='recency'" in out  # how the study reads it (a Python call, named as such)


@pytest.mark.parametrize(
    "settings",
    [
        dict(attnres_layout="kimi", n_layers=5, attnres_num_blocks=4),
        dict(attnres_layout="cumulative", n_layers=6, attnres_num_blocks=3),
        dict(attnres_layout="kimi", n_layers=3, attnres_num_blocks=1),
        dict(attnres_layout="none"),
        dict(attnres_layout="full"),
        dict(attnres_layout="cumulative", attnres_mode="full"),
    ],
)
def test_info_gives_the_blocks_a_model_has(tmp_path, capsys, settings):
    """Audit 76: ``info`` printed the config's ``attnres_num_blocks`` as the model's
    blocks: "4 blocks" for 5 layers asked for 4 (blocks of ceil(5 / 4) = 2 layers: 3
    blocks), "2 blocks" for a layout ``"none"`` model (no routers) and for a block per
    sublayer (``"full"``, cumulative ``mode="full"``), none of which uses it. The count
    here is that of the layers grouped by the block size, by hand."""
    from helpers import tiny_model

    model = tiny_model(**settings)
    model.save_pretrained(tmp_path / "m")
    assert cli.main(["info", str(tmp_path / "m"), "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()[0]
    cfg = model.cfg
    if settings["attnres_layout"] == "none":
        expected = "no routers"
    elif settings["attnres_layout"] == "full" or settings.get("attnres_mode") == "full":
        expected = "a block per sublayer"
    else:
        size = -(-cfg.n_layers // cfg.attnres_num_blocks)
        sizes = [0] * cfg.n_layers
        for layer in range(cfg.n_layers):
            sizes[layer // size] += 1
        sizes = [n for n in sizes if n]
        s = "s" if size != 1 else ""
        expected = f"{len(sizes)} block{'s' if len(sizes) != 1 else ''} of {size} layer{s}"
        if sizes[-1] != size:
            expected += f" (the last of {sizes[-1]})"
    assert f", d_model {cfg.d_model}, {expected}, " in out, out


@pytest.mark.parametrize("kind", ["attnres", "vanilla"])
def test_info_says_when_a_run_folder_holds_a_newer_unfinished_run(tmp_path, capsys, kind):
    """Audit 76: after a finished run, a run started over in its folder (``resume=False``,
    --no-resume) and stopped leaves ``model`` and ``metrics.json`` of the finished run
    (only a finished run replaces them) next to its own checkpoint; ``info`` of that
    ``model`` described it as the folder's model, with nothing saying the folder's run is
    another, unfinished one (the study reads that model too). It says so now, with the
    checkpoint's step read from its trainer_state.json; a finished run gets no note."""
    from helpers import blocks_of

    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
    from hooked_attnres.training import TrainConfig, train

    task = KeyValueRetrieval(n_pairs=2, n_keys=4, n_values=4)
    tok = task_tokenizer(task)
    shape = dict(d_model=16, n_layers=2, n_heads=2, n_key_value_heads=1, d_head=8, n_ctx=16)
    run = tmp_path / "run"

    def settings(steps):
        return TrainConfig(steps=steps, batch_size=4, warmup_steps=0, eval_every=1, eval_size=8)

    def info() -> str:
        assert cli.main(["info", str(run / "model"), "--threads", "1"]) == 0
        return capsys.readouterr().out

    train(build_model(kind, 0, tok, shape, **blocks_of(kind)), task, settings(2), run,
          tokenizer=tok, progress=False)  # fmt: skip
    assert "note:" not in info()
    train(build_model(kind, 1, tok, shape, **blocks_of(kind)), task, settings(4), run,
          tokenizer=tok, progress=False, resume=False, stop_after=1)  # fmt: skip
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["train_config"]["steps"]) == (1, 4)
    said = info()
    # the first difference of their settings: the model's seed (a transformers config
    # records none), then the steps
    differs = "model.config.seed: 1 vs 0" if kind == "attnres" else "train_config.steps: 4 vs 2"
    assert (
        f"note: {run / 'checkpoint'} (at step 1 of 4) and {run / 'metrics.json'} record "
        f"different runs ({differs}): either the checkpoint's run was started over"
    ) in said, said
    assert (
        f"which alone replaces {run / 'model'} and metrics.json, so both are an earlier "
        "finished run's; or metrics.json was changed after it was written"
    ) in said, said
    threads = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    threads = threads["environment"]["threads"]  # which a resume on the command line needs
    assert (
        "in either case resume the run (the train command without --no-resume, with "
        f"--threads {threads}), which writes model/ and metrics.json from the checkpoint"
    ) in said, said
    assert json.loads((run / "metrics.json").read_text())["step"] == 2  # the earlier run's
    train(build_model(kind, 1, tok, shape, **blocks_of(kind)), task, settings(4), run,
          tokenizer=tok, progress=False)  # fmt: skip
    assert "note:" not in info()


def test_a_run_folder_the_trainer_cannot_use_is_refused_with_the_command_line_remedy(
    tmp_path, capsys
):
    """A run folder's ``model`` holding files the trainer did not write, or the run folder
    being a file, was refused with the Python remedy only (``choose another out_dir``, a
    name the command line does not have). Both name ``--out`` too, before any training."""
    argv = ["train", "--out", str(tmp_path), "--no-progress", "--threads", "1", "--steps", "1"]
    (tmp_path / "attnres_seed0" / "model").mkdir(parents=True)
    (tmp_path / "attnres_seed0" / "model" / "notes.txt").write_text("mine")
    (tmp_path / "vanilla_seed0").write_text("mine")
    for condition in ("attnres", "vanilla"):
        assert cli.main([*argv, "--condition", condition]) == 1
        err = capsys.readouterr().err
        assert "choose another out_dir (on the command line: another --out)" in err, err
    assert not (tmp_path / "attnres_seed0" / "checkpoint").exists()


def test_info_describes_a_vanilla_run_left_moved_aside_by_an_interrupted_save(tmp_path, capsys):
    """A save interrupted after moving the old model aside (``.model.old-*``, no ``model``)
    is recovered by every loader; ``info`` looked for the vanilla Qwen3 before recovering,
    found no folder and gave the refusal with the Python remedy (``load it with
    HookedAttnRes.from_hf_qwen3``). It recovers first, then describes the vanilla run."""
    from helpers import hf_qwen3

    from hooked_attnres._atomic import atomic_directory

    with atomic_directory(tmp_path / "model") as tmp:
        hf_qwen3().save_pretrained(tmp)
    (tmp_path / "model").rename(tmp_path / ".model.old-0000abcd")
    assert cli.main(["info", str(tmp_path / "model"), "--threads", "1"]) == 0
    assert "vanilla Qwen3 (no routers)" in capsys.readouterr().out


@pytest.mark.parametrize("folder", ["model", "run"])
def test_a_study_into_a_model_or_run_folder_of_this_library_is_refused(
    folder, tmp_path, monkeypatch, capsys
):
    """Audit 116: ``study --checkpoints runs --out runs/{condition}_seed0/model`` replaced
    the model checkpoint it had just studied with the report (the model was deleted: a
    save of this library may replace a folder holding only its own saves, and a model
    is one). A study replaces only an earlier study; the model's files stay as they were.
    The same from Python (``run_study(out_dir=...)``) and for a training run's folder."""
    from helpers import tiny_study_runs

    from hooked_attnres.study import run, run_dir, run_study

    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    runs = tmp_path / "runs"
    tiny_study_runs(runs, "hard_kimi_L8", (0,))
    model = run_dir(runs, "hard_kimi_L8", 0) / "model"
    if folder == "run":  # a folder holding a marker of this library's save (a checkpoint)
        from hooked_attnres._atomic import atomic_directory

        with atomic_directory(tmp_path / "checkpoint") as tmp:
            (tmp / "trainer_state.json").write_text("{}")
        out = tmp_path / "checkpoint"
    else:
        out = model
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["study", "--checkpoints", str(runs), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--threads", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"refusing to replace {out}: it is not an earlier study" in err[0]
    assert "choose another --out" in err[0] and "out_dir" not in err[0], err
    with pytest.raises(FileExistsError, match="not an earlier study.*choose another out_dir"):
        run_study(out, checkpoints=runs, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_refuses_a_thread_count_the_recipe_would_override(tmp_path, monkeypatch, capsys):
    """Audit 116: ``train --threads N`` was ignored while training a grid condition (its
    recipe trains with ``threads=1``, `Condition.threads`, which the trainer sets inside
    the run) and with ``--set threads=M``: the run used 1 (or M) threads, not N. Refused
    unless the counts agree; where the recipe leaves the count to the caller (the
    original two) ``--threads`` is used."""
    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    seen = []

    def fake_train(condition, seed, out_dir, config=None, **kwargs):
        seen.append(condition if config is None else (condition, config.threads))
        return TrainResult(out_dir, out_dir / "model", 1, {"retrieval": 0.5}, 1.0)

    monkeypatch.setattr(study, "train_condition", fake_train)
    argv = ["train", "--out", str(tmp_path), "--no-progress", "--condition"]
    recipe = study.get_condition("hard_kimi_L8").threads
    assert cli.main([*argv, "hard_kimi_L8", "--threads", str(recipe + 1)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and (
            f"--threads {recipe + 1} would be ignored: hard_kimi_L8 trains with {recipe} "
            "thread(s), part of its recipe"
        )
        in err[0]
    ), err
    assert cli.main([*argv, "attnres", "--threads", "3", "--set", "threads=2"]) == 1
    assert "--threads 3 and --set threads=2 disagree; give one" in capsys.readouterr().err
    assert seen == []
    assert cli.main([*argv, "hard_kimi_L8", "--threads", str(recipe)]) == 0
    assert cli.main([*argv, "attnres", "--threads", "2", "--set", "threads=2"]) == 0
    assert cli.main([*argv, "attnres", "--threads", "3"]) == 0
    assert seen == ["hard_kimi_L8", ("attnres", 2), "attnres"]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("option", "cls"), [("--set", "TrainConfig"), ("--task-arg", "KeyValueRetrieval")]
)
def test_an_unknown_key_is_refused_naming_the_keys_the_option_takes(
    option, cls, tmp_path, monkeypatch, capsys
):
    """Audit 116: ``--set seed=3`` said "unknown setting: TrainConfig.__init__() got an
    unexpected keyword argument 'seed'", a Python call, and named no key the option takes.
    It names the option, the key and every key it takes (the fields, read here)."""
    import dataclasses

    from hooked_attnres import study
    from hooked_attnres.tasks import KeyValueRetrieval
    from hooked_attnres.training import TrainConfig

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path / "r"), option]
    assert cli.main([*argv, "steps=5", "seed=3"] if option == "--set" else [*argv, "seed=3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    fields = {"TrainConfig": TrainConfig, "KeyValueRetrieval": KeyValueRetrieval}[cls]
    keys = ", ".join(f.name for f in dataclasses.fields(fields) if f.init)
    assert (
        len(err) == 1
        and (f"{option} seed=3: {cls} has no setting 'seed'; {option} takes {keys}") in err[0]
    ), err
    assert "__init__" not in err[0]
    assert not (tmp_path / "r").exists()


def test_info_of_a_training_run_folder_names_its_model(tmp_path, capsys):
    """Audit 116: ``info runs/{condition}_seed0`` (the folder ``train`` names) said only
    "has no config.json; found checkpoint, metrics.json, model"; it names the run's
    ``model`` folder, the checkpoint to describe."""
    from helpers import tiny_study_runs

    from hooked_attnres.study import run_dir

    tiny_study_runs(tmp_path, "hard_kimi_L8", (0,))
    run = run_dir(tmp_path, "hard_kimi_L8", 0)
    assert cli.main(["info", str(run), "--threads", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} has no config.json; found model" in err[0], err
    assert f"the checkpoint in it is {run / 'model'}" in err[0], err
    assert cli.main(["info", str(run / "model"), "--threads", "1"]) == 0  # which describes
    capsys.readouterr()


@pytest.mark.parametrize("where", ["out", "run"])
def test_train_refuses_an_out_that_is_another_save_before_any_run(
    where, tmp_path, monkeypatch, capsys
):
    """Audit 126: ``train --out X`` wrote its runs into a study's or a model's folder, and
    replaced the model and ``metrics.json`` of a run folder that is no training run's (a
    copy of a shipped checkpoint's folder, which has no ``checkpoint/``) with a new run's.
    Both refused before any run trains (also when a later seed's folder is the one); the
    files stay byte for byte."""
    import shutil

    from hooked_attnres.study import conditions, run_dir

    monkeypatch.setattr(conditions, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "out"
    if where == "out":  # a model saved by this library
        from helpers import tiny_model

        tiny_model().save_pretrained(out)
        match = f"refusing to train into --out {out}: it is not a folder of runs but another"
    else:  # the second seed's folder is a copy of a shipped checkpoint's folder
        shipped = Path(__file__).parent.parent / "hooked_attnres/data/study"
        shutil.copytree(run_dir(shipped, "attnres", 0), run_dir(out, "attnres", 1))
        match = (
            f"refusing to train into {run_dir(out, 'attnres', 1)}: its model/ (holding "
            "config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and "
            "metrics.json are not a training run's"
        )
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    argv = ["train", "--condition", "attnres", "--seeds", "0", "1", "--out", str(out)]
    assert cli.main(argv + ["--no-progress", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("content", ['{"my": "notes"}\n', "[1, 2]\n", "not json\n"])
def test_train_refuses_to_replace_a_train_summary_it_did_not_write(
    content, tmp_path, monkeypatch, capsys
):
    """Audit 126: ``train --out X`` replaced a ``X/train_summary.json`` that it had not
    written (read as "no earlier runs") with its own after the first run, silently.
    Refused before any run trains; the file stays byte for byte."""
    from hooked_attnres import study

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    summary = tmp_path / "train_summary.json"
    summary.write_text(content)
    argv = ["train", "--condition", "attnres", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"refusing to replace {summary}: it is not a summary written by" in err, err
    assert "choose another --out" in err
    assert summary.read_text() == content


@pytest.mark.parametrize("later", ["file", "user_files"])
def test_train_refuses_a_later_run_folder_the_trainer_refuses_before_any_run(
    later, tmp_path, monkeypatch, capsys
):
    """Review 131: ``train --seeds 0 1`` checked seed 1's folder only for audit 126's
    refusals before the first run; a folder the trainer refuses for another reason (a file
    at ``OUT/{condition}_seed1``; an earlier run's folder whose ``model/`` holds a file of
    the user's) was refused only after seed 0 had trained (hours for the grid). Refused
    before any run now, in the trainer's words; the files stay byte for byte."""
    from hooked_attnres._atomic import atomic_directory
    from hooked_attnres.study import conditions, run_dir

    monkeypatch.setattr(conditions, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "out"
    run = run_dir(out, "attnres", 1)
    run.parent.mkdir(parents=True)
    if later == "file":
        run.write_text("mine\n")
        match = f"out_dir {run} is a file; the trainer writes a directory"
    else:  # an earlier run's folder (its checkpoint), a file of the user's in its model/
        with atomic_directory(run / "checkpoint") as tmp:
            (tmp / "trainer_state.json").write_text("{}\n")
        (run / "model").mkdir()
        (run / "model" / "notes.txt").write_text("mine\n")
        match = f"refusing to replace {run / 'model'}: it holds files this library did not"
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    argv = ["train", "--condition", "attnres", "--seeds", "0", "1", "--out", str(out)]
    assert cli.main(argv + ["--no-progress", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert "choose another out_dir (on the command line: another --out)" in err, err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize(
    "command, where",
    [
        ("train", "data/study"),  # a new seed beside the shipped runs: listed as shipped
        ("train", "runs"),
        ("study", "study_out"),
        ("study", "data/study/new_study"),
    ],
)
def test_an_out_inside_the_package_is_refused_before_any_work(command, where, monkeypatch, capsys):
    """Audit 169: ``train --out hooked_attnres/data/study --seeds 5`` trained into the
    shipped checkpoints' folder (``list`` and the default study then counted the run as
    shipped), and ``--out hooked_attnres/...`` wrote runs or a study into the installed
    package, which pip deletes on an upgrade or uninstall. Refused before any work, naming
    the option; nothing is created there."""
    import hooked_attnres
    from hooked_attnres import study
    from hooked_attnres.study import run

    package = Path(hooked_attnres.__file__).resolve().parent
    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(run, "_study_run", lambda *a, **k: pytest.fail("studied"))
    out = package / where
    before = sorted(package.rglob("*"))
    argv = [command, "--conditions" if command == "study" else "--condition", "vanilla"]
    argv += ["--seeds", "5" if command == "train" else "0", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"--out {out} is inside the package hooked_attnres ({package})" in err[0], err
    assert sorted(package.rglob("*")) == before


def test_a_training_run_folder_inside_the_package_is_refused():
    """Audit 169: the trainer's own check of a run's folder (`train_condition`, `train`)
    refuses one inside the package too, by the Python name ``out_dir``."""
    from hooked_attnres.study import SHIPPED, run_dir
    from hooked_attnres.training.trainer import check_run_folder

    with pytest.raises(ValueError, match=r"out_dir .*vanilla_seed5 is inside the package"):
        check_run_folder(run_dir(SHIPPED, "vanilla", 5))
    assert not run_dir(SHIPPED, "vanilla", 5).exists()


def _documented_options() -> dict[str, dict[str, str]]:
    """``{command: {option: default cell}}`` of the option tables of docs/study.md's
    "Command-line options" (one table per command, after a line naming it in backticks:
    ``hooked-attnres train``)."""
    import re

    text = (Path(__file__).parent.parent / "docs" / "study.md").read_text()
    section = text.split("### Command-line options", 1)[1].split("\n#", 1)[0]
    tables: dict[str, dict[str, str]] = {}
    command = None
    for line in section.splitlines():
        named = re.match(r"^`hooked-attnres (\w+)", line)
        if named:
            command = named.group(1)
            tables[command] = {}
        row = re.match(r"^\| `(--[\w-]+)[^`]*` \| ([^|]+) \|", line)
        if row and command is not None:
            tables[command][row.group(1)] = row.group(2).strip()
    return tables


def test_the_documented_options_and_defaults_are_the_parsers():
    """Audit 169: docs/study.md lists every option of every command with its default, as
    ``--help`` does (the docs named train's options in prose without --threads and
    study's nowhere in one place); a default that is a value is written in backticks and is
    the parser's (``256``, ``both``, ``0 1`` for a list), one the parser leaves unset is
    written in words."""
    import re

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    documented = _documented_options()
    assert set(documented) == set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        options = {
            action.option_strings[-1]: action.default
            for action in sub._actions
            if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS
        }
        assert set(documented[name]) == set(options), name
        for option, default in options.items():
            cell = documented[name][option]
            if default is None or default is False or default == []:  # not 0
                assert not re.fullmatch(r"`[^`]*`", cell), (name, option, cell)
            else:
                shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert cell == f"`{shown}`", (name, option, cell, default)


@pytest.mark.parametrize("command", ["train", "study"])
def test_an_unknown_condition_is_refused_when_parsed_naming_the_option(
    command, monkeypatch, capsys
):
    """Audit 169: ``--condition nope`` was refused after torch was loaded, with exit code 1
    and ``condition must be one of (...)``: neither the option nor the names the command
    takes besides the conditions ('both', 'grid'). Now argparse's refusal (exit code 2),
    also after a valid name; the valid names still reach the command expanded."""
    from hooked_attnres import study
    from hooked_attnres.study import CONDITIONS

    monkeypatch.setattr(study, "train_condition", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("studied"))
    option = "--condition" if command == "train" else "--conditions"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, option, "attnres", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {option}: NAME must be one of ('both', 'grid', 'attnres', " in err, err
    assert all(repr(name) in err for name in CONDITIONS) and "got 'nope'" in err, err
    namespace = cli.build_parser().parse_args([command, option, "both", "hard_kimi_L8"])
    assert cli._conditions(namespace.condition if command == "train" else namespace.conditions) == [
        "attnres",
        "vanilla",
        "hard_kimi_L8",
    ]


def _with_closed_stdout(argv, buffered):
    """Run the command line in a child whose stdout is a pipe nobody reads (its read end
    closed before the child starts, as ``| head -1`` closes it after a line, but for
    certain): every write to stdout fails with EPIPE, at the write (``buffered`` False:
    ``PYTHONUNBUFFERED=1``) or when the buffer is flushed (True: Python's default for a
    pipe, where it used to fail at the interpreter's exit)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(Path(cli.__file__).parents[1]), OMP_NUM_THREADS="1")
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        code = "import sys; from hooked_attnres import cli; sys.exit(cli.main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], stdout=write, stderr=subprocess.PIPE, env=env
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr.decode()


@pytest.mark.parametrize(
    "argv, status, buffered",
    # `list` unbuffered (each write fails) and buffered (the failure at Python's exit)
    [(["list"], 141, buffered) for buffered in (True, False)]
    + [
        (argv, 0, buffered)
        for argv in (["--help"], ["train", "--help"], ["study", "--help"], ["info", "--help"])
        for buffered in (True, False)
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(argv, status, buffered):
    """Audit 173: ``hooked-attnres list | head -1`` ended with "error: [Errno 32] Broken
    pipe (BrokenPipeError ...)" and status 1 (unbuffered), or with Python's "Exception
    ignored ... BrokenPipeError" and status 120 (a pipe's default buffering, as ``--help``
    did): a reader that stops reading is no error of the command. A command cut short
    ends as a Unix tool killed by SIGPIPE reports it, status 141 (128 + 13); the help ends
    with argparse's own status, 0; nothing on stderr."""
    assert _with_closed_stdout(argv, buffered) == (status, "")


def test_info_into_a_closed_pipe_ends_quietly(tmp_path):
    """``info`` prints a line per router: into a closed pipe it ends as ``list`` does, here
    with a pipe's default buffering (the write fails when Python flushes at exit, where
    it printed "Exception ignored ... BrokenPipeError" and ended with 120)."""
    buffered = True
    from helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    argv = ["info", str(tmp_path / "m"), "--threads", "1"]
    assert _with_closed_stdout(argv, buffered) == (141, "")


@pytest.mark.parametrize("no_resume", [False, True])
def test_train_into_a_closed_pipe_lists_the_run_it_finished(
    no_resume, tmp_path, monkeypatch, capsys
):
    """Review 180: ``train | head -1``: the reader closes stdout after the first line
    (``training attnres seed 0 -> ...``); the run trains to its end, and the line that
    reports it fails. The summary was written after that line, so the finished run was
    missing from ``train_summary.json`` (no file at all after the first run) though its
    model was written; it is written before the line now, and the command ends with 141.
    With --no-resume (audit 226) it says on stderr that the run finished and the next was
    not started, and the command that trains that one only (the same command would train
    the finished run again)."""
    import io
    import json

    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    trained = []

    def fake_train(condition, seed, out_dir, **kwargs):
        trained.append((condition, seed))
        out_dir.mkdir(parents=True, exist_ok=True)
        return TrainResult(out_dir, out_dir / "model", 5, {"retrieval": 0.5}, 2.0)

    class ClosedAfterOneLine(io.StringIO):
        def write(self, text):
            if "\n" in self.getvalue():  # the reader has its line and is gone
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    monkeypatch.setattr(study, "train_condition", fake_train)
    monkeypatch.setattr(sys, "stdout", ClosedAfterOneLine())
    argv = ["train", "--condition", "attnres", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"] + ["--no-resume"] * no_resume) == 141
    assert trained == [("attnres", 0)]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [(r["condition"], r["seed"]) for r in summary] == [("attnres", 0)]
    lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
    if not no_resume:
        assert lines == []
        return
    run = tmp_path / "attnres_seed1"
    assert lines == [
        "[hooked-attnres] this command's runs and what each needs:",
        "attnres seed 0 finished in this command: nothing",
        f"attnres seed 1 not started: {run} holds no run yet; start it over (--no-resume)",
        "[hooked-attnres] to finish this command's runs, fix the cause and run:",
        f"hooked-attnres train --condition attnres --seeds 1 --out {tmp_path} --no-progress "
        "--no-resume",
    ]


def test_a_study_into_a_closed_pipe_still_says_where_its_finished_models_are_kept(
    tmp_path, monkeypatch, capsys
):
    """Review 180: a command cut short by a closed stdout ends with 141 and no error line,
    but not with nothing on stderr, as docs/study.md said: what it kept for resuming is
    named there, as after Ctrl-C (the study's finished models)."""
    from hooked_attnres import study
    from hooked_attnres.study.run import partial_dir

    out = tmp_path / "study_out"

    def cut_short(out_dir, **kwargs):
        partial_dir(out_dir).mkdir()
        (partial_dir(out_dir) / "vanilla_seed0.pkl").write_bytes(b"")  # one model finished
        raise BrokenPipeError(32, "Broken pipe")  # its next progress line

    monkeypatch.setattr(study, "run_study", cut_short)
    assert cli.main(["study", "--out", str(out), "--no-progress"]) == 141
    err = capsys.readouterr().err
    assert "error" not in err, err
    assert f"kept in {tmp_path / 'study_out.partial'}: run the same command again" in err, err


@pytest.mark.parametrize("during", ["after_step", "inside_update"])
def test_sigterm_stops_a_training_with_a_checkpoint_and_says_how_to_resume(during, tmp_path):
    """Audit 188: SIGTERM (sent by ``timeout``, docker stop, SLURM preemption) ended
    ``hooked-attnres train`` at once: no checkpoint of the steps since the last one, no
    resume hint, the process killed by signal 15. The command treats it as Ctrl-C now:
    the trainer writes its checkpoint (SIGTERM inside an optimizer update waits for the
    update, as Ctrl-C does), the command names it and how to resume, and exits with 143
    (128 + 15). Here the run sends itself SIGTERM at step 3 of 4 (checkpoints every 2
    steps), in a forked child."""
    import signal

    import torch
    from crash_helpers import fork_and_wait

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    err = tmp_path / "stderr.txt"
    argv = _tiny_train_argv(out)

    def run() -> None:
        updates = []
        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            updates.append(1)
            if during == "inside_update" and len(updates) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return original_step(self, *args, **kwargs)

        def fault_point(name: str) -> None:
            if during == "after_step" and name == "train_step" and len(updates) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        torch.optim.AdamW.step = step  # type: ignore[method-assign]
        trainer.fault_point = fault_point
        sys.stderr = open(err, "w", encoding="utf-8")  # noqa: SIM115 (the child's)
        code = cli.main(argv)
        sys.stderr.flush()
        os._exit(code - 100)  # 43: main returned 143

    status = fork_and_wait(run)
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 43, status
    text = err.read_text()
    kept = out / "attnres_seed0" / "checkpoint"
    assert _resume_printed(text, f"last checkpoint is kept in {kept}: run ", argv), text
    assert text.endswith("hooked-attnres: terminated (SIGTERM)\n"), text
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 3


def test_the_command_line_restores_the_sigterm_handler_it_found(monkeypatch, capsys):
    # only the command line treats SIGTERM as an interrupt, while it runs; the caller's
    # handler is put back after (a library call installs none: test_training)
    import signal

    seen = []

    def callers_handler(signum, frame):
        seen.append(signum)

    def listing(args) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        monkeypatch.setattr(cli, "cmd_list", listing)
        assert cli.main(["list"]) == 0
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen and seen[0] is not callers_handler and callable(seen[0])
    with pytest.raises(cli.Terminated):
        seen[0](signal.SIGTERM, None)


def test_a_sigterm_the_caller_ignores_stays_ignored(monkeypatch, capsys):
    """Review 194: the command replaced an ignored SIGTERM (``trap '' TERM``, a supervisor
    that starts it with SIGTERM ignored) with its own handler, so that SIGTERM, which ran on
    before audit 188, ended the command with 143. An ignored SIGTERM stays ignored, as
    Python leaves an ignored SIGINT to the system (no KeyboardInterrupt)."""
    import signal

    seen = []

    def listing(args) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        signal.raise_signal(signal.SIGTERM)  # ignored: the command runs on
        print("ran on")
        return 0

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        monkeypatch.setattr(cli, "cmd_list", listing)
        code = cli.main(["list"])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "ran on\n", ""), (code, out, err)
    assert seen == [signal.SIG_IGN]


@pytest.mark.parametrize(
    "killed", ["before_the_first_checkpoint", "after_it", "in_the_final_writes"]
)
def test_a_study_refuses_a_finished_run_started_over_and_killed(killed, tmp_path, capsys):
    """Audit 197: ``train --no-resume`` (here with lr 1e-3) into the folder of a finished
    run (lr 5e-4), killed (SIGKILL, in a forked child) before it finished, left the earlier
    run's ``model/`` and ``metrics.json`` beside its own checkpoint, and ``study`` read
    them as the run's without a word (4 of 5 crash points measured; only a kill between
    the final writes, where metrics.json was already removed, was refused): the user
    believes the run retrained at lr 1e-3, the study reads the lr 5e-4 model. Killed after
    its first update, before its first checkpoint (``train_step:1``), the earlier run's
    checkpoint was left too, so nothing said that a new run had started: a run started
    over in a folder holding an earlier model writes a checkpoint of its step 0 first now.
    The study refuses every such folder, naming the checkpoint's run and how to finish it;
    once finished, the run is studied."""
    import signal

    from crash_helpers import KILLED, run_forked

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    assert cli.main(_tiny_train_argv(out)) == 0
    run = out / "attnres_seed0"
    earlier = json.loads((run / "metrics.json").read_text())
    assert earlier["train_config"]["lr"] == 5e-4  # the recipe's
    again = [*_tiny_train_argv(out), "--no-resume", "--set", "lr=1e-3"]

    def started_over() -> None:
        if killed == "in_the_final_writes":  # the final checkpoint is written, model/ not yet

            def removed(path) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            trainer.remove_file = removed
        cli.main(again)

    crash_at = {"before_the_first_checkpoint": "train_step:1", "after_it": "train_step:3"}
    assert run_forked(started_over, crash_at=crash_at.get(killed)) == KILLED
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["train_config"]["lr"] == 1e-3  # the folder says a new run started
    assert json.loads((run / "metrics.json").read_text()) == earlier  # still the earlier run's
    study = _tiny_study_argv(out, tmp_path / "study")
    assert cli.main(study) == 1
    err = capsys.readouterr().err
    progress = f"step {state['step']} of 4"
    assert (
        f"{run} is not studied as it is: {run / 'checkpoint'} (at {progress}) and "
        f"{run / 'metrics.json'} record different runs (train_config.lr: 0.001 vs 0.0005): "
        "either the checkpoint's run was started over"
    ) in err, err
    assert "resume the run (hooked-attnres train --condition attnres --seeds 0 --out" in err, err
    assert cli.main([*_tiny_train_argv(out), "--set", "lr=1e-3"]) == 0  # resumed, finished
    assert json.loads((run / "metrics.json").read_text())["train_config"]["lr"] == 1e-3
    assert cli.main(study) == 0


@pytest.mark.parametrize(
    "first, second", [("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"), ("SIGINT", "SIGINT")]
)
@pytest.mark.parametrize("during", ["inside_update", "interrupt_checkpoint"])
def test_a_second_stop_signal_keeps_the_checkpoint_and_the_first_ones_exit_code(
    first, second, during, tmp_path
):
    """Audit 197: two stop signals (Ctrl-C, SIGTERM; e.g. Ctrl-C pressed twice, or a
    scheduler's SIGTERM after Ctrl-C). Inside an optimizer update both were held and the
    first was delivered: the checkpoint of step 3 was written, exit code the first's. But
    the second arriving while the interrupt's checkpoint was written (no signal was held
    there) aborted that write: the checkpoint stayed at step 2, step 3 was lost, and the
    exit code was the second's (SIGINT then SIGTERM: 143, not 130). The rule now, both
    places: the checkpoint of the step reached is written whole, and the first signal
    decides the exit code and the line said (a later one, while the run stops, is
    dropped; kill -9 still ends it at once, the last checkpoint kept). Steps 4, a
    checkpoint every 2, the first signal at step 3, in a forked child."""
    import signal

    import torch
    from crash_helpers import fork_and_wait

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    err = tmp_path / "stderr.txt"
    signals = [getattr(signal, first), getattr(signal, second)]

    def run() -> None:
        updates: list[int] = []
        original_step, original_save = torch.optim.AdamW.step, trainer._torch_save

        def step(self, *args, **kwargs):
            updates.append(1)
            if during == "inside_update" and len(updates) == 3:
                os.kill(os.getpid(), signals[0])
                os.kill(os.getpid(), signals[1])
            return original_step(self, *args, **kwargs)

        def fault_point(name: str) -> None:
            if during == "interrupt_checkpoint" and name == "train_step" and len(updates) == 3:
                os.kill(os.getpid(), signals[0])

        def torch_save(value, path) -> None:  # the optimizer.pt of the interrupt's checkpoint
            if during == "interrupt_checkpoint" and len(updates) == 3:
                os.kill(os.getpid(), signals[1])
            original_save(value, path)

        torch.optim.AdamW.step = step  # type: ignore[method-assign]
        trainer.fault_point = fault_point
        trainer._torch_save = torch_save
        sys.stderr = open(err, "w", encoding="utf-8")  # noqa: SIM115 (the child's)
        code = cli.main(_tiny_train_argv(out))
        sys.stderr.flush()
        os._exit(code - 100)

    status = fork_and_wait(run)
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) + 100 == 128 + signals[0], status
    text = err.read_text()
    said = "terminated (SIGTERM)" if first == "SIGTERM" else "interrupted"
    assert text.endswith(f"hooked-attnres: {said}\n"), text
    kept = out / "attnres_seed0" / "checkpoint"
    assert _resume_printed(
        text, f"last checkpoint is kept in {kept}: run ", _tiny_train_argv(out)
    ), text
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 3
    # the held second signal is answered (review 207: it said nothing, so it looked lost)
    notice = (
        f"hooked_attnres: {second} received while the interrupted run's checkpoint is "
        "written: the run stops once it is written (Ctrl-\\ or kill -9 ends it at once, "
        "keeping the checkpoint before)\n"
    )
    assert text.count(notice) == (during == "interrupt_checkpoint"), text


def test_a_ctrl_c_while_the_final_checkpoint_is_written_keeps_the_runs_last_steps(tmp_path):
    """Audit 197: Ctrl-C while a finished run's final checkpoint was written aborted that
    write: the checkpoint stayed at the last periodic one (step 2 of 4), so the steps since
    (here 2; up to checkpoint_every - 1) were lost, and the resume trained them again. The
    final checkpoint is written whole now and Ctrl-C is delivered right after it (exit
    130); the same command then writes the model and metrics.json without a step."""
    import signal

    import torch
    from crash_helpers import fork_and_wait

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"

    def run() -> None:
        updates: list[int] = []
        original_step, original_save = torch.optim.AdamW.step, trainer._torch_save

        def step(self, *args, **kwargs):
            updates.append(1)
            return original_step(self, *args, **kwargs)

        def torch_save(value, path) -> None:
            if len(updates) == 4:  # the final checkpoint's optimizer.pt
                os.kill(os.getpid(), signal.SIGINT)
            original_save(value, path)

        torch.optim.AdamW.step = step  # type: ignore[method-assign]
        trainer._torch_save = torch_save
        sys.stderr = open(err, "w", encoding="utf-8")  # noqa: SIM115 (the child's)
        code = cli.main(_tiny_train_argv(out))
        sys.stderr.flush()
        os._exit(code - 100)

    err = tmp_path / "stderr.txt"
    status = fork_and_wait(run)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 30, status  # main returned 130
    assert (
        "hooked_attnres: SIGINT received while the final checkpoint is written: the run stops "
        "once it is written (Ctrl-\\ or kill -9 ends it at once, keeping the checkpoint before)"
        in err.read_text()
    ), err.read_text()
    run_folder = out / "attnres_seed0"
    assert json.loads((run_folder / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (run_folder / "model").exists()
    steps: list[int] = []
    original = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = counted  # type: ignore[method-assign]
    try:
        assert cli.main(_tiny_train_argv(out)) == 0
    finally:
        torch.optim.AdamW.step = original  # type: ignore[method-assign]
    assert steps == []  # nothing trained again
    assert json.loads((run_folder / "metrics.json").read_text())["step"] == 4


@pytest.mark.parametrize("stopped_by", ["a full disk", "Ctrl-C"])
def test_a_run_started_over_that_wrote_no_checkpoint_says_the_folder_holds_the_earlier_run(
    stopped_by, tmp_path, monkeypatch, capsys
):
    """Review 207: ``train --no-resume --set lr=1e-3`` over a finished lr 5e-4 run, stopped
    while its step-0 checkpoint was written (a full disk: ENOSPC from the write of its
    optimizer.pt; or Ctrl-C), wrote no checkpoint: the folder still held the earlier run,
    checkpoint included. The command said `run the command without --no-resume again to
    resume`, which was then refused (``train_config.lr differs``). It says now that the
    folder still holds the earlier run and to run the same command again, which then starts
    the run over and finishes it."""
    import errno

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    assert cli.main(_tiny_train_argv(out)) == 0
    run = out / "attnres_seed0"
    earlier = {name: (run / name).read_bytes() for name in ("metrics.json",)}
    earlier_state = (run / "checkpoint" / "trainer_state.json").read_bytes()
    again = [*_tiny_train_argv(out), "--no-resume", "--set", "lr=1e-3"]
    original_save = trainer._torch_save

    def failing(value, path) -> None:  # the step-0 checkpoint's optimizer.pt
        if stopped_by == "a full disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_torch_save", failing)
    capsys.readouterr()
    assert cli.main(again) == (1 if stopped_by == "a full disk" else 130)
    err = capsys.readouterr().err
    assert (run / "checkpoint" / "trainer_state.json").read_bytes() == earlier_state
    assert (run / "metrics.json").read_bytes() == earlier["metrics.json"]
    cause = "fix the cause and " if stopped_by == "a full disk" else ""
    assert (
        f"attnres seed 0 stopped before it wrote a checkpoint: {run} still holds the earlier "
        f"run, as it was (its checkpoint at step 4 of 4); {cause}run the same command again "
        "to start it over"
    ) in err, err
    assert "without --no-resume" not in err, err
    monkeypatch.setattr(trainer, "_torch_save", original_save)
    assert cli.main(again) == 0  # the same command: started over and finished
    assert json.loads((run / "metrics.json").read_text())["train_config"]["lr"] == 1e-3


@pytest.mark.parametrize("stopped_by", ["Ctrl-C", "a full disk", "a full disk at its first save"])
def test_a_stopped_train_no_resume_of_several_runs_names_what_each_run_needs(
    stopped_by, tmp_path, monkeypatch, capsys
):
    """Audit 218: ``train --no-resume`` of several runs (``--condition both --seeds 0 1 2``
    over finished runs, now with lr 1e-3), stopped in its third run, said to run "the
    command without --no-resume" again (or "the same command"): the same command restarted
    the runs it had finished, and without --no-resume it left the runs not yet started
    with the earlier lr 5e-4 run (resumed as finished, or refused). It lists each run's
    state and prints the commands that finish them: the stopped run resumed if it holds
    this command's checkpoint (Ctrl-C at step 3 writes one of step 3; a full disk at step 3
    keeps the step-2 one), else started over, as are the runs not started; the finished
    ones are not named. Run, those commands train exactly those runs, and every run ends
    with lr 1e-3."""
    import errno

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    argv = _tiny_train_argv(out)
    argv[argv.index("attnres")] = "both"
    argv += ["--seeds", "0", "1", "2"]
    assert cli.main(argv) == 0
    again = [*argv, "--no-resume", "--set", "lr=1e-3"]
    # the third run of the command is (attnres, seed 1): stopped at its step 3, or at its
    # first save (each run started over saves thrice: step 0, step 2 and its end)
    calls = {"train_step": 0, "save": 0}
    original_save = trainer._torch_save

    def stop(reason: str) -> None:
        if stopped_by == "Ctrl-C":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    def step(name: str) -> None:
        calls["train_step"] += 1
        if calls["train_step"] == 2 * 4 + 3 and stopped_by != "a full disk at its first save":
            stop(name)

    def save(value, path) -> None:
        calls["save"] += 1
        if calls["save"] == 2 * 3 + 1 and stopped_by == "a full disk at its first save":
            stop("save")
        original_save(value, path)

    monkeypatch.setattr(trainer, "fault_point", step)
    monkeypatch.setattr(trainer, "_torch_save", save)
    capsys.readouterr()
    assert cli.main(again) == (130 if stopped_by == "Ctrl-C" else 1)
    err = capsys.readouterr().err
    monkeypatch.undo()
    finished = {
        r: (out / f"{r}_seed0" / "metrics.json").read_bytes() for r in ("attnres", "vanilla")
    }
    for condition in ("attnres", "vanilla"):
        assert json.loads(finished[condition])["train_config"]["lr"] == 1e-3
    stopped = out / "attnres_seed1"
    kept = stopped_by != "a full disk at its first save"
    state = json.loads((stopped / "checkpoint" / "trainer_state.json").read_text())
    assert state["train_config"]["lr"] == (1e-3 if kept else 5e-4), state["train_config"]
    lines = [line.strip() for line in err.splitlines()]
    assert "attnres seed 0 finished in this command: nothing" in lines, err
    assert "vanilla seed 0 finished in this command: nothing" in lines, err
    if kept:
        at = 3 if stopped_by == "Ctrl-C" else 2
        assert state["step"] == at
        assert (
            f"attnres seed 1 stopped; its last checkpoint is kept in {stopped / 'checkpoint'} "
            f"(at step {at} of 4, written by this command): resume it (without --no-resume)"
        ) in lines, err
    else:
        assert (
            f"attnres seed 1 stopped before it wrote a checkpoint: {stopped} still holds the "
            "earlier run, as it was (its checkpoint at step 4 of 4); start it over (--no-resume)"
        ) in lines, err
    for condition, seed in (("vanilla", 1), ("attnres", 2), ("vanilla", 2)):
        assert (
            f"{condition} seed {seed} not started: {out / f'{condition}_seed{seed}'} still "
            "holds the earlier run, as it was (its checkpoint at step 4 of 4); start it over "
            "(--no-resume)"
        ) in lines, err
    cause = "" if stopped_by == "Ctrl-C" else "fix the cause and "
    trained = _finish_as_printed(err, cause, monkeypatch)
    first = [("attnres", 1, True)] if kept else [("attnres", 1, False)]
    assert trained == first + [("vanilla", 1, False), ("attnres", 2, False), ("vanilla", 2, False)]
    for condition in ("attnres", "vanilla"):  # the finished runs are as they were
        assert (out / f"{condition}_seed0" / "metrics.json").read_bytes() == finished[condition]
        for seed in (1, 2):
            metrics = json.loads((out / f"{condition}_seed{seed}" / "metrics.json").read_text())
            assert (metrics["train_config"]["lr"], metrics["step"]) == (1e-3, 4), (condition, seed)


def _finish_as_printed(
    err: str, cause: str, monkeypatch, whose: str = "runs"
) -> list[tuple[str, int, bool]]:
    """Run the commands a ``train --no-resume`` of several runs printed on stderr ``err``
    after ``to finish this command's {whose}, {cause}run:``, read by a POSIX shell
    (`shlex.split`), each ending with 0; the runs they trained, ``(condition, seed,
    resume)`` in order."""
    lines = [line.strip() for line in err.splitlines()]
    header = f"[hooked-attnres] to finish this command's {whose}, {cause}run:"
    assert header in lines, err
    after = lines[lines.index(header) + 1 :]
    printed = [line for line in after if line.startswith("hooked-attnres train ")]
    return _run_printed(printed, monkeypatch)


def _run_printed(printed: list[str], monkeypatch) -> list[tuple[str, int, bool]]:
    """Run the ``train`` commands ``printed``, read by a POSIX shell (`shlex.split`), each
    ending with 0; the runs they trained, ``(condition, seed, resume)`` in order."""
    import shlex

    from hooked_attnres import study

    trained = []
    original_train = study.train_condition

    def recorded(condition, seed, out_dir, resume=True, **kwargs):
        trained.append((condition, seed, resume))
        return original_train(condition, seed, out_dir, resume=resume, **kwargs)

    monkeypatch.setattr(study, "train_condition", recorded)
    for command in map(shlex.split, printed):
        assert command[:2] == ["hooked-attnres", "train"], command
        assert cli.main(command[1:]) == 0, command
    monkeypatch.setattr(study, "train_condition", original_train)
    return trained


@pytest.mark.parametrize("ending", ["refused", "an error", "diverged", "summary not written"])
def test_every_ending_of_a_train_no_resume_of_several_runs_names_what_each_run_needs(
    ending, tmp_path, monkeypatch, capsys
):
    """Audit 226: ``train --no-resume`` of several runs listed each run's state and the
    commands that finish them (audit 218) only when stopped by Ctrl-C, SIGTERM or an error
    of the machine. Ended in its second run (``--seeds 0 1 2`` over finished runs, now
    with lr 1e-3) by a refusal of the run's folder (a file appeared in its model/), another
    error in the run (at step 3), a divergence (a weight made NaN at step 3) or a failed
    write of train_summary.json after the run, it said only the error: which runs had
    finished, and that the same command would train them again, was not said. Each ending
    lists them now, before the error (still reported, exit code 1): the refused run started
    over, the run stopped by an error resumed from the checkpoint this command wrote, the
    run the summary does not list resumed (which lists it); the runs not started started
    over. Run, those commands train exactly those runs, every run ends with lr 1e-3, and
    the summary lists each run's final accuracy. The diverged run was started over in the
    command of the runs not started, "with settings that do not diverge", which that
    command repeated (review 234): it is said to diverge again with them (at its step 3)
    and that only all of the condition's seeds may change them, with no command for it;
    the command printed for "this command's other runs" trains the run not started."""
    import errno

    import torch

    from hooked_attnres import _atomic, study
    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    argv = [*_tiny_train_argv(out), "--seeds", "0", "1", "2"]
    assert cli.main(argv) == 0
    again = [*argv, "--no-resume", "--set", "lr=1e-3"]
    second = out / "attnres_seed1"
    foreign = second / "model" / "notes.txt"  # a file the trainer did not write
    calls = {"train_step": 0, "summary": 0}
    models = []
    original_train, original_logits = study.train_condition, trainer.model_logits
    original_write = _atomic.write_text_atomic

    def train_condition(condition, seed, out_dir, **kwargs):
        if seed == 1 and ending == "refused":  # e.g. another process wrote there meanwhile
            foreign.write_text("mine\n")
        return original_train(condition, seed, out_dir, **kwargs)

    def model_logits(model, tokens):
        models.append(model)
        return original_logits(model, tokens)

    def step(name: str) -> None:
        calls["train_step"] += 1
        if calls["train_step"] == 4 + 3:  # the second run's step 3
            if ending == "an error":
                raise ValueError("an error at step 3")
            if ending == "diverged":
                with torch.no_grad():
                    next(models[-1].parameters()).fill_(float("nan"))

    def write_text_atomic(path, text):
        if Path(path).name == "train_summary.json":
            calls["summary"] += 1
            if calls["summary"] == 2 and ending == "summary not written":
                raise OSError(errno.ENOSPC, "No space left on device")
        return original_write(path, text)

    monkeypatch.setattr(study, "train_condition", train_condition)
    monkeypatch.setattr(trainer, "model_logits", model_logits)
    monkeypatch.setattr(trainer, "fault_point", step)
    monkeypatch.setattr(_atomic, "write_text_atomic", write_text_atomic)
    capsys.readouterr()
    assert cli.main(again) == 1
    err = capsys.readouterr().err
    monkeypatch.undo()
    error = {
        "refused": f"{foreign.name}",
        "an error": "an error at step 3 (ValueError;",
        "diverged": "is not finite after step 3",
        "summary not written": "No space left on device (OSError;",
    }[ending]
    lines = [line.strip() for line in err.splitlines()]
    said = [line for line in lines if line.startswith("hooked-attnres: error:")]
    assert len(said) == 1 and error in said[0] and lines[-1] == said[0], err
    if ending == "diverged":
        assert "(TrainingDivergedError;" in said[0], err
    earlier = "still holds the earlier run, as it was (its checkpoint at step 4 of 4)"
    summary = out / "train_summary.json"
    assert lines[lines.index("[hooked-attnres] this command's runs and what each needs:") :][
        1:4
    ] == [
        "attnres seed 0 finished in this command: nothing",
        {
            "refused": f"attnres seed 1 stopped before it wrote a checkpoint: {second} "
            f"{earlier}; start it over (--no-resume)",
            "an error": f"attnres seed 1 stopped; its last checkpoint is kept in "
            f"{second / 'checkpoint'} (at step 2 of 4, written by this command): resume it "
            "(without --no-resume)",
            "diverged": "attnres seed 1 diverged at step 3 with these settings (the error "
            "below): training is deterministic, so resumed or started over with them it "
            "diverges again at that step, and changing this seed's settings alone after seeing "
            "it diverge breaks the study's pre-registration (settings are fixed before results "
            "are seen): report it as diverged, or train every seed of attnres again with new "
            "settings",
            "summary not written": f"attnres seed 1 finished in this command, but {summary} "
            "does not list it (the command ended before it was written): resume it (without "
            "--no-resume), which lists it",
        }[ending],
        f"attnres seed 2 not started: {out / 'attnres_seed2'} {earlier}; start it over "
        "(--no-resume)",
    ], err
    finished = (out / "attnres_seed0" / "metrics.json").read_bytes()
    foreign.unlink(missing_ok=True)  # the cause fixed
    if ending == "diverged":  # no command for it: only the run not started is trained
        assert _finish_as_printed(err, "", monkeypatch, "other runs") == [("attnres", 2, False)]
        state = json.loads((second / "checkpoint" / "trainer_state.json").read_text())
        assert (state["train_config"]["lr"], state["step"]) == (1e-3, 2)  # its last good one
        assert json.loads((second / "metrics.json").read_text())["train_config"]["lr"] == 5e-4
        for seed in (0, 2):
            metrics = json.loads((out / f"attnres_seed{seed}" / "metrics.json").read_text())
            assert (metrics["train_config"]["lr"], metrics["step"]) == (1e-3, 4), seed
        assert (out / "attnres_seed0" / "metrics.json").read_bytes() == finished
        return
    trained = _finish_as_printed(err, "fix the cause and ", monkeypatch)
    resumed = ending in ("an error", "summary not written")
    assert trained == [("attnres", 1, resumed), ("attnres", 2, False)]
    assert (out / "attnres_seed0" / "metrics.json").read_bytes() == finished
    rows = {row["seed"]: row for row in json.loads(summary.read_text())}
    assert sorted(rows) == [0, 1, 2]
    for seed in (0, 1, 2):
        metrics = json.loads((out / f"attnres_seed{seed}" / "metrics.json").read_text())
        assert (metrics["train_config"]["lr"], metrics["step"]) == (1e-3, 4), seed
        assert rows[seed]["accuracy"] == metrics["final_accuracy"], seed


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_train_lists_its_runs_leaves_the_list_whole(
    signum, tmp_path, monkeypatch
):
    """``train --no-resume`` of several runs ended by an error in its second run lists each
    run and the commands that finish them (`_print_how_to_finish`). A Ctrl-C (or SIGTERM)
    while that list was printed, e.g. pressed again by someone waiting for the command to
    end, cut it at that line and replaced the error (exit code 130, no error line): here
    at its header, the runs and the commands went unprinted, and the same command again
    trains the finished run over. The list is printed whole now, the signal dropped (the
    command is ending already), and the error reported as before (exit code 1); its
    commands, run, train exactly the runs left."""
    import signal

    from hooked_attnres import study
    from hooked_attnres.training import TrainResult

    failing = {"seed": 1}

    def fake_train(condition, seed, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        if seed == failing["seed"]:
            raise ValueError(f"an error in seed {seed}")
        return TrainResult(out_dir, out_dir / "model", 5, {"retrieval": 0.5}, 2.0)

    header = "this command's runs and what each needs"
    sent: list[str] = []
    said: list[str] = []

    class SignalAtTheList:  # stderr, a stop signal received as the list starts
        def write(self, text: str) -> int:
            said.append(text)
            if header in text and not sent:
                sent.append(signum)
                signal.raise_signal(getattr(signal, signum))
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(study, "train_condition", fake_train)
    monkeypatch.setattr(sys, "stderr", SignalAtTheList())
    argv = ["train", "--condition", "attnres", "--seeds", "0", "1", "2", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress", "--no-resume"]) == 1
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert sent == [signum]
    err = "".join(said)
    lines = [line.strip() for line in err.splitlines()]
    assert lines[-1].startswith("hooked-attnres: error: an error in seed 1 (ValueError;"), err
    assert "attnres seed 0 finished in this command: nothing" in lines, err
    failing["seed"] = None  # the cause fixed
    trained = _finish_as_printed(err, "fix the cause and ", monkeypatch)
    assert trained == [("attnres", 1, False), ("attnres", 2, False)]


@pytest.mark.parametrize("no_resume", [True, False])
@pytest.mark.parametrize("seeds", [["0"], ["0", "1", "2"]])
def test_the_resume_a_stopped_train_prints_keeps_its_thread_count(
    seeds, no_resume, tmp_path, monkeypatch, capsys
):
    """``train`` stopped with its checkpoint kept prints the command that resumes the run
    (one run: `...: run` it `to resume`; several with --no-resume: in the list of commands
    that finish them). Without --threads the run trains with the machine's default, the
    free cores (OMP_NUM_THREADS here), which changes with the load; a resume with another
    default was refused (the checkpoint "was written with 1 threads ... this run has 2":
    another count moves float sums). With --no-resume the printed command names the
    checkpoint's count, ``--threads 1``, since review 231; without it the command said
    "run the same command again to resume", refused so, until review 234: it prints the
    commands now, the stopped run's with its count. Run with a default of 2, they resume
    the stopped run, which ends as an uninterrupted run of 1 thread does (metrics.json
    equal, but for the seconds), and train the run not started (on the default, 2)."""
    from hooked_attnres.training import trainer

    def train_argv(out: Path) -> list[str]:
        argv = [*_tiny_train_argv(out), "--seeds", *seeds]
        del argv[argv.index("--threads") : argv.index("--threads") + 2]  # the default
        return argv

    out = tmp_path / "runs"
    argv = train_argv(out)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(train_argv(tmp_path / "uninterrupted")) == 0
    stopped = min(1, len(seeds) - 1)  # the second run, if there are several
    calls = {"train_step": 0}

    def step(name: str) -> None:
        calls["train_step"] += 1
        if calls["train_step"] == 4 * stopped + 3:  # its step 3
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fault_point", step)
    capsys.readouterr()
    assert cli.main([*argv, "--no-resume"] if no_resume else argv) == 130
    err = capsys.readouterr().err
    monkeypatch.setattr(trainer, "fault_point", lambda name: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the machine's load changed
    if no_resume and len(seeds) > 1:
        trained = _finish_as_printed(err, "", monkeypatch)
    else:  # the commands of the line that says the run stopped
        line = next(line for line in err.splitlines() if "last checkpoint is kept in" in line)
        trained = _run_printed(line.split("`")[1::2], monkeypatch)
    later = [("attnres", int(seed), not no_resume) for seed in seeds[stopped + 1 :]]
    assert trained == [("attnres", stopped, True), *later], err
    metrics, uninterrupted = (
        {
            k: v
            for k, v in json.loads(
                (root / f"attnres_seed{stopped}" / "metrics.json").read_text()
            ).items()
            if k != "seconds"
        }
        for root in (out, tmp_path / "uninterrupted")
    )
    assert metrics == uninterrupted
    assert metrics["environment"]["threads"] == 1
    for _, seed, _ in later:
        metrics = json.loads((out / f"attnres_seed{seed}" / "metrics.json").read_text())
        assert (metrics["step"], metrics["environment"]["threads"]) == (4, 2)


def test_the_command_a_study_quotes_to_finish_a_run_keeps_its_thread_count(
    tmp_path, monkeypatch, capsys
):
    """The study refuses a run stopped before its model was written and quotes the
    ``train`` command that finishes it (`finish_command`: for the original two recipes,
    "with the --steps / --set / --task-arg options it was started with"). Trained without
    --threads (the default, the free cores: 1 here), that command, given those options, was
    refused under another default ("was written with 1 threads ... this run has 2"):
    it names the checkpoint's count now (review 234), and the run it finishes equals an
    uninterrupted one (metrics.json, but the seconds)."""
    import shlex

    from hooked_attnres.training import trainer

    def train_argv(out: Path) -> list[str]:
        argv = _tiny_train_argv(out)
        del argv[argv.index("--threads") : argv.index("--threads") + 2]  # the default
        return argv

    out = tmp_path / "runs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(train_argv(tmp_path / "uninterrupted")) == 0

    def step(name: str) -> None:
        raise KeyboardInterrupt  # after its first step: the checkpoint of step 1 is written

    monkeypatch.setattr(trainer, "fault_point", step)
    assert cli.main(train_argv(out)) == 130
    monkeypatch.setattr(trainer, "fault_point", lambda name: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the machine's load changed
    capsys.readouterr()
    assert cli.main(_tiny_study_argv(out, tmp_path / "study")) == 1
    err = capsys.readouterr().err
    assert "holds an unfinished training run (step 1 of 4, no model/)" in err, err
    quoted = err.split("finish it (", 1)[1]
    command = shlex.split(quoted.split(", with the --steps / --set / --task-arg options", 1)[0])
    assert command[:2] == ["hooked-attnres", "train"], err
    started = train_argv(out)  # the options it was started with: those after --out
    options = started[started.index("--out") + 2 :]
    assert cli.main([*command[1:], *options]) == 0, command
    metrics, uninterrupted = (
        {
            k: v
            for k, v in json.loads((root / "attnres_seed0" / "metrics.json").read_text()).items()
            if k != "seconds"
        }
        for root in (out, tmp_path / "uninterrupted")
    )
    assert metrics == uninterrupted
    assert metrics["environment"]["threads"] == 1


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize("broken", ["truncated", "without its step"])
def test_a_finished_run_whose_checkpoint_state_is_unreadable_is_named_as_such(
    broken, sealed, tmp_path, capsys
):
    """Review 207: a finished run whose ``checkpoint/trainer_state.json`` cannot be read
    (truncated) was refused by the study as ``its model/ and metrics.json are an earlier
    finished run's, not the run its checkpoint holds (a checkpoint whose trainer_state.json
    cannot be read ...)``, and ``info`` said the model was an earlier run's: both claims
    unestablished (here false: model/ and metrics.json are the run's), and the remedy it
    named (resume the run) fails on that file. The refusal is a `CheckpointError` naming
    the file now (the reader's, `_read_saved`, as a resume says it), and ``info`` notes it;
    with the checkpoint's completion marker in place (``sealed``), the file is found
    changed after its save first (audit 218), as a resume finds it."""
    from helpers import unseal

    out = tmp_path / "runs"
    assert cli.main(_tiny_train_argv(out)) == 0
    run = out / "attnres_seed0"
    state = run / "checkpoint" / "trainer_state.json"
    if broken == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        expected = f"could not read {state}: the file is truncated or corrupt (JSONDecodeError"
    else:
        kept = json.loads(state.read_text())
        del kept["step"]
        state.write_text(json.dumps(kept))
        expected = f"{state} records no step of steps (KeyError: 'step'), so the run it holds"
    if sealed:
        expected = f"{run / 'checkpoint'} was changed after it was saved: trainer_state.json has"
    else:
        unseal(run / "checkpoint")
    capsys.readouterr()
    study = _tiny_study_argv(out, tmp_path / "study")
    assert cli.main(study) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert "earlier finished run's" not in err, err
    assert cli.main(["info", str(run / "model")]) == 0
    said = capsys.readouterr().out
    assert f"note: {expected}" in said, said
    assert "earlier finished run's" not in said, said


@pytest.mark.parametrize(
    "changed", ["trainer_state.json", "unsealed trainer_state.json", "metrics.json"]
)
def test_a_run_file_changed_after_its_write_is_not_called_another_run(changed, tmp_path, capsys):
    """Audit 218: one digit of a recorded loss changed in a finished run's
    ``checkpoint/trainer_state.json`` (still valid JSON) made the study refuse the run, and
    ``info`` note it, as "another run" than metrics.json's, its model/ an earlier finished
    run's: untrue. The checkpoint's completion marker records the file's SHA-256, so the
    change is named as such (as a resume names it). What nothing records a digest of,
    metrics.json (and trainer_state.json of a checkpoint without a marker), cannot be told
    from another run: the message says both, where the two records first differ, and what
    to do in each case; followed for a changed metrics.json (resume the run), the run is
    studied again with its own history."""
    from helpers import unseal

    out = tmp_path / "runs"
    assert cli.main(_tiny_train_argv(out)) == 0
    run = out / "attnres_seed0"
    checkpoint = run / "checkpoint"
    path = run / "metrics.json" if changed == "metrics.json" else checkpoint / "trainer_state.json"
    original = json.loads(path.read_text())["history"][1]["loss"]
    text = path.read_text()
    at = text.index(f'"loss": {original!r}') + len('"loss": ') + 2  # the first decimal
    path.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :])
    now = json.loads(path.read_text())["history"][1]["loss"]
    assert now != original and len(path.read_text()) == len(text)
    if changed == "unsealed trainer_state.json":
        unseal(checkpoint)
    study = _tiny_study_argv(out, tmp_path / "study")
    err, note = _study_refusal_and_info(study, run, capsys)
    if changed == "trainer_state.json":
        expected = f"{checkpoint} was changed after it was saved: trainer_state.json has SHA-256"
        for said in (err, note):
            assert expected in said, said
            assert "record different runs" not in said and "earlier finished" not in said, said
        return
    saved, finished = (now, original) if "trainer_state" in changed else (original, now)
    differ = (
        f"{checkpoint} (at step 4 of 4) and {run / 'metrics.json'} record different runs "
        f"(history[1].loss: {saved!r} vs {finished!r}): either the checkpoint's run was "
        "started over"
    )
    if changed == "metrics.json":
        could_be = (
            "or metrics.json was changed after it was written (trainer_state.json matches the "
            "SHA-256 its checkpoint recorded, but no digest of metrics.json is kept, so the "
            "two cannot be told apart); in either case resume the run"
        )
    else:
        could_be = (
            "or metrics.json or trainer_state.json was changed after it was written (the "
            "checkpoint records no digest of trainer_state.json"
        )
    for said in (err, note):
        assert differ in said and could_be in said, said
    if changed == "metrics.json":  # resumed, the run writes its metrics.json again
        assert cli.main(_tiny_train_argv(out)) == 0
        assert json.loads(path.read_text())["history"][1]["loss"] == original
        assert cli.main(study) == 0
    else:
        restore = f"if trainer_state.json changed, restore {checkpoint} from a backup"
        assert restore in err and restore in note, (err, note)


@pytest.mark.parametrize("damage", ["cut short", "a byte not UTF-8"])
@pytest.mark.parametrize("checkpoint", ["beside it", "none"])
def test_a_truncated_metrics_json_is_named_with_what_to_do(checkpoint, damage, tmp_path, capsys):
    """Review 222: a run's ``metrics.json`` cut short (a copy or a disk that failed made the
    study end in ``error: Unterminated string starting at: line 13 column 5 (char 199)
    (JSONDecodeError ...)``, naming neither the file nor a remedy, and ``info`` of its
    model left out its note on the run folder without a word. Both name the file now, and
    what to do: with the run's checkpoint beside it, resume the run, which writes it again
    (followed here: the study then runs); without one, restore it or train the run again.
    Audit 225: one byte that is no UTF-8 (0xff) still ended the study in a bare
    ``'utf-8' codec can't decode byte 0xff in position 40 (UnicodeDecodeError)`` and left
    ``info``'s note out: the file was decoded before the check that names it."""
    import shutil

    out = tmp_path / "runs"
    assert cli.main(_tiny_train_argv(out)) == 0
    run = out / "attnres_seed0"
    metrics = run / "metrics.json"
    whole = metrics.read_text()
    if damage == "cut short":
        metrics.write_text(whole[: len(whole) // 2])
        error = "JSONDecodeError"
    else:
        metrics.write_bytes(whole[:40].encode() + b"\xff" + whole[41:].encode())
        error = "UnicodeDecodeError"
    if checkpoint == "none":
        shutil.rmtree(run / "checkpoint")
    study = _tiny_study_argv(out, tmp_path / "study")
    err, note = _study_refusal_and_info(study, run, capsys)
    named = f"could not read {metrics}: the file is truncated or corrupt ({error}: "
    if checkpoint == "beside it":
        remedies = {
            err: "resume the run (hooked-attnres train --condition attnres --seeds 0 --out "
            f"{out} --threads 1, with the --steps / --set / --task-arg options it was started "
            "with",
            note: "resume the run (the train command without --no-resume, with --threads 1), "
            "which writes model/ and metrics.json from the checkpoint",
        }
    else:
        remedy = (
            f"no checkpoint of the run is beside it to write it again from: restore it from a "
            f"backup (a shipped run's: reinstall hooked-attnres), or move {run} away and train "
            "the run again"
        )
        remedies = {err: remedy, note: remedy}
    for said, remedy in remedies.items():
        assert named in said and remedy in said, said
    if checkpoint == "beside it":  # followed: the run's checkpoint writes it again
        assert cli.main(_tiny_train_argv(out)) == 0
        assert json.loads(metrics.read_text())["history"] == json.loads(whole)["history"]
        assert cli.main(study) == 0


@pytest.mark.parametrize("out", ["-runs", "my runs"])
def test_the_commands_a_stopped_train_prints_read_back_as_the_runs_left(out, tmp_path, monkeypatch):
    """Review 222: the commands `train --no-resume` prints when stopped in one of several
    runs (`_print_how_to_finish`), read by a POSIX shell (`shlex.split`) and the command
    line's parser, give back the command's options (a --task-arg text with a space and
    quotes, --set, --steps, --threads, --no-progress) and train exactly the runs left, for
    every run it can stop in, however it ends there (audit 226: its checkpoint kept or not,
    diverged, not started, finished and not listed; a diverged run by none since review
    234: its settings diverge again). A folder named with a leading
    dash (``--out=-runs``) was printed ``--out -runs``, which the parser refuses (argument
    --out: expected one argument): it is printed ``--out=-runs`` now."""
    import contextlib
    import io
    import shlex

    from hooked_attnres.training import TrainingDivergedError

    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    argv = ["train", "--condition", "both", "--seeds", "2", "0", f"--out={out}", "--steps", "4"]
    argv += ["--set", "lr=1e-3", "--task-arg", "name=probe x", 'key="it\'s"', "--threads", "1"]
    args = parser.parse_args([*argv, "--no-progress", "--no-resume"])
    runs = [(condition, seed) for seed in (2, 0) for condition in ("attnres", "vanilla")]
    for stopped in range(len(runs)):
        for ending in ("kept", "stopped", "diverged", "not started", "unlisted"):
            said = io.StringIO()
            with contextlib.redirect_stderr(said):
                error = (
                    TrainingDivergedError("the training loss is nan at step 3", 3)
                    if ending == "diverged"
                    else OSError("a full disk")
                )
                cli._print_how_to_finish(args, runs, stopped, ending, error)
            commands = [
                shlex.split(line) for line in said.getvalue().splitlines()
                if line.strip().startswith("hooked-attnres train")
            ]  # fmt: skip
            trained = []
            for words in commands:
                assert words[:2] == ["hooked-attnres", "train"], words
                again = parser.parse_args(words[1:])
                for option in ("out", "steps", "set", "task_arg", "threads", "no_progress"):
                    assert getattr(again, option) == getattr(args, option), (option, words)
                conditions = cli._conditions(again.condition)
                trained += [(c, s, again.no_resume) for s in again.seeds for c in conditions]
            left = [(c, s, True) for c, s in runs[stopped:]]
            if ending in ("kept", "unlisted"):
                left[0] = (*runs[stopped], False)  # resumed (a finished run: to list it)
            if ending == "diverged":  # no command: resumed or started over, it diverges again
                del left[0]
            assert sorted(trained) == sorted(left), (stopped, ending, commands)


@pytest.mark.parametrize("folder", ["-runs", "my runs"])
def test_the_train_command_a_missing_run_names_reads_back_as_that_run(
    folder, tmp_path, monkeypatch
):
    """Audit 225: `checkpoint_dir` of a run not trained under ``checkpoints`` said "train it
    with `hooked-attnres train --condition vanilla --seeds 1 --out my runs`", written by
    hand beside `train_command` (review 222), so unquoted: a shell splits ``my runs`` into
    two arguments (the parser refuses ``runs``), and ``--out -runs`` is refused (expected
    one argument). Read back by `shlex.split` and the parser, it gives the run."""
    import shlex

    from hooked_attnres.study.checkpoints import checkpoint_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint; train it with `") as info:
        checkpoint_dir("vanilla", 1, folder)
    words = shlex.split(str(info.value).split("`")[1])
    assert words[:2] == ["hooked-attnres", "train"], words
    args = cli.build_parser().parse_args(words[1:])
    assert (args.condition, args.seeds, args.out, args.no_resume) == (
        ["vanilla"],
        [1],
        folder,
        False,
    )


@pytest.mark.parametrize("folder", ["-runs", "my runs"])
def test_the_study_command_train_ends_with_reads_back_as_its_folder(
    folder, tmp_path, monkeypatch, capsys
):
    """Audit 225: ``train`` ends with "run the study on these with `hooked-attnres study
    --checkpoints my runs`", unquoted: a shell splits the folder (the parser refuses
    ``runs``), and ``--checkpoints -runs`` is refused (expected one argument). Read back by
    `shlex.split` and the parser, it names the folder trained into."""
    import shlex

    monkeypatch.chdir(tmp_path)
    argv = _tiny_train_argv(Path("x"))
    argv[argv.index("--out") + 1] = f"--out={folder}"
    argv.remove("--out")
    capsys.readouterr()
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(line.split("`")[1])
    assert words[:2] == ["hooked-attnres", "study"], line
    assert cli.build_parser().parse_args(words[1:]).checkpoints == folder, line


# A sitecustomize (found first on PYTHONPATH) that makes the command line's import wait:
# the import of ``hooked_attnres._study_limits``, which `hooked_attnres.cli` imports at its
# top, says so on stderr and sleeps, so that a SIGINT lands inside the module's import
SLOW_IMPORT = """
import sys, time

class SlowImport:
    def find_spec(self, name, path=None, target=None):
        if name == "hooked_attnres._study_limits":
            sys.stderr.write("importing the command line\\n")
            sys.stderr.flush()
            time.sleep(30)
        return None

sys.meta_path.insert(0, SlowImport())
"""


def _console_script() -> str:
    """What the ``hooked-attnres`` script pip writes from pyproject.toml runs: its entry
    point ``module:function`` imported, then called (read here from pyproject.toml)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, function = re.search(r'^hooked-attnres = "([\w.]+):(\w+)"$', text, re.M).groups()
    return f"import sys\nfrom {module} import {function}\nsys.exit({function}())"


def _entry_point_run(tmp_path, sitecustomize: str, how: str) -> tuple[list[str], dict]:
    """``(command, env)`` that runs ``hooked-attnres list`` through the entry point ``how``
    names ("the console script" or ``python -m``), with ``sitecustomize`` (its text) on
    the child's path."""
    (tmp_path / "sitecustomize.py").write_text(sitecustomize)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    if how == "the console script":
        command = [sys.executable, "-c", _console_script(), "list"]
    else:
        command = [sys.executable, "-m", "hooked_attnres", "list"]
    return command, env


@pytest.mark.parametrize("how", ["the console script", "python -m hooked_attnres"])
def test_ctrl_c_while_the_command_line_is_imported_exits_130_without_a_traceback(how, tmp_path):
    """Audit 229: Ctrl-C in the first moments of a command, while Python imports the
    command line (before `main` runs and handles Ctrl-C; the first ~25 ms of
    ``hooked-attnres info``, 3 of 3 SIGINTs at 5-20 ms), ended in a ``KeyboardInterrupt``
    traceback with exit code 1 or -2, not the one line and 130 of every later moment; and
    ``python -m hooked_attnres`` did not run (no ``__main__``). The import is made to wait
    here (`SLOW_IMPORT`) and SIGINT sent once it does, so the moment is the same each run."""
    import signal

    command, env = _entry_point_run(tmp_path, SLOW_IMPORT, how)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert process.stderr.readline() == "importing the command line\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert (process.returncode, out, err) == (130, "", "hooked-attnres: interrupted\n")


# A sitecustomize that makes the command line's `main` raise SIGTERM's `Terminated` outside
# its own handling (as SIGTERM landing after that handling is left, or while it prints):
# the module is imported as it is, then its `main` replaced
TERMINATED_OUTSIDE_MAIN = """
import importlib.machinery, sys

class Patch:
    def find_spec(self, name, path=None, target=None):
        if name != "hooked_attnres.cli":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def main(argv=None):
                raise module.Terminated

            module.main = main

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Patch())
"""


@pytest.mark.parametrize("how", ["the console script", "python -m hooked_attnres"])
def test_sigterm_outside_mains_handling_exits_143_with_its_own_line(how, tmp_path):
    """Review 230: the entry point's Ctrl-C handling (audit 229) took any
    ``KeyboardInterrupt`` reaching it for Ctrl-C, so SIGTERM's `Terminated` (a
    ``KeyboardInterrupt``) raised where `main` no longer handles it printed
    ``hooked-attnres: interrupted`` and exited 130, not SIGTERM's line and 143; under
    ``python -m`` the ``__main__`` module and the one the command line imports are two."""
    command, env = _entry_point_run(tmp_path, TERMINATED_OUTSIDE_MAIN, how)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (
        143,
        "",
        "hooked-attnres: terminated (SIGTERM)\n",
    )


def _diverged_at(err: str, condition: str, seed: int) -> int:
    """The step the line ``[hooked-attnres] {condition} seed {seed} diverged at step k``
    of ``err`` names (its advice: said before the error, which is the last line)."""
    lines = err.splitlines()
    said = f"[hooked-attnres] {condition} seed {seed} diverged at step "
    advice = [line for line in lines if line.startswith(said)]
    assert len(advice) == 1, err
    assert "(TrainingDivergedError;" in lines[-1], err
    assert (
        "training is deterministic, so resumed or started over with them it diverges again "
        "at that step, and changing this seed's settings alone after seeing it diverge breaks "
        "the study's pre-registration (settings are fixed before results are seen): report it "
        f"as diverged, or train every seed of {condition} again with new settings"
    ) in advice[0], err
    return int(advice[0][len(said) :].split(" ", 1)[0])


def test_a_diverged_run_is_told_that_its_settings_diverge_again(tmp_path, capsys):
    """``train`` of one run that diverged said only the error (`TrainingDivergedError`,
    "... Lower lr or clip the gradients"), which for a study run is no remedy: a fixed
    recipe takes no --set, and one seed's settings changed after it diverged are settings
    chosen by its results (review 234). It says now, before the error (exit code 1 as
    before), that the run diverged at step k with these settings and diverges again, and
    the remedies the pre-registration leaves. Its claim holds: the same command again
    (resumed from the last good checkpoint) and started over (--no-resume) diverge at the
    same step, here with lr 1e5 (no weight decay, no warm-up), the kept checkpoints equal."""
    out = tmp_path / "runs"
    argv = _tiny_train_argv(out)
    argv[argv.index("--steps") + 1] = "12"
    argv += ["--set", "lr=1e5", "weight_decay=0", "warmup_steps=0"]
    checkpoint = out / "attnres_seed0" / "checkpoint"
    steps, states = [], []
    for again in ([], [], ["--no-resume"]):
        assert cli.main([*argv, *again]) == 1
        steps.append(_diverged_at(capsys.readouterr().err, "attnres", 0))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        states.append({k: v for k, v in state.items() if k != "seconds"})
        states[-1]["weights"] = (checkpoint / "model" / "model.safetensors").read_bytes()
    assert steps[0] > states[0]["step"] > 0, (steps, states[0]["step"])  # a checkpoint kept
    assert steps == [steps[0]] * 3 and states == [states[0]] * 3, steps


def test_a_diverged_run_of_several_resumed_names_the_command_of_the_others(
    tmp_path, monkeypatch, capsys
):
    """``train`` of several runs (without --no-resume, which lists them) whose second run
    diverged said only the error: neither that the runs after it were not trained nor how
    to train them (the same command again resumes the diverged run, which diverges again,
    review 234). It gives the diverged run's advice and the command of the runs after it
    (exit code 1 as before); that command trains exactly those."""
    import torch

    from hooked_attnres.training import trainer

    out = tmp_path / "runs"
    argv = [*_tiny_train_argv(out), "--seeds", "0", "1", "2"]
    calls, models = {"train_step": 0}, []
    original_logits = trainer.model_logits

    def model_logits(model, tokens):
        models.append(model)
        return original_logits(model, tokens)

    def step(name: str) -> None:
        calls["train_step"] += 1
        if calls["train_step"] == 4 + 3:  # the second run's step 3: a weight made NaN
            with torch.no_grad():
                next(models[-1].parameters()).fill_(float("nan"))

    monkeypatch.setattr(trainer, "model_logits", model_logits)
    monkeypatch.setattr(trainer, "fault_point", step)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert _diverged_at(err, "attnres", 1) == 3
    line = next(line for line in err.splitlines() if " diverged at step " in line)
    assert "; to finish this command's other runs, run `" in line, err
    assert _run_printed(line.split("`")[1::2], monkeypatch) == [("attnres", 2, True)]
    for seed in (0, 2):
        assert json.loads((out / f"attnres_seed{seed}" / "metrics.json").read_text())["step"] == 4
    assert not (out / "attnres_seed1" / "metrics.json").exists()
