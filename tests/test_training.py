"""The trainer: loss goes down, seeds reproduce, resumption is exact, outputs load."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blocks_of, emulate_ascii_locale

from hooked_attnres import HookedAttnRes
from hooked_attnres.study import build_model, train_condition
from hooked_attnres.tasks import InductionCopy, KeyValueRetrieval, task_tokenizer
from hooked_attnres.training import TrainConfig, evaluate, train

TASK = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6, n_queries=2)
SHAPE = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_key_value_heads=1,
    d_head=16,
    d_mlp=48,
    n_ctx=32,
    rotary_base=10_000.0,
)


def config(**overrides) -> TrainConfig:
    values = dict(
        steps=12,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
        eval_size=32,
        checkpoint_every=5,
    )
    values.update(overrides)
    return TrainConfig(**values)


def trained_attnres(tok, cfg: TrainConfig, out, **train_kwargs):
    """A new tiny ``"attnres"`` model (seed 0, 2 blocks) trained on ``TASK`` into ``out``
    without a progress bar; ``train_kwargs`` go to `train` (e.g. ``stop_after``)."""
    model = build_model("attnres", 0, tok, SHAPE, 2)
    train(model, TASK, cfg, out, tokenizer=tok, progress=False, **train_kwargs)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_training_lowers_the_loss(tmp_path, condition):
    tok = task_tokenizer(TASK)
    model = build_model(condition, seed=0, tokenizer=tok, shape=SHAPE, **blocks_of(condition))
    probe = TASK.sample(128, seed=9, split="test", vocab=tok)
    from hooked_attnres.training import model_logits

    with torch.no_grad():
        before = probe.loss(model_logits(model, probe.tokens)).item()
    train(
        model,
        TASK,
        config(steps=40, checkpoint_every=None),
        tmp_path,
        tokenizer=tok,
        progress=False,
    )
    with torch.no_grad():
        after = probe.loss(model_logits(model, probe.tokens)).item()
    assert before > math.log(len(tok)) - 0.5  # starts near uniform over the vocabulary
    assert after < before - 1.0  # and learns at least the answer vocabulary


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_same_seed_same_weights(tmp_path, condition):
    runs = [
        train_condition(
            condition,
            3,
            tmp_path / f"run{i}",
            task=TASK,
            config=config(),
            shape=SHAPE,
            progress=False,
            **blocks_of(condition),
        )
        for i in range(2)
    ]
    loads = [json.loads((r.out_dir / "metrics.json").read_text()) for r in runs]
    assert [h["loss"] for h in loads[0]["history"]] == [h["loss"] for h in loads[1]["history"]]
    a, b = (sorted(r.model_dir.glob("*.safetensors")) for r in runs)
    from safetensors.torch import load_file

    assert_same_weights(load_file(str(a[0])), load_file(str(b[0])))
    other = train_condition(
        condition,
        4,
        tmp_path / "other",
        task=TASK,
        config=config(),
        shape=SHAPE,
        progress=False,
        **blocks_of(condition),
    )
    embedding = "model.embed_tokens.weight" if condition == "vanilla" else "embed.W_E"
    other_weights = load_file(str(sorted(other.model_dir.glob("*.safetensors"))[0]))
    assert not torch.equal(other_weights[embedding], load_file(str(a[0]))[embedding])


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, condition):
    tok = task_tokenizer(TASK)
    whole = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    train(whole, TASK, config(), tmp_path / "whole", tokenizer=tok, progress=False)

    parts = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    first = train(
        parts, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False, stop_after=7
    )
    assert first.steps == 7 and not (tmp_path / "parts" / "model").exists()
    # a new process would start from scratch
    fresh = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    second = train(fresh, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False)
    assert second.steps == 12
    assert_same_weights(weights(whole), weights(fresh))
    history = [
        json.loads((tmp_path / d / "metrics.json").read_text())["history"]
        for d in ("whole", "parts")
    ]
    assert history[0] == history[1]


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_the_same_model_object_resumes_its_own_run(tmp_path, condition):
    """`train(..., stop_after=)` then `train` again with the same in-memory model. Saving
    a transformers model set its ``config.architectures`` (``save_pretrained`` writes it
    into the config object), so the model's identity changed and the vanilla run was
    refused as "written by a different run (model.config.architectures differs)"."""
    tok = task_tokenizer(TASK)
    whole = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    train(whole, TASK, config(), tmp_path / "whole", tokenizer=tok, progress=False)
    model = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    train(model, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False, stop_after=7)
    second = train(model, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False)
    assert second.steps == 12
    assert_same_weights(weights(whole), weights(model))


def dropout_qwen3(tok, dropout: float):
    """The study's vanilla model of `SHAPE` with attention dropout (random in training)."""
    model = build_model("vanilla", 0, tok, SHAPE)
    config = copy.deepcopy(model.config)
    config.attention_dropout = dropout
    with torch.random.fork_rng():
        rebuilt = type(model)(config)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def test_a_resumed_run_with_dropout_equals_the_uninterrupted_run(tmp_path):
    """Dropout draws from torch's global generator. It was not seeded by the trainer, so
    a run resumed in a new process (another random state) drew other masks from the
    resumption on: weights 2.5e-3 apart after 12 steps, losses from step 8 on. Each step's
    draws are now a function of ``data_seed`` and the step, and the caller's random state
    is left as it was."""
    tok = task_tokenizer(TASK)
    losses, untouched = {}, []
    for dropout in (0.0, 0.3):
        torch.manual_seed(1)
        before = torch.get_rng_state()
        whole = dropout_qwen3(tok, dropout)
        run = train(whole, TASK, config(), tmp_path / f"whole{dropout}", tok, progress=False)
        untouched.append(torch.equal(torch.get_rng_state(), before))
        losses[dropout] = [record["loss"] for record in run.history]
    assert losses[0.3] != losses[0.0]  # the dropout is live in training

    torch.manual_seed(2)  # another process, another random state
    parts = dropout_qwen3(tok, 0.3)
    train(parts, TASK, config(), tmp_path / "parts", tok, progress=False, stop_after=7)
    torch.manual_seed(3)
    fresh = dropout_qwen3(tok, 0.3)
    resumed = train(fresh, TASK, config(), tmp_path / "parts", tok, progress=False)
    assert_same_weights(weights(whole), weights(fresh))
    assert resumed.history == run.history
    assert untouched == [True, True]  # train left the caller's random state as it was


def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    import hooked_attnres.training.trainer as trainer_module

    tok = task_tokenizer(TASK)
    real_logits, calls = trainer_module.model_logits, {"train": 0}

    def interrupted_at_step_5(model, tokens):
        if model.training:
            calls["train"] += 1
            if calls["train"] == 5:
                raise KeyboardInterrupt
        return real_logits(model, tokens)

    monkeypatch.setattr(trainer_module, "model_logits", interrupted_at_step_5)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(KeyboardInterrupt):
        train(
            model,
            TASK,
            config(checkpoint_every=None),
            tmp_path / "run",
            tokenizer=tok,
            progress=False,
        )
    monkeypatch.undo()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and len(state["history"]) == 4

    resumed = build_model("attnres", 0, tok, SHAPE, 2)
    other_task = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6, n_queries=1)
    with pytest.raises(ValueError, match="different run"):
        train(
            resumed,
            other_task,
            config(checkpoint_every=None),
            tmp_path / "run",
            tokenizer=tok,
            progress=False,
        )
    train(
        resumed,
        TASK,
        config(checkpoint_every=None),
        tmp_path / "run",
        tokenizer=tok,
        progress=False,
    )
    whole = build_model("attnres", 0, tok, SHAPE, 2)
    train(
        whole,
        TASK,
        config(checkpoint_every=None),
        tmp_path / "whole",
        tokenizer=tok,
        progress=False,
    )
    assert_same_weights(weights(whole), weights(resumed))


def test_outputs_load_as_checkpoints(tmp_path):
    attnres = train_condition(
        "attnres",
        0,
        tmp_path / "a",
        task=TASK,
        config=config(),
        shape=SHAPE,
        num_blocks=2,
        progress=False,
    )
    vanilla = train_condition(
        "vanilla",
        0,
        tmp_path / "v",
        task=TASK,
        config=config(),
        shape=SHAPE,
        progress=False,
    )
    tok = task_tokenizer(TASK)
    batch = TASK.sample(32, seed=0, split="test", vocab=tok)
    model = HookedAttnRes.from_pretrained(attnres.model_dir)
    assert model.cfg.attnres_layout == "cumulative" and model.tokenizer is not None
    assert batch.accuracy(model(batch.tokens)) == pytest.approx(
        attnres.final_accuracy["retrieval"], abs=1e-9
    )
    plain = HookedAttnRes.from_hf_qwen3(vanilla.model_dir, wrap="none")
    assert batch.accuracy(plain(batch.tokens)) == pytest.approx(
        vanilla.final_accuracy["retrieval"], abs=1e-9
    )
    wrapped = HookedAttnRes.from_hf_qwen3(vanilla.model_dir, wrap="recency", num_blocks=2)
    assert wrapped.cfg.attnres_layout == "cumulative" and wrapped.to_tokens("k1 v2").shape == (1, 2)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["description"]["condition"] == "attnres" and metrics["step"] == 12


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cfg.lr_at(110) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(lr=0), "lr must be > 0"),
        (dict(warmup_steps=50, steps=10), r"warmup_steps must be in \[0, steps=10\]"),
        (dict(checkpoint_every=0), r"checkpoint_every must be an integer >= 1 or None"),
        (dict(stop_accuracy=1.5), r"stop_accuracy must be an accuracy in \[0, 1\] or None"),
        (dict(stop_accuracy=-0.1), r"stop_accuracy must be an accuracy in \[0, 1\] or None"),
        (dict(stop_accuracy="half"), "stop_accuracy must be a finite number"),
        # audit findings: accepted, then the weights flipped sign each step / a late crash
        (dict(lr=0.5, weight_decay=2.0), r"lr \* weight_decay must be < 1"),
        # one check of the bound, in the command line's words (--threads: MAX_THREADS and
        # its reason; TrainConfig said "threads must be < 2**31" in its own, review 124)
        (
            dict(threads=2**31),
            re.escape(
                f"threads must be an integer <= {2**31 - 1} (the most torch.set_num_threads "
                f"takes, a C int), got {2**31}"
            ),
        ),
    ],
)
def test_bad_train_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_unknown_condition_and_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="condition must be one of"):
        build_model("mamba", 0, task_tokenizer(TASK))
    model = HookedAttnRes(build_model("attnres", 0, task_tokenizer(TASK), SHAPE, 2).cfg)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        train(model, TASK, config(), tmp_path, progress=False)


def test_a_separate_process_writes_the_same_file_as_this_one(tmp_path):
    """Bitwise reproducibility across processes (in-process runs can hide thread-order
    nondeterminism, such as the accumulating backward of tensor indexing): the command line
    in a child process and `train_condition` here, with the same settings."""
    import hashlib
    import subprocess
    import sys

    from hooked_attnres.study import study_task, study_train_config

    settings = dict(steps=6, warmup_steps=2, eval_every=6, eval_size=16, batch_size=32, threads=2)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hooked_attnres.cli",
            "train",
            "--condition",
            "attnres",
            "--out",
            str(tmp_path / "child"),
            "--steps",
            "6",
            "--no-progress",
            "--set",
            *(f"{k}={v}" for k, v in settings.items() if k != "steps"),
        ],
        check=True,
        capture_output=True,
    )
    train_condition(
        "attnres",
        0,
        tmp_path / "here" / "attnres_seed0",
        task=study_task(),
        config=study_train_config(**settings),
        progress=False,
    )
    digests = [
        hashlib.sha256(
            (tmp_path / run / "attnres_seed0" / "model" / "model.safetensors").read_bytes()
        ).hexdigest()
        for run in ("child", "here")
    ]
    assert digests[0] == digests[1]


def test_training_threads_apply_inside_and_the_callers_count_returns(tmp_path, monkeypatch):
    import hooked_attnres.training.trainer as trainer_module

    seen = []
    real = trainer_module.model_logits

    def logits(model, tokens):
        seen.append(torch.get_num_threads())
        return real(model, tokens)

    monkeypatch.setattr(trainer_module, "model_logits", logits)
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train(model, TASK, config(steps=3, threads=1), tmp_path, tokenizer=tok, progress=False)
        assert set(seen) == {1} and torch.get_num_threads() == 3
        seen.clear()
        train(model, TASK, config(steps=3), tmp_path / "b", tokenizer=tok, progress=False)
        assert set(seen) == {3}  # threads=None leaves the count alone
    finally:
        torch.set_num_threads(previous)


def test_stop_accuracy_ends_training_at_the_first_evaluation_that_reaches_it(tmp_path):
    """The run stops at the first evaluation at or above ``stop_accuracy``: the final
    model is the model of that step (equal to an uninterrupted run cut there), metrics
    say so, and running again resumes nothing."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=40, eval_every=4, checkpoint_every=8, stop_accuracy=0.0)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    result = train(model, TASK, cfg, tmp_path / "stop", tokenizer=tok, progress=False)
    assert result.stopped_early and result.steps == 4  # accuracy >= 0 at the first evaluation
    metrics = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["step"] == 4
    assert metrics["train_config"]["stop_accuracy"] == 0.0
    assert result.final_accuracy == metrics["history"][-1]["accuracy"]
    reference = build_model("attnres", 0, tok, SHAPE, 2)  # the same run cut at step 4
    train(
        reference,
        TASK,
        config(steps=40, eval_every=4, checkpoint_every=8),
        tmp_path / "cut",
        tokenizer=tok,
        progress=False,
        stop_after=4,
    )
    assert_same_weights(weights(model), weights(reference))
    saved = HookedAttnRes.from_pretrained(tmp_path / "stop" / "model")
    assert_same_weights(weights(saved), weights(model))
    again = build_model("attnres", 0, tok, SHAPE, 2)
    rerun = train(again, TASK, cfg, tmp_path / "stop", tokenizer=tok, progress=False)
    assert rerun.steps == 4 and rerun.stopped_early
    assert_same_weights(weights(again), weights(model))


def test_stop_accuracy_is_not_reached_while_a_task_accuracy_is_nan(tmp_path, monkeypatch):
    """Audit 86: since audit 81 an evaluation's accuracy can be NaN (a prompt whose argmax
    is undefined, `TaskBatch.correct`). The stop test took ``min`` over the tasks, which
    with NaN depends on their order: ``min([1.0, nan])`` is 1.0, so a run stopped early
    (and wrote its final model) while one task's accuracy was NaN. A NaN accuracy reaches
    no threshold, whichever task it is."""
    import hooked_attnres.training.trainer as trainer_module

    for accuracies in ({"a": 1.0, "b": math.nan}, {"a": math.nan, "b": 1.0}):

        def evaluated(model, batches, got=accuracies) -> dict:
            return dict(got)

        monkeypatch.setattr(trainer_module, "evaluate", evaluated)
        tok = task_tokenizer(TASK)
        model = build_model("attnres", 0, tok, SHAPE, 2)
        cfg = config(steps=4, eval_every=2, checkpoint_every=None, stop_accuracy=0.5)
        out = tmp_path / str(list(accuracies.values()))
        result = train(model, TASK, cfg, out, tokenizer=tok, progress=False)
        assert not result.stopped_early and result.steps == 4, accuracies


def test_a_stop_accuracy_never_reached_and_evaluations_change_no_weight(tmp_path):
    """Evaluations (any schedule) never change the weights, so a run whose stop accuracy
    is never reached equals the run without it, bit for bit, and records no stop."""
    tok = task_tokenizer(TASK)
    runs = {}
    for name, overrides in {
        "plain": dict(eval_every=6),
        "often": dict(eval_every=1),
        "unreached": dict(eval_every=2, stop_accuracy=1.0),
    }.items():
        model = build_model("attnres", 0, tok, SHAPE, 2)
        result = train(
            model, TASK, config(**overrides), tmp_path / name, tokenizer=tok, progress=False
        )
        runs[name] = (model, result)
    assert (
        max(min(h["accuracy"].values()) for h in runs["unreached"][1].history if "accuracy" in h)
        < 1.0
    )
    for name in ("often", "unreached"):
        assert_same_weights(weights(runs["plain"][0]), weights(runs[name][0]))
    assert not runs["unreached"][1].stopped_early and runs["unreached"][1].steps == 12
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert "stopped_early" not in plain and "stop_accuracy" not in plain["train_config"]


TASK_B = InductionCopy(seq_len=6, copy_len=2, n_tokens=8)


def test_stop_accuracy_is_reached_at_or_above_it_on_every_evaluation_task(tmp_path):
    """With two evaluation tasks the rule is ``min(accuracies) >= stop_accuracy``. A
    threshold equal to the largest minimum the reference run reaches stops exactly there
    (``>`` would never stop); a threshold above every minimum but below some mean never
    stops (a mean rule would). The stopped model equals the reference cut at that step."""
    tok = task_tokenizer(TASK, TASK_B)
    settings = dict(steps=30, eval_every=2, checkpoint_every=None, eval_size=24)

    def run(name, **overrides):
        model = build_model("attnres", 0, tok, SHAPE, 2)
        result = train(
            model,
            TASK,
            config(**settings, **overrides.pop("cfg", {})),
            tmp_path / name,
            tokenizer=tok,
            progress=False,
            eval_tasks=[TASK, TASK_B],
            **overrides,
        )
        return model, result

    _, reference = run("reference")
    evaluations = [h for h in reference.history if "accuracy" in h and h["step"] < 30]
    minima = [min(h["accuracy"].values()) for h in evaluations]
    means = [sum(h["accuracy"].values()) / 2 for h in evaluations]
    expected = evaluations[minima.index(max(minima))]["step"]
    stopped_model, stopped = run("stop", cfg=dict(stop_accuracy=max(minima)))
    assert stopped.stopped_early and stopped.steps == expected
    cut_model, _ = run("cut", stop_after=expected)
    assert_same_weights(weights(stopped_model), weights(cut_model))
    assert max(means) > max(minima)  # the two tasks differ, so a threshold fits between
    _, between = run("between", cfg=dict(stop_accuracy=(max(minima) + max(means)) / 2))
    assert not between.stopped_early and between.steps == 30
    with pytest.raises(ValueError, match="stop_accuracy needs at least one evaluation task"):
        train(
            build_model("attnres", 0, tok, SHAPE, 2),
            TASK,
            config(stop_accuracy=0.5),
            tmp_path / "none",
            tokenizer=tok,
            progress=False,
            eval_tasks=[],
        )


def test_a_stop_interrupted_during_its_evaluation_is_found_on_resume(tmp_path, monkeypatch):
    """Ctrl-C inside the evaluation that would stop the run: the checkpoint keeps the
    step's record, resuming finishes the evaluation and stops there; history and weights
    equal the uninterrupted run's."""
    import hooked_attnres.training.trainer as trainer_module

    tok = task_tokenizer(TASK)
    cfg = config(steps=20, eval_every=4, checkpoint_every=None, stop_accuracy=0.0)
    whole = build_model("attnres", 0, tok, SHAPE, 2)
    reference = train(whole, TASK, cfg, tmp_path / "whole", tokenizer=tok, progress=False)
    assert reference.steps == 4 and reference.stopped_early

    real_evaluate = trainer_module.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "evaluate", interrupted)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(KeyboardInterrupt):
        train(model, TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False)
    monkeypatch.setattr(trainer_module, "evaluate", real_evaluate)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and "accuracy" not in state["history"][-1]
    resumed = build_model("attnres", 0, tok, SHAPE, 2)
    result = train(resumed, TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False)
    assert result.stopped_early and result.steps == 4
    assert result.history == reference.history
    assert_same_weights(weights(resumed), weights(whole))


def whole_run_weights(tmp_path, **overrides) -> dict:
    tok = task_tokenizer(TASK)
    whole = build_model("attnres", 0, tok, SHAPE, 2)
    train(whole, TASK, config(**overrides), tmp_path / "whole", tokenizer=tok, progress=False)
    return weights(whole)


def test_ctrl_c_inside_the_optimizer_update_waits_for_the_step_to_complete(tmp_path, monkeypatch):
    """A real SIGINT arriving as the 5th update starts: the update and its bookkeeping
    finish first, so the checkpoint has 5 updates and says step 5, and resuming it equals
    the uninterrupted run bit for bit."""
    import signal

    tok = task_tokenizer(TASK)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def signalled_at_update_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", signalled_at_update_5)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(KeyboardInterrupt):
        train(
            model, TASK, config(checkpoint_every=2), tmp_path / "run", tokenizer=tok, progress=False
        )
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5 and [r["step"] for r in state["history"]] == [1, 2, 3, 4, 5]
    resumed = build_model("attnres", 0, tok, SHAPE, 2)
    train(
        resumed, TASK, config(checkpoint_every=2), tmp_path / "run", tokenizer=tok, progress=False
    )
    assert_same_weights(whole_run_weights(tmp_path, checkpoint_every=2), weights(resumed))


def test_an_interrupt_raised_inside_the_optimizer_update_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    """A KeyboardInterrupt raised from inside the 5th update (after it changed the
    weights): no checkpoint is written from that state, the one of step 4 stays, and
    resuming it equals the uninterrupted run."""
    tok = task_tokenizer(TASK)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def raising_after_update_5(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", raising_after_update_5)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    with (
        pytest.raises(KeyboardInterrupt),
        pytest.warns(
            RuntimeWarning, match=r"inside the optimizer update of step 5.*step 4\) is kept"
        ),
    ):
        train(
            model, TASK, config(checkpoint_every=2), tmp_path / "run", tokenizer=tok, progress=False
        )
    monkeypatch.undo()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    resumed = build_model("attnres", 0, tok, SHAPE, 2)
    train(
        resumed, TASK, config(checkpoint_every=2), tmp_path / "run", tokenizer=tok, progress=False
    )
    assert_same_weights(whole_run_weights(tmp_path, checkpoint_every=2), weights(resumed))


def test_resuming_into_another_model_is_refused_naming_what_differs(tmp_path):
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False, stop_after=3)
    fewer_blocks = build_model("attnres", 0, tok, SHAPE, 1)  # the same tensors, routed apart
    before = weights(fewer_blocks)
    with pytest.raises(
        ValueError, match=r"different run \(model.config.attnres_num_blocks differs: 2 vs 1\)"
    ):
        train(fewer_blocks, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
    assert_same_weights(before, weights(fewer_blocks))  # refused before anything is loaded
    wider = build_model("attnres", 0, tok, SHAPE, 2).to(torch.float64)
    with pytest.raises(ValueError, match=r"model.config.dtype differs: 'float32' vs 'float64'"):
        train(wider, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
    vanilla = build_model("vanilla", 0, tok, SHAPE)
    with pytest.raises(ValueError, match=r"different run \(model.class differs"):
        train(vanilla, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)


@pytest.mark.parametrize("change", ["threads", "torch", "numpy"])
def test_resuming_under_another_thread_count_or_version_is_refused(tmp_path, monkeypatch, change):
    """The identity holds the study's definition of what moves the numbers (thread count,
    torch and NumPy versions: `numerics_environment`); before, a run resumed under another
    one silently and was then not the uninterrupted run."""
    import numpy as np

    tok = task_tokenizer(TASK)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the caller's count (TrainConfig.threads is None)
        model = build_model("attnres", 0, tok, SHAPE, 2)
        train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False, stop_after=3)
        state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
        versions = [torch.__version__, np.__version__]
        assert state["environment"] == {"threads": 1, "versions": versions}
        if change == "threads":
            torch.set_num_threads(2)
            found = r"this run has 2 and \['"
        else:
            monkeypatch.setattr(torch if change == "torch" else np, "__version__", "0.0.1")
            found = r"this run has 1 and \[.*'0.0.1'"
        resumed = build_model("attnres", 0, tok, SHAPE, 2)
        before = weights(resumed)
        with pytest.raises(
            ValueError, match=r"was written with 1 threads and torch, NumPy \[.*" + found
        ):
            train(resumed, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
        assert_same_weights(before, weights(resumed))  # refused before anything is loaded
        monkeypatch.undo()
        torch.set_num_threads(1)  # as written: resumes
        train(resumed, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
    finally:
        torch.set_num_threads(previous)


def test_the_study_key_and_the_training_identity_share_one_environment(monkeypatch):
    """One definition: the study's key of a kept run holds the same thread count and
    versions (and pandas'), so both move together."""
    import pandas as pd

    from hooked_attnres._environment import numerics_environment
    from hooked_attnres.study.run import _run_key, _RunSettings

    monkeypatch.setattr(torch, "__version__", "0.0.2")
    key = _run_key("attnres", 0, _RunSettings(None, 4, 10, False))
    assert {k: key[k] for k in ("threads", "versions")} == numerics_environment(pd)
    assert key["versions"][0] == "0.0.2" and key["threads"] == torch.get_num_threads()


def permuted_tokenizer(task):
    """A tokenizer of ``task``'s words with other ids: the same size, so the same model
    shapes and task reprs."""
    from hooked_attnres.tasks.vocabulary import build_tokenizer

    tok = build_tokenizer(list(reversed(task.words())))
    assert (
        len(tok) == len(task_tokenizer(task))
        and tok.get_vocab() != task_tokenizer(task).get_vocab()
    )
    return tok


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_resuming_with_another_vocabulary_of_the_same_size_is_refused(tmp_path, condition):
    # it resumed silently and trained on other token ids from step 4 on (final weights 5.8e-3
    # from the uninterrupted run's in the audit's 6-step reproduction)
    tok, other = task_tokenizer(TASK), permuted_tokenizer(TASK)
    model = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False, stop_after=3)
    resumed = build_model(condition, 0, other, SHAPE, **blocks_of(condition))
    before = weights(resumed)
    with pytest.raises(ValueError, match="another tokenizer: the vocabulary differs"):
        train(resumed, TASK, config(), tmp_path / "run", tokenizer=other, progress=False)
    assert_same_weights(before, weights(resumed))  # refused before anything is loaded
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3


def _as_written_before_the_vocabulary_was_recorded(run, tokenizer_saved: bool = True) -> None:
    from hooked_attnres._atomic import MARKER, _files

    path = run / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["vocabulary"]
    path.write_text(json.dumps(state))
    if not tokenizer_saved:  # e.g. a HookedAttnRes trained without an attached tokenizer
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (run / "checkpoint" / "model" / name).unlink(missing_ok=True)
    marker = json.loads((run / "checkpoint" / MARKER).read_text())
    marker["files"] = _files(run / "checkpoint")  # a complete version of what is there
    del marker["sha256"]  # written before digests were recorded (audit 98), as the rest
    (run / "checkpoint" / MARKER).write_text(json.dumps(marker))


def test_an_older_checkpoint_is_checked_against_the_tokenizer_saved_with_it(tmp_path):
    tok, other = task_tokenizer(TASK), permuted_tokenizer(TASK)
    short = config(steps=4, eval_every=4, checkpoint_every=2)
    whole = build_model("attnres", 0, tok, SHAPE, 2)
    train(whole, TASK, short, tmp_path / "whole", tokenizer=tok, progress=False)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False, stop_after=2)
    _as_written_before_the_vocabulary_was_recorded(tmp_path / "run")
    with pytest.raises(ValueError, match="another tokenizer: the vocabulary differs"):
        train(
            build_model("attnres", 0, other, SHAPE, 2),
            TASK,
            short,
            tmp_path / "run",
            tokenizer=other,
            progress=False,
        )
    resumed = build_model("attnres", 0, tok, SHAPE, 2)  # its own tokenizer: resumes exactly
    train(resumed, TASK, short, tmp_path / "run", tokenizer=tok, progress=False)
    assert_same_weights(weights(whole), weights(resumed))


def test_an_older_checkpoint_without_a_saved_tokenizer_is_refused(tmp_path):
    tok = task_tokenizer(TASK)
    short = config(steps=4, eval_every=4, checkpoint_every=2)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False, stop_after=2)
    _as_written_before_the_vocabulary_was_recorded(tmp_path / "run", tokenizer_saved=False)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(ValueError, match="does not record its run's 'vocabulary'"):
        train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False)


def _reference_training(model, tasks, tok, cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """``cfg.steps`` updates of ``model`` written out by hand: the batch of step ``s`` is
    ``tasks[s % len(tasks)].sample(batch_size, data_seed, "train", stream=s)``; the loss
    the mean negative log-softmax of the supervised targets (gathered, not
    `TaskBatch.loss`); gradients by
    plain autograd (every hook watched: no fused backward); global-norm clipping; the
    warm-up / cosine schedule; AdamW (decoupled decay on every parameter, eps 1e-8).
    Returns the losses and each step's clipping coefficient."""
    params = dict(model.named_parameters())
    first = {k: torch.zeros_like(p) for k, p in params.items()}
    second = {k: torch.zeros_like(p) for k, p in params.items()}
    (beta1, beta2), eps = cfg.betas, 1e-8
    decay_steps = cfg.steps - cfg.warmup_steps
    losses, coefficients = [], []
    model.train()
    for step in range(cfg.steps):
        task = tasks[step % len(tasks)]
        batch = task.sample(cfg.batch_size, cfg.data_seed, "train", tok.get_vocab(), stream=step)
        model.zero_grad(set_to_none=True)
        if isinstance(model, HookedAttnRes):
            with model.hooks(fwd_hooks=[(lambda name: True, lambda tensor, hook: None)]):
                logits = model(batch.tokens)
        else:
            logits = model(input_ids=batch.tokens).logits
        supervised = batch.targets != -100
        logprobs = logits.log_softmax(-1)[supervised]
        loss = -logprobs.gather(-1, batch.targets[supervised][:, None]).mean()
        loss.backward()
        losses.append(loss.item())
        norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params.values()))
        coefficient = min(1.0, cfg.grad_clip / (norm + 1e-6))
        coefficients.append(coefficient)
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / decay_steps))
            lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
        with torch.no_grad():
            for name, param in params.items():
                grad = param.grad * coefficient
                param.mul_(1 - lr * cfg.weight_decay)
                first[name] = beta1 * first[name] + (1 - beta1) * grad
                second[name] = beta2 * second[name] + (1 - beta2) * grad.square()
                corrected = first[name] / (1 - beta1 ** (step + 1))
                scale = (second[name] / (1 - beta2 ** (step + 1))).sqrt()
                param.sub_(lr * corrected / (scale + eps))
    return losses, coefficients


@pytest.mark.parametrize(
    "condition", ["attnres", "kimi", "full", "none", "vanilla", "recency", "exact"]
)
def test_the_trainer_takes_hand_written_adamw_steps_on_the_cross_entropy(tmp_path, condition):
    """Five float64 steps of `train` (warm-up, peak, cosine decay; clipping active at every
    step; weight decay 0.3 on every parameter, norm gains, router queries, recency biases
    and embeddings included) equal `_reference_training`, and the history's loss and lr are
    its numbers, in every layout and the HF wraps (docs/training.md "The numbers, exactly").
    Two tasks: the steps alternate between the answered queries of ``TASK`` and the copied
    tokens of an `InductionCopy`. The AttnRes models start with zero router queries
    (content-free routers), so the fused router and RMSNorm backward passes are checked in
    training against autograd."""
    tasks = [TASK, InductionCopy(seq_len=5, copy_len=3, n_tokens=8)]
    tok = task_tokenizer(*tasks)
    if condition in ("kimi", "full", "none"):
        from hooked_attnres.config import HookedAttnResConfig

        blocks = {"attnres_num_blocks": 2} if condition == "kimi" else {}
        cfg_model = HookedAttnResConfig(
            d_vocab=len(tok), attnres_layout=condition, seed=0, **blocks, **SHAPE
        )
        model = HookedAttnRes(cfg_model, tokenizer=tok)
    elif condition in ("recency", "exact"):  # the wraps of a vanilla Qwen3, trained
        vanilla = build_model("vanilla", 0, tok, SHAPE).double()
        blocks = {"num_blocks": 2} if condition == "recency" else {}
        model = HookedAttnRes.from_hf_qwen3(vanilla, wrap=condition, tokenizer=tok, **blocks)
    else:
        model = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
    model = model.double()
    reference = copy.deepcopy(model)
    cfg = config(
        steps=5,
        warmup_steps=2,
        lr=3e-2,
        min_lr_ratio=0.2,
        betas=(0.85, 0.95),
        weight_decay=0.3,
        grad_clip=0.05,
        batch_size=8,
        data_seed=5,
        eval_every=5,
        eval_size=8,
        checkpoint_every=None,
    )
    result = train(model, tasks, cfg, tmp_path, tokenizer=tok, progress=False)
    losses, coefficients = _reference_training(reference, tasks, tok, cfg)
    assert max(coefficients) < 1  # the clipping acts at every step
    assert [h["loss"] for h in result.history] == pytest.approx(losses, rel=1e-12)
    assert [h["lr"] for h in result.history] == pytest.approx(
        [
            0.015,
            0.03,
            0.03,
            0.03 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 3))),
            0.03 * (0.2 + 0.8 * 0.5 * (1 + math.cos(2 * math.pi / 3))),
        ],
        rel=1e-12,
    )
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, param in mine.items():
        torch.testing.assert_close(param, theirs[name], rtol=1e-9, atol=1e-11, msg=name)


def test_the_training_loss_is_transformers_causal_lm_loss_of_the_supervised_tokens():
    """`TaskBatch.loss` (the objective) of a vanilla Qwen3 equals ``Qwen3ForCausalLM``'s
    own loss on the prompt followed by its answer, with the supervised targets as labels
    (shifted by one, as transformers expects), and so does the loss of the same weights
    loaded with ``wrap="none"``. Multi-query prompts: the answered queries count too."""
    tok = task_tokenizer(TASK)
    model = build_model("vanilla", 0, tok, SHAPE)
    batch = TASK.sample(8, 5, "train", tok)
    supervised = batch.targets != -100
    assert (supervised.sum(1) == 2).all()  # n_queries=2: the answered query and the answer
    inside = supervised[:, :-1]
    assert torch.equal(batch.targets[:, :-1][inside], batch.tokens[:, 1:][inside])
    ids = torch.cat([batch.tokens, batch.answer[:, None]], dim=1)
    labels = torch.cat([torch.full((8, 1), -100), batch.targets], dim=1)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        ours = batch.loss(model(input_ids=batch.tokens).logits)
        wrapped = HookedAttnRes.from_hf_qwen3(model, wrap="none", tokenizer=tok)
        theirs = batch.loss(wrapped(batch.tokens))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=0)


def test_the_saved_model_carries_the_tokenizer_it_was_trained_with(tmp_path):
    """A HookedAttnRes is saved with its attached tokenizer: one attached with other ids
    than train's tokenizer= was saved with a model trained on tokenizer='s ids (every
    prompt read back is another one), and a model with none attached was saved without
    the tokenizer= it was trained with."""
    tok, other = task_tokenizer(TASK), permuted_tokenizer(TASK)
    short = config(steps=2, eval_every=2, checkpoint_every=None)
    model = build_model("attnres", 0, other, SHAPE, 2)
    with pytest.raises(ValueError, match="attached tokenizer and tokenizer= have different"):
        train(model, TASK, short, tmp_path / "mixed", tokenizer=tok, progress=False)
    assert not (tmp_path / "mixed").exists()  # refused before anything is written
    bare = build_model("attnres", 0, tok, SHAPE, 2)
    bare.tokenizer = None
    train(bare, TASK, short, tmp_path / "bare", tokenizer=tok, progress=False)
    for folder in ("model", "checkpoint/model"):
        saved = HookedAttnRes.from_pretrained(tmp_path / "bare" / folder).tokenizer
        assert saved is not None and saved.get_vocab() == tok.get_vocab(), folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_a_half_precision_model_is_refused_before_any_work(tmp_path, condition, dtype):
    """AdamW on bfloat16 weights rounds every update below half a step of the weight away:
    at the study's peak lr (5e-4) every norm gain (1.0, spacing 2**-7) stays 1.0 for ever
    (13 of the 37 tensors of the tiny attnres model never moved in 20 steps, silently);
    in float16 eps = 1e-8 underflows and the first update made the embedding infinite,
    reported as a divergence ("Lower lr"). The trainer refuses both, naming the remedy."""
    tok = task_tokenizer(TASK)
    model = build_model(condition, 0, tok, SHAPE, **blocks_of(condition)).to(dtype)
    short = config(steps=2, eval_every=2, checkpoint_every=None)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"float32 or float64 parameters.*{name}.*\.float\(\)"):
        train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def _freeze_embedding(model, dtype):
    """The model's input embedding as a frozen ``dtype`` parameter (the rest as built)."""
    name, param = next(iter(model.named_parameters()))
    assert "emb" in name.lower() or "W_E" in name, name
    param.data = param.data.to(dtype)
    param.requires_grad_(False)
    return name


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_a_frozen_half_precision_parameter_is_trained_around_and_never_touched(tmp_path, condition):
    """The half-precision refusal is about AdamW's updates, so it covers only parameters
    AdamW updates: a frozen bfloat16 embedding with a float32 rest trains, the embedding
    stays bit for bit as it was (weight decay included), and the same parameters move as
    beside a frozen float32 embedding holding the same (bfloat16-rounded) values (not to
    the same numbers: the forward pass rounds the bfloat16 embedding's output in bfloat16
    arithmetic where the float32 one does not). Before, the frozen embedding was refused
    like a trainable one."""
    tok = task_tokenizer(TASK)
    short = config(steps=3, eval_every=3, checkpoint_every=None, weight_decay=0.5)
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(condition, 0, tok, SHAPE, **blocks_of(condition))
        first = next(iter(model.parameters()))
        first.data = first.data.to(torch.bfloat16)  # the same values in both runs
        frozen = _freeze_embedding(model, dtype)
        before = weights(model)
        train(model, TASK, short, tmp_path / str(dtype), tokenizer=tok, progress=False)
        after = weights(model)
        assert after[frozen].dtype == dtype
        assert torch.equal(after[frozen], before[frozen])
        moved[dtype] = [k for k in before if not torch.equal(after[k], before[k])]
    assert moved[torch.bfloat16] == moved[torch.float32]
    assert len(moved[torch.float32]) > len(before) // 2


def test_a_trainable_half_precision_parameter_among_float32_ones_is_refused(tmp_path):
    """Only one trainable bfloat16 tensor (the rest float32, or frozen) is enough."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    name = _freeze_embedding(model, torch.bfloat16)
    dict(model.named_parameters())[name].requires_grad_(True)
    short = config(steps=2, eval_every=2, checkpoint_every=None)
    with pytest.raises(ValueError, match=rf"{name} is bfloat16.*\.float\(\)"):
        train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_with_other_parameters_frozen_is_refused(tmp_path):
    """Which parameters are frozen is part of the run: resumed with the embedding
    unfrozen, the run would update a tensor the checkpoint's run never did (not equal to
    an uninterrupted run), so it is refused by name."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    frozen = _freeze_embedding(model, torch.float32)
    run = config(steps=4, eval_every=2, checkpoint_every=2)
    train(model, TASK, run, tmp_path, tokenizer=tok, progress=False, stop_after=2)
    thawed = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(ValueError, match=rf"model\.frozen differs.*{frozen}"):
        train(thawed, TASK, run, tmp_path, tokenizer=tok, progress=False)
    again = build_model("attnres", 0, tok, SHAPE, 2)
    _freeze_embedding(again, torch.float32)
    train(again, TASK, run, tmp_path, tokenizer=tok, progress=False)


def test_why_half_precision_is_refused_a_bfloat16_adamw_step_leaves_a_gain_unchanged():
    """The measurement behind the refusal, with torch's AdamW alone: one step at the
    study's lr on a gain of 1.0 moves it in float32 and not at all in bfloat16."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        gain = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        optimizer = torch.optim.AdamW([gain], lr=5e-4, betas=(0.9, 0.98), weight_decay=0.01)
        gain.grad = torch.full_like(gain, 0.3)
        optimizer.step()
        moved[dtype] = bool((gain != 1).all())
    assert moved == {torch.float32: True, torch.bfloat16: False}


def test_a_thread_count_refusal_names_the_remedy_that_resumes(tmp_path):
    """A thread count can differ only in runs whose `TrainConfig.threads` is None (a set
    one is applied, and is part of the settings, compared first), so the refusal's advice
    "TrainConfig(threads=...)" was refused in turn as another run's settings
    (`hooked-attnres train --set threads=1`: "train_config.threads differs: None vs 1").
    The refusal now names the caller's count, which resumes."""
    tok = task_tokenizer(TASK)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = build_model("attnres", 0, tok, SHAPE, 2)
        train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False, stop_after=3)
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match=r"torch\.set_num_threads\(1\).*--threads 1"):
            train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
        with pytest.raises(ValueError, match=r"train_config\.threads differs: None vs 1"):
            train(model, TASK, config(threads=1), tmp_path / "run", tokenizer=tok, progress=False)
        torch.set_num_threads(1)  # the remedy named: resumes
        result = train(model, TASK, config(), tmp_path / "run", tokenizer=tok, progress=False)
        assert result.steps == config().steps
    finally:
        torch.set_num_threads(previous)


def test_default_warmup_longer_than_a_short_run_says_it_is_the_default():
    """TrainConfig(steps=3) keeps the default warm-up, longer than the run: the refusal says
    the value was the default and how to set one (an explicit value gets the plain message)."""
    default = TrainConfig.__dataclass_fields__["warmup_steps"].default
    with pytest.raises(ValueError, match=rf"got {default} \(the default; .*warmup_steps=0\)"):
        TrainConfig(steps=3)
    with pytest.raises(ValueError, match=rf"got {default + 1}$"):
        TrainConfig(steps=3, warmup_steps=default + 1)
    assert TrainConfig(steps=3, warmup_steps=0).warmup_steps == 0


def test_evaluate_refuses_a_chunk_below_one_and_an_empty_batch_and_restores_the_mode():
    """`evaluate` is the fraction of prompts whose argmax at the answer position is the
    answer, whatever the chunk; a chunk <= 0 scored no prompt (an empty range) and gave
    accuracy 0.0 silently, and an empty batch divided by zero: both are refused. The
    caller's training mode comes back even when the forward pass raises."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    batch = TASK.sample(9, 0, "test", tok)
    model.eval()
    with torch.no_grad():
        logits = model(batch.tokens)
    rows = torch.arange(len(batch))
    expected = (logits[rows, batch.answer_pos].argmax(-1) == batch.answer).double().mean().item()
    model.train()
    for chunk in (1, 4, 256):
        assert evaluate(model, {"kv": batch}, chunk=chunk) == {"kv": pytest.approx(expected)}
    for chunk in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
            evaluate(model, {"kv": batch}, chunk=chunk)
    with pytest.raises(ValueError, match="batch 'kv' has no prompts"):
        evaluate(model, {"kv": batch[[]]})
    other = InductionCopy(seq_len=5, copy_len=2, n_tokens=64)  # ids beyond the model's vocab
    with pytest.raises(ValueError, match="token ids must be in"):
        evaluate(model, {"ind": other.sample(2, 0, "test")})
    assert model.training


def test_a_config_field_set_after_the_config_was_built_is_checked_again(tmp_path):
    """`TrainConfig` checks its fields when it is built; one set afterwards was used
    unchecked: the study's config with ``steps = 3`` kept its 100 warm-up steps (the rate
    never left the warm-up), and ``grad_clip = 0`` zeroed every gradient. `train` checks
    the config again, before any work."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    short = config()
    short.steps = 1  # below its warmup_steps=2
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, steps=1\], got 2"):
        train(model, TASK, short, tmp_path / "run", tokenizer=tok, progress=False)
    unclipped = config()
    unclipped.grad_clip = 0
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        train(model, TASK, unclipped, tmp_path / "run", tokenizer=tok, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_description_is_saved_as_json_resumes_with_tuples_and_is_checked_first(tmp_path):
    """``description`` is compared, on resume, with the JSON read back from the checkpoint:
    a tuple in it (saved as a list) refused the run's own resumption (``[1, 2] vs (1,
    2)``), and a NumPy integer or a torch dtype (``train_condition(shape=dict(...,
    dtype=torch.float64))``) failed at the first checkpoint, after the steps before it.
    Now it is taken as its JSON (NumPy scalars converted) before any work: the resumed run
    equals the uninterrupted one, and what JSON cannot hold is refused at once."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=4, checkpoint_every=2, eval_every=2)

    def run(out, stop_after=None):
        description = {"blocks": (1, 2), "seed": np.int64(3), "dtype": torch.float64}
        return trained_attnres(tok, cfg, out, stop_after=stop_after, description=description)

    whole = run(tmp_path / "whole")
    run(tmp_path / "resumed", stop_after=2)
    resumed = run(tmp_path / "resumed")
    assert_same_weights(weights(whole), weights(resumed))
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["description"] == {"blocks": [1, 2], "seed": 3, "dtype": "torch.float64"}
    for bad in ({"where": object()}, {"x": float("nan")}):
        with pytest.raises(TypeError, match="description must hold JSON values"):
            train(
                build_model("attnres", 0, tok, SHAPE, 2),
                TASK,
                cfg,
                tmp_path / "bad",
                tokenizer=tok,
                progress=False,
                description=bad,
            )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_resuming_from_a_model_of_other_initial_weights_is_refused(tmp_path, condition):
    """A resumed run's weights are replaced by its checkpoint's, so a model of another
    seed resumed the checkpoint's run silently (a ``transformers`` config records no seed;
    a tiny vanilla model ended 0.15 from the run asked for after 2 of 4 steps). The run's
    freshly built model and the same model object continuing its run resume; another
    model is refused, nothing loaded."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=4, checkpoint_every=2, eval_every=2)

    def fresh(seed: int):
        if condition == "vanilla":
            return build_model(condition, seed, tok, SHAPE, **blocks_of(condition))
        from hooked_attnres.config import HookedAttnResConfig

        # built without cfg.seed: initialised from the caller's random state
        cfg_model = HookedAttnResConfig(d_vocab=len(tok), attnres_num_blocks=2, **SHAPE)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return HookedAttnRes(cfg_model, tokenizer=tok)

    whole = fresh(1)
    train(whole, TASK, cfg, tmp_path / "whole", tokenizer=tok, progress=False)
    train(fresh(1), TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False, stop_after=1)
    other = fresh(2)
    before = weights(other)
    assert any(not torch.equal(before[k], v) for k, v in weights(fresh(1)).items())
    with pytest.raises(ValueError, match="started from other weights.*freshly built model"):
        train(other, TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False)
    assert_same_weights(weights(other), before)  # nothing loaded
    continuing = fresh(1)
    train(continuing, TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False, stop_after=1)
    train(continuing, TASK, cfg, tmp_path / "run", tokenizer=tok, progress=False)  # same object
    assert_same_weights(weights(whole), weights(continuing))


def test_the_same_model_object_resumes_after_an_error_between_checkpoints(tmp_path, monkeypatch):
    """An error between two checkpoints (here the evaluation of step 3 of 4, checkpoint at
    step 2) leaves the model object a step ahead of its checkpoint: neither the run's
    initial weights nor the checkpoint's. Resuming with that object (the notebook workflow)
    was refused as 'a model of another seed' (audit 15); it continues its run, equal to an
    uninterrupted one. A model of the same object's weights edited since is still refused."""
    import hooked_attnres.training.trainer as trainer

    tok = task_tokenizer(TASK)
    cfg = config(steps=4, checkpoint_every=2, eval_every=1)
    whole = build_model("vanilla", 1, tok, SHAPE)
    train(whole, TASK, cfg, tmp_path / "whole", tokenizer=tok, progress=False)
    real, calls = trainer.evaluate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory in the evaluation of step 3")
        return real(*args, **kwargs)

    for edited in (True, False):
        run = tmp_path / f"run_{edited}"
        calls.clear()
        model = build_model("vanilla", 1, tok, SHAPE)
        monkeypatch.setattr(trainer, "evaluate", failing)
        with pytest.raises(MemoryError):
            train(model, TASK, cfg, run, tokenizer=tok, progress=False)
        monkeypatch.setattr(trainer, "evaluate", real)
        assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
        if edited:  # e.g. another seed's weights loaded into the object since
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
            with pytest.raises(ValueError, match="started from other weights"):
                train(model, TASK, cfg, run, tokenizer=tok, progress=False)
        else:
            train(model, TASK, cfg, run, tokenizer=tok, progress=False)
            assert_same_weights(weights(whole), weights(model))


@pytest.mark.parametrize("where", ["the second update", "the final checkpoint"])
def test_a_model_left_by_an_error_before_any_checkpoint_is_not_trained_again_from_step_0(
    tmp_path, monkeypatch, where
):
    """Audit 150: an error before the run's first checkpoint (in the second optimizer
    update; or the final checkpoint failing, e.g. disk full, with ``checkpoint_every=None``)
    leaves the model object trained part of the way, and no checkpoint to resume. Calling
    ``train`` again with that object (the notebook workflow the docstring promises) found
    no checkpoint and started again from step 0, from the updated weights: silently not
    the uninterrupted run (final weights 1.5e-2 and 1.2e-2 off, another loss history).
    It is refused now; the freshly built model then gives the uninterrupted run."""
    import hooked_attnres.training.trainer as trainer

    tok = task_tokenizer(TASK)
    every = 2 if where == "the second update" else None
    cfg = config(steps=3, warmup_steps=1, eval_every=3, eval_size=8, checkpoint_every=every)
    whole = build_model("attnres", 0, tok, SHAPE, 2)
    train(whole, TASK, cfg, tmp_path / "whole", tokenizer=tok, progress=False)
    model, run = build_model("attnres", 0, tok, SHAPE, 2), tmp_path / "run"
    if where == "the second update":
        real, calls = torch.optim.AdamW.step, []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("an error inside the second update")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", failing)
    else:

        def failing(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(trainer, "atomic_directory", failing)
    with pytest.raises((RuntimeError, OSError)):
        train(model, TASK, cfg, run, tokenizer=tok, progress=False)
    monkeypatch.undo()
    assert not (run / "checkpoint").exists()
    for resume in (True, False):
        with pytest.raises(ValueError, match="left part-way through a run by an error.*build"):
            train(model, TASK, cfg, run, tokenizer=tok, progress=False, resume=resume)
    assert not (run / "checkpoint").exists()
    fresh = build_model("attnres", 0, tok, SHAPE, 2)
    train(fresh, TASK, cfg, run, tokenizer=tok, progress=False)
    assert_same_weights(weights(whole), weights(fresh))


@pytest.mark.parametrize("kind", ["attnres", "vanilla"])
@pytest.mark.parametrize("how", ["stop_after", "Ctrl-C", "the final model's write"])
def test_a_model_stopped_part_way_is_not_started_over_from_step_0(tmp_path, monkeypatch, kind, how):
    """Review 155: a model object stopped part-way through a run at its checkpoint
    (``stop_after``, Ctrl-C, or an error in the final model's write after the final
    checkpoint) and passed to ``train(..., resume=False)`` "started over" from its partly
    trained weights, silently not the run it claims (final weights 1.0e-2 off after
    ``stop_after=3`` of 4 steps), as audit 150 refused for an error before any checkpoint.
    It is refused now (also into a folder with no checkpoint); resuming it still gives the
    uninterrupted run, and so does starting over with a freshly built model."""
    import hooked_attnres.training.trainer as trainer

    tok = task_tokenizer(TASK)
    cfg = config(steps=4, warmup_steps=1, eval_every=2, eval_size=8, checkpoint_every=2)
    blocks = blocks_of(kind)
    whole = build_model(kind, 0, tok, SHAPE, **blocks)
    train(whole, TASK, cfg, tmp_path / "whole", tokenizer=tok, progress=False)
    model, run = build_model(kind, 0, tok, SHAPE, **blocks), tmp_path / "run"
    if how == "stop_after":
        train(model, TASK, cfg, run, tokenizer=tok, progress=False, stop_after=3)
    else:
        real, calls = (trainer.evaluate, trainer.save_model)[how != "Ctrl-C"], []

        def failing(*args, **kwargs):
            calls.append(1)
            if how == "Ctrl-C" and len(calls) == 2:  # the evaluation after step 4
                raise KeyboardInterrupt
            if how != "Ctrl-C" and len(calls) == 3:  # checkpoints 2, 4, then the model
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(trainer, real.__name__, failing)
        with pytest.raises((KeyboardInterrupt, OSError)):
            train(model, TASK, cfg, run, tokenizer=tok, progress=False)
        monkeypatch.undo()
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == (3 if how == "stop_after" else 4)
    for out in (run, tmp_path / "elsewhere"):
        with pytest.raises(ValueError, match="left part-way through a run by .*resume=True"):
            train(model, TASK, cfg, out, tokenizer=tok, progress=False, resume=False)
    with pytest.raises(ValueError, match="left part-way through a run by .*build the model"):
        train(model, TASK, cfg, tmp_path / "elsewhere", tokenizer=tok, progress=False)
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text()) == state
    train(model, TASK, cfg, run, tokenizer=tok, progress=False)  # resumed: the same run
    assert_same_weights(weights(whole), weights(model))
    fresh = build_model(kind, 0, tok, SHAPE, **blocks)
    train(fresh, TASK, cfg, run, tokenizer=tok, progress=False, resume=False)
    assert_same_weights(weights(whole), weights(fresh))


def test_eval_tasks_given_as_a_generator_are_evaluated(tmp_path):
    """``eval_tasks`` was read three times (type check, leak check, evaluation): a generator
    was empty by the third, so the run evaluated nothing and ended with ``final_accuracy
    {}``, silently. It is read once, and scores what a list scores."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=2, warmup_steps=0, eval_every=1, checkpoint_every=None)
    runs = {}
    for name, given in (("list", [TASK]), ("generator", (t for t in [TASK]))):
        model = build_model("attnres", 0, tok, SHAPE, 2)
        runs[name] = train(
            model, TASK, cfg, tmp_path / name, tokenizer=tok, progress=False, eval_tasks=given
        )
    assert runs["list"].final_accuracy.keys() == {TASK.name}
    assert runs["generator"].final_accuracy == runs["list"].final_accuracy
    assert runs["generator"].history == runs["list"].history
    with pytest.raises(ValueError, match="eval_tasks must be a list"):
        train(
            build_model("attnres", 0, tok, SHAPE, 2),
            TASK,
            cfg,
            tmp_path / "bad",
            tokenizer=tok,
            progress=False,
            eval_tasks=5,
        )


@pytest.mark.parametrize("flag", ["resume", "progress"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_the_flags_of_train_and_train_condition_are_true_or_false(tmp_path, flag, value):
    """``resume`` and ``progress`` were read by truthiness: ``resume="no"`` resumed the
    checkpoint it meant to start over from, ``progress="False"`` showed the bar. Both are
    refused by name, before any work, by `train` and `train_condition` alike."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    cfg = config(steps=2, warmup_steps=0)
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got {value!r}"):
        train(model, TASK, cfg, tmp_path / "a", tokenizer=tok, **{"progress": False, flag: value})
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got {value!r}"):
        train_condition("attnres", 0, tmp_path / "b", **{"progress": False, flag: value})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_false_starts_over_from_a_checkpoint(tmp_path):
    """The behaviour the flag check protects: ``resume=False`` over a stopped run's
    checkpoint trains every step again, from step 1 (with ``resume="no"`` it resumed)."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=4, warmup_steps=0, checkpoint_every=None)
    run = tmp_path / "run"
    train(
        build_model("attnres", 0, tok, SHAPE, 2),
        TASK,
        cfg,
        run,
        tokenizer=tok,
        progress=False,
        stop_after=2,
    )
    fresh = train(
        build_model("attnres", 0, tok, SHAPE, 2),
        TASK,
        cfg,
        tmp_path / "fresh",
        tokenizer=tok,
        progress=False,
    )
    again = train(
        build_model("attnres", 0, tok, SHAPE, 2),
        TASK,
        cfg,
        run,
        tokenizer=tok,
        progress=False,
        resume=False,
    )
    assert [r["step"] for r in again.history] == [1, 2, 3, 4]
    assert [r["loss"] for r in again.history] == [r["loss"] for r in fresh.history]


def test_train_condition_refuses_bad_arguments_by_their_own_names(tmp_path):
    """``train_condition`` refused ``num_blocks=0`` as ``attnres_num_blocks=0`` (a config
    field the caller did not write), a task given as a string or a list with an
    ``AttributeError`` (``'str' object has no attribute 'words'``). Both are refused by
    name, before any work."""
    out = tmp_path / "run"
    for bad in (0, True, 2.0):
        # (None: the default, STUDY_BLOCKS for 'attnres'; a vanilla model has no blocks)
        with pytest.raises(
            ValueError, match=rf"^num_blocks must be an integer >= 1 or None, got {bad!r}"
        ):
            train_condition("attnres", 0, out, num_blocks=bad)
    for name, value in (("task", "retrieval"), ("eval_task", [TASK])):
        with pytest.raises(TypeError, match=rf"^{name} must be a Task"):
            train_condition("attnres", 0, out, **{name: value})
    assert not out.exists()


def test_a_vanilla_condition_refuses_num_blocks_it_would_ignore(tmp_path):
    """Audit 76: ``train_condition("vanilla", ..., num_blocks=6)`` trained the plain Qwen3
    (no blocks: the same weights as with ``num_blocks=2``) and recorded ``num_blocks`` 6 in
    its description (checkpoint, metrics.json), which no part of the run used; a grid
    vanilla condition ignored it too, and `build_model` for both. Refused by name, before
    any work; a 'vanilla' variant left without it records the recipe's `STUDY_BLOCKS`
    (the count the study's recency wrap reads it with), as before."""
    from hooked_attnres.study import STUDY_BLOCKS, get_condition

    tok = task_tokenizer(TASK)
    out = tmp_path / "run"
    message = (
        r"^num_blocks applies to Block AttnRes models; '{}' is a vanilla Qwen3, which has "
        r"no blocks, and would ignore it: leave num_blocks out \(the study wraps a vanilla "
        r"model with load_condition\(\.\.\., num_blocks=\.\.\.\)\)$"
    )
    grid = "hard_vanilla_L8"
    assert get_condition(grid).kind == "vanilla"
    with pytest.raises(ValueError, match=message.format("vanilla")):
        build_model("vanilla", 0, tok, SHAPE, 2)
    tiny = dict(task=TASK, config=config(steps=1, warmup_steps=0), shape=SHAPE, progress=False)
    for condition, blocks in (("vanilla", 6), ("vanilla", STUDY_BLOCKS), (grid, 4)):
        with pytest.raises(ValueError, match=message.format(condition)):
            get_condition(condition).build(0, tok, SHAPE, blocks)
        with pytest.raises(ValueError, match=message.format(condition)):
            train_condition(condition, 0, out, num_blocks=blocks, **tiny)
    assert not out.exists()
    run = train_condition(
        "vanilla",
        0,
        out,
        task=TASK,
        config=config(steps=1, warmup_steps=0, eval_every=1),
        shape=SHAPE,
        progress=False,
    )
    metrics = json.loads((run.out_dir / "metrics.json").read_text())
    assert metrics["description"]["num_blocks"] == get_condition("vanilla").num_blocks


def test_a_grid_recipe_refuses_a_num_blocks_other_than_its_own(tmp_path, monkeypatch):
    """Audit 84: ``train_condition`` took ``num_blocks=STUDY_BLOCKS`` (4) for "left out",
    so ``train_condition("hard_cumulative_L16", ..., num_blocks=4)`` trained the recipe's 8
    blocks (16 layers, two per block), ignoring the 4 asked for, while ``num_blocks=3`` was
    refused as a variation of a fixed recipe. A grid recipe now refuses every count but its
    own, and takes its own (the recipe, not a variation). No training: ``train`` is
    replaced by a stand-in that records the model it is given."""
    import hooked_attnres.study.conditions as conditions
    from hooked_attnres.study import STUDY_BLOCKS, get_condition

    built = []

    def record(model, *args, **kwargs):
        built.append((model.cfg.attnres_num_blocks, kwargs["description"]["num_blocks"]))

    monkeypatch.setattr(conditions, "train", record)
    out = tmp_path / "run"
    for name in ("hard_cumulative_L16", "hard_kimi_L16"):
        recipe = get_condition(name)
        own = recipe.n_layers // 2  # the grid's two layers per block
        assert own != STUDY_BLOCKS
        for asked in (STUDY_BLOCKS, own + 1):
            with pytest.raises(ValueError, match=rf"^'{name}' is a fixed recipe; to vary it"):
                train_condition(name, 0, out, num_blocks=asked, progress=False)
        assert built == []
        for asked in (own, None):  # its own count, given or left out: the recipe
            train_condition(name, 0, out, num_blocks=asked, progress=False)
            assert built.pop() == (own, own)
    train_condition("attnres", 0, out, num_blocks=STUDY_BLOCKS, progress=False)
    assert built.pop() == (STUDY_BLOCKS, STUDY_BLOCKS)  # 'attnres': 8 layers in 4 blocks
    assert not out.exists()


def test_train_condition_gives_a_longer_task_a_context_that_holds_its_prompts(
    tmp_path, monkeypatch
):
    """Audit 127: the original two built the study's shape (``n_ctx`` 64) whatever the
    task: ``--task-arg n_pairs=40 n_keys=40 n_values=40`` (prompts of 83 tokens) was
    refused for ``attnres`` at its first training step ("sequence length 83 exceeds
    n_ctx=64"), after the model was built, and trained ``vanilla`` silently past its
    ``max_position_embeddings`` of 64. Like a grid recipe (`Condition.shape`), the context
    now holds the longest prompt of the task and the evaluation task; a ``shape`` whose
    ``n_ctx`` does not is refused before the model is built. No training: ``train`` is
    replaced by a stand-in that runs the model it is given on the task's prompts."""
    import hooked_attnres.study.conditions as conditions
    from hooked_attnres.study import STUDY_SHAPE, study_task

    task = study_task(n_pairs=40, n_keys=40, n_values=40)
    evaluated = study_task(n_pairs=30, n_keys=40, n_values=40, n_distractors=30)
    longest = max(task.prompt_length, evaluated.prompt_length)
    assert task.prompt_length > STUDY_SHAPE["n_ctx"] and longest == evaluated.prompt_length
    seen = []

    def record(model, tasks, config, out_dir, tokenizer=None, **kwargs):
        batch = evaluated.sample(2, 0, "test", tokenizer.get_vocab())
        with torch.no_grad():  # the longest prompts run (a too short n_ctx refuses them)
            logits = model(batch.tokens)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        seen.append((tuple(logits.shape), kwargs["description"]["shape"]["n_ctx"]))

    monkeypatch.setattr(conditions, "train", record)
    out = tmp_path / "run"
    for kind in ("attnres", "vanilla"):
        train_condition(kind, 0, out, task=task, eval_task=evaluated, progress=False)
    assert [n_ctx for _, n_ctx in seen] == [longest, longest]
    assert [shape[1] for shape, _ in seen] == [longest, longest]
    short = dict(STUDY_SHAPE, n_ctx=longest - 1)
    for kind in ("attnres", "vanilla"):
        with pytest.raises(
            ValueError,
            match=rf"^shape's n_ctx={longest - 1} is shorter than the prompts of eval_task "
            rf"\({longest} tokens\)",
        ):
            train_condition(kind, 0, out, task=task, eval_task=evaluated, shape=short)
    with pytest.raises(TypeError, match=r"^shape must be a dict of HookedAttnResConfig fields"):
        train_condition("attnres", 0, out, task=task, shape=[("n_ctx", 128)])
    assert len(seen) == 2 and not out.exists()


def test_train_condition_takes_a_task_that_defines_only_words_and_draw(tmp_path, monkeypatch):
    """Review 135: `Task`'s contract is ``words`` and ``_draw`` (its docstring); audit 127's
    context (`train_condition` grows ``n_ctx`` to the task's ``prompt_length``) read a
    ``prompt_length`` such a task does not define, and raised a bare
    ``NotImplementedError`` where it trained before. Its prompts' length is now that of a
    drawn prompt: the context holds them, checked against the width of a sampled batch
    (prompts shorter and longer than the study's 64 tokens). No training: ``train`` is
    replaced by a stand-in that runs the model it is given on the task's prompts."""
    from dataclasses import dataclass

    import hooked_attnres.study.conditions as conditions
    from hooked_attnres.study import STUDY_SHAPE
    from hooked_attnres.tasks import Task

    @dataclass(frozen=True)
    class Repeat(Task):  # the first word again after `length` words
        length: int = 5
        name: str = "repeat"

        def words(self):
            return [f"w{i}" for i in range(8)]

        def _draw(self, rng, vocab):
            ids = [vocab["<bos>"], *(vocab[f"w{i}"] for i in rng.integers(0, 8, self.length))]
            other = vocab["w0"] if ids[1] != vocab["w0"] else vocab["w1"]
            return ids, ids[1], other, ids, {}

    seen = []

    def record(model, task, config, out_dir, tokenizer=None, **kwargs):
        tokens = task.sample(2, 0, "train", tokenizer.get_vocab()).tokens
        with torch.no_grad():  # a context shorter than the prompts refuses them
            logits = model(tokens)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        seen.append((tokens.shape[1], logits.shape[1], kwargs["description"]["shape"]["n_ctx"]))

    monkeypatch.setattr(conditions, "train", record)
    for length in (5, 80):
        for kind in ("attnres", "vanilla"):
            train_condition(kind, 0, tmp_path / "run", task=Repeat(length), progress=False)
    widths = [width for width, _, _ in seen]
    assert widths == [6, 6, 81, 81]  # <bos> and the words: prompts of length + 1 tokens
    assert [n_ctx for _, _, n_ctx in seen] == [max(STUDY_SHAPE["n_ctx"], w) for w in widths]
    assert [positions for _, positions, _ in seen] == widths
    for shipped in (KeyValueRetrieval(n_pairs=7, n_distractors=2), InductionCopy()):
        assert Task.prompt_length.fget(shipped) == shipped.sample(1).tokens.shape[1]


def test_an_unfinished_run_names_no_model_not_an_earlier_runs(tmp_path):
    """``train(..., stop_after=k)`` returned ``model_dir = out_dir/model`` although only a
    finished run writes it: over an earlier finished run (here of other settings, started
    over with ``resume=False``) it named that run's model, whose weights are not the ones
    this call trained. An unfinished run has ``model_dir`` ``None``; its state is the
    checkpoint (``out_dir/checkpoint/model``); once finished, ``model_dir`` is the model."""
    tok = task_tokenizer(TASK)
    run = tmp_path / "run"
    earlier = train(
        build_model("attnres", 0, tok, SHAPE, 2),
        TASK,
        config(steps=2, warmup_steps=0, checkpoint_every=None),
        run,
        tokenizer=tok,
        progress=False,
    )
    assert earlier.model_dir == run / "model"
    earlier_metrics = (run / "metrics.json").read_bytes()
    cfg = config(steps=4, warmup_steps=0, checkpoint_every=None)
    model = build_model("attnres", 1, tok, SHAPE, 2)
    partial = train(
        model, TASK, cfg, run, tokenizer=tok, progress=False, resume=False, stop_after=2
    )
    assert partial.steps == 2 and partial.model_dir is None
    # audit 76: the call's own facts; metrics.json is the earlier run's, untouched (only a
    # finished run writes it), and step 2 is no evaluation step (eval_every 6): no accuracy
    assert [h["step"] for h in partial.history] == [1, 2] and partial.final_accuracy == {}
    assert (run / "metrics.json").read_bytes() == earlier_metrics
    # what the call left: the checkpoint holds this model, out_dir/model the earlier run's
    saved = HookedAttnRes.from_pretrained(run / "checkpoint" / "model")
    assert_same_weights(weights(saved), weights(model))
    kept = HookedAttnRes.from_pretrained(run / "model")
    earlier_weights = weights(kept)
    assert any(not torch.equal(earlier_weights[n], w) for n, w in weights(model).items())
    finished = train(
        build_model("attnres", 1, tok, SHAPE, 2), TASK, cfg, run, tokenizer=tok, progress=False
    )
    assert finished.steps == 4 and finished.model_dir == run / "model"


def test_train_condition_refuses_a_leaking_eval_task_by_its_own_name(tmp_path):
    """A ``train_condition`` evaluation task that is not held out from its training task
    was refused as ``eval_tasks: ...``, `train`'s argument, after the model was built; it is
    refused as ``eval_task``, the argument the caller wrote, before any work."""
    trained = InductionCopy(seq_len=6, copy_len=4, n_tokens=8)
    held_out = InductionCopy(seq_len=6, copy_len=2, n_tokens=8)
    assert held_out.leaks_into(trained) is not None
    with pytest.raises(ValueError, match=r"^eval_task: .*not held out from training"):
        train_condition("attnres", 0, tmp_path / "run", task=trained, eval_task=held_out)
    assert not (tmp_path / "run").exists()


def test_an_eval_task_that_is_no_task_is_refused_as_eval_tasks(tmp_path):
    """An ``eval_tasks`` entry that is no `Task` was refused as ``tasks must be Task
    objects``, the other argument's name; each list is named as given."""
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    cfg = config(steps=1, warmup_steps=0)
    for given, name in (({"tasks": [TASK, 5]}, "tasks"), ({"eval_tasks": [TASK, 5]}, "eval_tasks")):
        tasks = given.get("tasks", TASK)
        with pytest.raises(TypeError, match=rf"^{name} must be Task objects, got int"):
            train(
                model,
                tasks,
                cfg,
                tmp_path / "run",
                tokenizer=tok,
                progress=False,
                eval_tasks=given.get("eval_tasks"),
            )
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_and_training_state_outside_ascii_are_written_and_read_whatever_the_locale(
    tmp_path, monkeypatch
):
    """Audit 74: the package's JSON and text files (`_atomic`'s completion marker,
    ``config.json``, ``trainer_state.json``, ``metrics.json``, the tokenizer's files) are
    written and read in UTF-8 whatever the locale. Under an ASCII locale (emulated: every
    text ``open`` / ``Path.read_text`` / ``Path.write_text`` without an encoding is ASCII,
    as for the tokenizer_config test) a run with a special token and a description outside
    ASCII writes its checkpoint (this package's format), resumes from it to the
    uninterrupted run's weights, and its final model loads back with the token."""

    tok = task_tokenizer(TASK)
    tok.add_special_tokens({"additional_special_tokens": ["<｜think｜>"]})
    description = {"note": "Übung – α"}
    cfg = config(steps=4, checkpoint_every=2, eval_every=2)

    def run(out, stop_after=None):
        return trained_attnres(tok, cfg, out, stop_after=stop_after, description=description)

    whole = run(tmp_path / "whole")  # in the real locale: the reference
    emulate_ascii_locale(monkeypatch)
    out = tmp_path / "ascii locale"
    run(out, stop_after=2)  # the checkpoint at step 2, then resumed from it
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_bytes().decode("utf-8"))
    assert state["description"] == description
    resumed = run(out)
    assert_same_weights(weights(whole), weights(resumed))
    metrics = json.loads((out / "metrics.json").read_bytes().decode("utf-8"))
    assert metrics["description"] == description
    loaded = HookedAttnRes.from_pretrained(out / "model")
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    assert loaded.to_str_tokens("<｜think｜>", prepend_bos=False) == ["<｜think｜>"]


def _files_of(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("kind", ["study", "model", "shipped", "own_files", "own_model"])
def test_train_refuses_an_out_dir_that_is_not_a_run_folder(kind, tmp_path):
    """Audit 126: ``train(out_dir=X)`` replaced ``X/model`` and deleted ``X/metrics.json``
    when X was no training run's folder: a copy of a shipped checkpoint's folder (its model
    and accuracy were replaced by a new run's), a folder of the user's own ``metrics.json``,
    a model saved by this library at ``X/model``; and it wrote its run into a study's or a
    model's folder. Refused before any work; every file stays byte for byte."""
    import shutil

    from hooked_attnres._atomic import atomic_directory
    from hooked_attnres.study import run_dir

    tok = task_tokenizer(TASK)
    out = tmp_path / "out"
    if kind == "study":  # a folder written by a study (its marker lists run.json, report.md)
        with atomic_directory(out) as tmp:
            (tmp / "run.json").write_text("{}")
            (tmp / "report.md").write_text("# report\n")
        match = "not a training run's folder but another save of this library"
    elif kind in ("model", "own_model"):  # a model saved by this library, as X or X/model
        build_model("attnres", 0, tok, SHAPE, 2).save_pretrained(
            out if kind == "model" else out / "model"
        )
        match = (
            "not a training run's folder but another save"
            if kind == "model"
            else r"its model/ \(holding .*model\.safetensors.*\) is not a training run's"
        )
    elif kind == "shipped":
        shipped = run_dir(Path(__file__).parent.parent / "hooked_attnres/data/study", "attnres", 0)
        shutil.copytree(shipped, out)
        match = r"its model/ \(holding .*model\.safetensors.*\) and metrics.json are not a training"
    else:
        out.mkdir()
        (out / "metrics.json").write_text('{"mine": 1}\n')
        (out / "notes.txt").write_text("notes\n")
        match = "its metrics.json is not a training run's"
    before = _files_of(out)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    for resume in (True, False):
        with pytest.raises(
            FileExistsError, match=f"refusing to train into {re.escape(str(out))}: .*{match}"
        ):
            train(model, TASK, config(steps=2), out, tokenizer=tok, progress=False, resume=resume)
    assert _files_of(out) == before


def test_train_into_an_earlier_run_folder_is_still_allowed(tmp_path):
    """The refusal of audit 126 leaves a run's own folder: resumed, or started over."""
    tok = task_tokenizer(TASK)
    trained_attnres(tok, config(steps=2, eval_every=2, checkpoint_every=None), tmp_path)
    cfg = config(steps=2, eval_every=2, checkpoint_every=None)
    result = train(
        build_model("attnres", 0, tok, SHAPE, 2),
        TASK,
        cfg,
        tmp_path,
        tok,
        resume=False,
        progress=False,
    )
    assert result.model_dir == tmp_path / "model" and (tmp_path / "metrics.json").is_file()


def test_train_into_a_folder_with_an_empty_model_folder_is_allowed(tmp_path):
    """Review 131: audit 126's check refused an ``out_dir`` whose ``model/`` is an empty
    folder ("its model is not a training run's ..., and the run would replace them"),
    though it holds nothing to replace (a save may replace an empty folder,
    `check_replaceable`) and trained before. The run equals one into a new folder."""
    tok = task_tokenizer(TASK)
    cfg = config(steps=2, eval_every=2, checkpoint_every=None)
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    trained_attnres(tok, cfg, out)
    trained_attnres(tok, cfg, tmp_path / "new")
    assert_same_weights(
        weights(HookedAttnRes.from_pretrained(out / "model")),
        weights(HookedAttnRes.from_pretrained(tmp_path / "new" / "model")),
    )


def test_the_documented_recipes_are_the_code_defaults():
    """docs/training.md states the optimiser settings twice: `TrainConfig`'s own defaults
    (the generic recipe) and the study's (`study_train_config`). Both statements, read from
    the page, equal the code's values (the `TrainConfig` docstring called its defaults the
    study's until audit 154: 2000 steps at lr 2e-3 against the study's 1200 at 5e-4)."""
    from hooked_attnres.study import study_train_config

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    page = re.sub(r"\s+", " ", page)
    number = r"([0-9.e-]+)"
    shared = re.search(
        rf"AdamW \(betas {number}/{number}, weight decay {number}\), linear warm-up then "
        rf"cosine decay to {number} % of the peak, gradient clipping at {number};",
        page,
    )
    generic = re.search(
        rf"`TrainConfig\(\)`'s own defaults are these and {number} steps of {number} prompts "
        rf"at peak lr {number}, {number} warm-up steps, held-out accuracy every {number} "
        rf"steps on {number} prompts, a checkpoint every {number} steps",
        page,
    )
    study = re.search(
        rf"optimisation \(`study_train_config\(\*\*overrides\)`\) \| {number} steps x "
        rf"{number} prompts, peak lr {number}, {number} warm-up steps, eval every {number} "
        rf"steps on {number} held-out prompts",
        page,
    )
    study_checkpoints = re.search(rf"peak lr {number} with a checkpoint every {number} \(", page)
    assert shared and generic and study and study_checkpoints

    def settings(cfg: TrainConfig) -> list[float]:
        return [cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.eval_every]

    for cfg in (TrainConfig(), study_train_config()):
        documented = [float(v) for v in shared.groups()]
        assert documented == [*cfg.betas, cfg.weight_decay, 100 * cfg.min_lr_ratio, cfg.grad_clip]
    ours, theirs = TrainConfig(), study_train_config()
    documented = [float(v) for v in generic.groups()]
    assert documented == [*settings(ours), ours.eval_size, ours.checkpoint_every]
    assert [float(v) for v in study.groups()] == [*settings(theirs), theirs.eval_size]
    assert [float(v) for v in study_checkpoints.groups()] == [theirs.lr, theirs.checkpoint_every]


def test_evaluate_refuses_chunks_under_an_attached_mean_patch():
    """`evaluate` runs a batch in chunks of ``chunk`` prompts: under an attached
    ``value="mean"`` patch each chunk was patched with its own prompts' mean, not the
    batch's (review of audit 163: 64 prompts, tiny kimi model, a patch of the embedding
    by its mean: accuracy 0.1875 with ``chunk=2`` where the whole batch's pass under the
    same hook gives 0.0156). Refused as the chunked analyses refuse it; in one pass
    (``chunk`` >= the prompts) the accuracy is the whole pass's under the hook."""
    from helpers import randomize_routing, tiny_model

    from hooked_attnres.interventions import patch_committed
    from hooked_attnres.tasks.base import TaskBatch

    model = randomize_routing(tiny_model(attnres_layout="kimi", dtype=torch.float64)).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(50, (8, 5), generator=generator)
    with torch.no_grad():
        answer = model(tokens)[:, -1].argmax(-1)  # accuracy 1.0 without the hook
    targets = torch.full((8, 5), -100)
    targets[:, -1] = answer
    batch = TaskBatch(tokens, torch.full((8,), 4), answer, (answer + 1) % 50, tokens, targets)
    with model.hooks(fwd_hooks=patch_committed(model, "embedding", "mean")):
        with torch.no_grad():
            want = (model(tokens)[:, -1].argmax(-1) == answer).double().mean().item()
        assert evaluate(model, {"t": batch}, chunk=8) == {"t": want}
        with pytest.raises(ValueError, match="evaluate runs the 8 prompts in passes of chunk=2"):
            evaluate(model, {"t": batch}, chunk=2)
    assert evaluate(model, {"t": batch}, chunk=2) == {"t": 1.0}  # the hook detached


def test_evaluate_is_batch_accuracy_whatever_the_chunk_with_tie_shares():
    """Review 185: `evaluate` summed each chunk's `TaskBatch.correct` in float32, which
    rounds a sum of the 1/3 shares of three-way ties (audit 184): 7 such prompts read
    0.33333332198006765 in one chunk, where `TaskBatch.accuracy` of the same logits reads
    0.3333333432674408 (the float32 share, as every prompt's), and chunks of 3 read
    0.33333333475249155. Now both sum in float64 (exact for these shares) and agree for
    any chunk."""
    from types import SimpleNamespace

    from hooked_attnres.tasks.base import TaskBatch

    class EveryTokenTies(torch.nn.Module):  # a causal LM whose logits are all 0: k = d_vocab
        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3))

    n = 7
    batch = TaskBatch(
        tokens=torch.zeros(n, 2, dtype=torch.long),
        answer_pos=torch.ones(n, dtype=torch.long),
        answer=torch.arange(n) % 3,
        contrast=(torch.arange(n) + 1) % 3,
        corrupted_tokens=torch.zeros(n, 2, dtype=torch.long),
        targets=torch.full((n, 2), -100),
    )
    share = torch.tensor(1 / 3, dtype=torch.float32).item()  # the float32 of 1/3
    assert batch.accuracy(torch.zeros(n, 2, 3)) == share
    for chunk in (1, 2, 3, 256):
        assert evaluate(EveryTokenTies(), {"t": batch}, chunk=chunk) == {"t": share}, chunk


def test_an_optimizer_pt_written_by_torch_save_to_a_path_still_resumes_exactly(
    tmp_path, monkeypatch
):
    """Review 187: since audit 178 `_torch_save` gives torch.save a file object, so the
    zip entries of ``optimizer.pt`` are named ``archive/...``; a checkpoint of an earlier
    version (torch.save to the path: ``optimizer/...``) must still resume to the
    uninterrupted run, bitwise."""
    import zipfile

    from hooked_attnres.training import trainer

    tok = task_tokenizer(TASK)
    whole = build_model("attnres", 0, tok, SHAPE, **blocks_of("attnres"))
    train(whole, TASK, config(), tmp_path / "whole", tokenizer=tok, progress=False)
    monkeypatch.setattr(trainer, "_torch_save", lambda value, path: torch.save(value, path))
    parts = build_model("attnres", 0, tok, SHAPE, **blocks_of("attnres"))
    train(parts, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False, stop_after=7)
    saved = zipfile.ZipFile(tmp_path / "parts" / "checkpoint" / "optimizer.pt").namelist()
    assert saved[0].startswith("optimizer/"), saved  # as the earlier version wrote it
    monkeypatch.undo()
    fresh = build_model("attnres", 0, tok, SHAPE, **blocks_of("attnres"))
    second = train(fresh, TASK, config(), tmp_path / "parts", tokenizer=tok, progress=False)
    assert second.steps == 12
    assert_same_weights(weights(whole), weights(fresh))
    rewritten = zipfile.ZipFile(tmp_path / "parts" / "checkpoint" / "optimizer.pt").namelist()
    assert rewritten[0].startswith("archive/"), rewritten  # the checkpoint the resume wrote


def test_a_library_training_leaves_the_sigterm_handler_alone(tmp_path, monkeypatch):
    """Audit 188 (guard): only the command line turns SIGTERM into an interrupt; `train`
    called from Python installs no SIGTERM handler, not even while it holds Ctrl-C back
    inside an optimizer update (SIGTERM left to the system ends the process there, as the
    caller chose)."""
    import signal

    tok = task_tokenizer(TASK)
    real_step, seen = torch.optim.AdamW.step, []

    def recording(self, *args, **kwargs):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    trained_attnres(tok, config(steps=2, eval_every=2, eval_size=4, batch_size=2), tmp_path)
    assert len(seen) == 2
    for sigterm, sigint in seen:
        assert sigterm is signal.SIG_DFL
        assert sigint is not signal.default_int_handler  # Ctrl-C is held back there
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_progress_hides_the_bar_transformers_shows_when_a_vanilla_model_is_saved(
    tmp_path, capsys
):
    """Audit 188: ``progress=False`` (``--no-progress``) hid the trainer's bar but not
    ``transformers``' ``Writing model shards`` bar, drawn on stderr by every save of a
    vanilla model (each checkpoint and the final model). It is hidden now, only during the
    save: the hook transformers had (here a caller's) is put back after."""
    from transformers.utils import logging as hf_logging

    tok = task_tokenizer(TASK)
    small = config(steps=2, eval_every=2, eval_size=4, batch_size=2, checkpoint_every=1)

    def trained(out, progress: bool) -> str:
        model = build_model("vanilla", 0, tok, SHAPE, **blocks_of("vanilla"))
        train(model, TASK, small, tmp_path / out, tokenizer=tok, progress=progress)
        return capsys.readouterr().err

    assert "Writing model shards" in trained("shown", True)  # the bar this is about
    created = []

    def callers_hook(factory, args, kwargs):
        created.append(kwargs.get("desc"))
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(callers_hook)
    try:
        err = trained("hidden", False)
        assert hf_logging.set_tqdm_hook(previous) is callers_hook  # put back
    finally:
        hf_logging.set_tqdm_hook(previous)
    assert "Writing model shards" not in err and "it/s" not in err, err
    assert created == []  # no bar was made at all, not even through the caller's hook


def test_a_ctrl_c_as_the_deferral_ends_does_not_swallow_sigterm_for_good(monkeypatch):
    """Review 194: `_interrupts_deferred` put SIGINT's handler back, then SIGTERM's; a
    Ctrl-C handled between the two (its KeyboardInterrupt raised there) left the holding
    handler as SIGTERM's for good, so every later SIGTERM was appended to a list nobody
    reads: a caller's handler (here one that records) never ran again. A SIGTERM after the
    block reaches the caller's handler now, however the block was left."""
    import signal

    from hooked_attnres.training.trainer import _interrupts_deferred

    real_signal, armed, called = signal.signal, [True], []

    def ctrl_c_as_sigint_is_put_back(signum, handler):
        previous = real_signal(signum, handler)
        if signum == signal.SIGINT and handler is signal.default_int_handler and armed:
            armed.clear()
            raise KeyboardInterrupt  # Ctrl-C, handled right after its handler is back
        return previous

    def callers_handler(signum, frame):
        called.append(signum)

    previous = real_signal(signal.SIGTERM, callers_handler)
    try:
        monkeypatch.setattr(signal, "signal", ctrl_c_as_sigint_is_put_back)
        with pytest.raises(KeyboardInterrupt), _interrupts_deferred():
            pass
        monkeypatch.undo()
        signal.raise_signal(signal.SIGTERM)
        assert called == [signal.SIGTERM]
    finally:
        real_signal(signal.SIGTERM, previous)


def test_saves_of_two_threads_without_progress_put_transformers_hook_back(tmp_path):
    """Review 194: `_transformers_bars_hidden` swapped transformers' global tqdm hook per
    save; two threads saving with ``progress=False`` whose saves overlap (A starts, B
    starts, A ends, B ends) left the hiding hook in place for good (B put back the hook
    it had found: A's), so every later bar of transformers was hidden. The order is
    driven here by hand, in one thread."""
    from transformers.utils import logging as hf_logging

    from hooked_attnres.training.trainer import _transformers_bars_hidden

    def callers_hook(factory, args, kwargs):
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(callers_hook)
    try:
        a, b = _transformers_bars_hidden(), _transformers_bars_hidden()
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        shown = hf_logging.tqdm(range(3), desc="during B").disable
        b.__exit__(None, None, None)
        assert shown is True  # B's save still hides its bars
        assert hf_logging.set_tqdm_hook(previous) is callers_hook  # put back
    finally:
        hf_logging.set_tqdm_hook(previous)
