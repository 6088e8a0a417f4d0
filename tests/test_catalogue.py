"""The reliability catalogue: faults and bad inputs, one case each (``docs/reliability.md``).

Part 1, crashes: saves and training killed with SIGKILL at every step of the atomic save
(fault injection), at random moments, and under two concurrent writers plus a reader.
After every crash the next load gives a complete saved version (the newest committed
one) and no leftover remains. Children are forked (no interpreter start-up) and never
sleep.

Part 2, bad input: every case asserts the exception type and the key words of its
message; none may return a silently wrong result or crash the process.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch
from crash_helpers import EXITED, KILLED, Reporter, run_forked
from helpers import tiny_model

from hooked_attnres import HookedAttnRes
from hooked_attnres._atomic import FAULT_STEPS, MARKER, leftovers_of, read_marker

# --- part 1: crashes ---------------------------------------------------------------------

SAVE_STEPS = FAULT_STEPS[: FAULT_STEPS.index("done") + 1]
COMMITTED_FROM = SAVE_STEPS.index("committed")  # a kill from here on keeps the new version


def version(tag: int) -> HookedAttnRes:
    """A tiny model whose weights and config both carry ``tag`` (to spot mixed versions)."""
    model = tiny_model(seed=tag % 7, model_name=f"v{tag}")
    with torch.no_grad():
        model.embed.W_E[0, 0] = float(tag)
    return model


def tag_of(model: HookedAttnRes) -> int:
    """The tag of a loaded model; fails if config and weights come from different saves."""
    from_config = int(model.cfg.model_name[1:])
    from_weights = int(model.embed.W_E[0, 0].item())
    assert from_config == from_weights, (
        f"mixed versions: config v{from_config}, weights v{from_weights}"
    )
    assert torch.equal(
        model.state_dict()["blocks.0.attn.W_Q"],
        version(from_config).state_dict()["blocks.0.attn.W_Q"],
    )
    return from_config


def assert_clean(target) -> None:
    assert leftovers_of(target) == [], f"leftovers remain: {leftovers_of(target)}"


def save(tag: int, target) -> None:
    version(tag).save_pretrained(target)


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_kill_at_each_step_of_a_save_over_a_checkpoint(tmp_path, step):
    target = tmp_path / "ckpt"
    save(1, target)
    outcome = run_forked(save, 2, target, crash_at=step)
    assert outcome == KILLED
    expected = 2 if SAVE_STEPS.index(step) >= COMMITTED_FROM else 1
    assert tag_of(HookedAttnRes.from_pretrained(target)) == expected
    assert_clean(target)
    assert read_marker(target)["sequence"] == expected
    save(3, target)  # and the next save works and counts on
    assert read_marker(target)["sequence"] == expected + 1
    assert tag_of(HookedAttnRes.from_pretrained(target)) == 3


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_kill_at_each_step_of_a_first_save(tmp_path, step):
    target = tmp_path / "ckpt"
    outcome = run_forked(save, 2, target, crash_at=step)
    reached = step not in ("moved_aside", "discard_marker", "discard_partial")  # no old version
    assert outcome == (KILLED if reached else EXITED)
    if SAVE_STEPS.index(step) >= COMMITTED_FROM or not reached:
        assert tag_of(HookedAttnRes.from_pretrained(target)) == 2
    else:
        with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
            HookedAttnRes.from_pretrained(target)
    assert_clean(target)


@pytest.mark.parametrize(
    "first, second",
    [
        ("moved_aside", "recover_installed"),  # recovery killed after installing the newest
        ("moved_aside", "discard_marker"),  # ... while discarding the old version
        ("moved_aside", "discard_partial"),
        ("committed", "recover_moved_aside"),  # ... between its two renames
        ("installed", "discard_partial"),
    ],
)
def test_kill_during_recovery(tmp_path, first, second):
    """A crash leaves leftovers; the load that recovers them is killed too; the next load
    still finds the newest complete version."""
    target = tmp_path / "ckpt"
    save(1, target)
    assert run_forked(save, 2, target, crash_at=first) == KILLED
    outcome = run_forked(HookedAttnRes.from_pretrained, target, crash_at=second)
    assert outcome == KILLED
    assert tag_of(HookedAttnRes.from_pretrained(target)) == 2
    assert_clean(target)


def _save_forever(report, target, tags) -> None:
    for index in range(10_000):
        save(tags[index % len(tags)], target)
        report.write(f"{index}\n")


@pytest.mark.parametrize("seed", range(4))
def test_kill_at_a_random_moment(tmp_path, seed):
    """The child saves in a loop and reports each finished save; the parent kills it
    right after a random number of reports, i.e. somewhere inside a later save."""
    rng = random.Random(seed)
    target = tmp_path / "ckpt"
    tags = [10, 11, 12]
    child = Reporter(_save_forever, target, tags)
    done = child.wait_for(rng.randint(1, 4))
    assert child.kill() == KILLED
    last = int(done[-1])
    # the save reported last, or one that was committed after it
    allowed = {tags[i % 3] for i in range(last, last + 3)}
    assert tag_of(HookedAttnRes.from_pretrained(target)) in allowed
    assert_clean(target)


def _writer(report, target, tags) -> None:
    for tag in tags:
        save(tag, target)
        report.write(f"{tag}\n")


def test_two_concurrent_writers_and_a_reader(tmp_path):
    """Writer A (a forked process) and writer B (a thread) save alternately tagged
    versions to one directory while the main thread loads it: every save succeeds, and
    every load sees one complete version (config and weights of the same save)."""
    target = tmp_path / "ckpt"
    save(100, target)
    a_tags, b_tags = list(range(101, 109)), list(range(201, 209))
    writer_a = Reporter(_writer, target, a_tags)
    errors: list[BaseException] = []

    def writer_b() -> None:
        try:
            for tag in b_tags:
                save(tag, target)
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=writer_b)
    thread.start()
    seen = []
    while thread.is_alive() or len(seen) < 3:
        seen.append(tag_of(HookedAttnRes.from_pretrained(target)))
        if not thread.is_alive() and len(seen) >= 3:
            break
    thread.join()
    assert writer_a.wait_for(len(a_tags)) == [str(t) for t in a_tags]
    assert writer_a.join() == EXITED
    assert errors == []
    assert set(seen) <= {100, *a_tags, *b_tags}
    final = tag_of(HookedAttnRes.from_pretrained(target))
    assert final in (a_tags[-1], b_tags[-1])
    assert read_marker(target)["sequence"] == 1 + len(a_tags) + len(b_tags)  # no save lost
    assert_clean(target)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "config.json", "model.safetensors"]


# --- the trainer killed and resumed ---------------------------------------------------------


def _train_kwargs():
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
    from hooked_attnres.training import TrainConfig

    task = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6, n_queries=1)
    tok = task_tokenizer(task)
    shape = dict(d_model=16, n_layers=2, n_heads=2, n_key_value_heads=1, d_mlp=24, n_ctx=32)
    model = build_model("attnres", 0, tok, shape, 2)
    config = TrainConfig(
        steps=6,
        batch_size=8,
        lr=3e-3,
        warmup_steps=1,
        eval_every=6,
        eval_size=8,
        checkpoint_every=2,
    )
    return model, task, config, tok


def _train(out_dir) -> None:
    from hooked_attnres.training import train

    model, task, config, tok = _train_kwargs()
    train(model, task, config, out_dir, tokenizer=tok, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    _train(out)
    return HookedAttnRes.from_pretrained(out / "model").state_dict()


@pytest.mark.parametrize(
    "crash_at",
    [
        "train_step:3",
        "train_step:5",
        "payload:2",
        "committed:2",
        "moved_aside:2",
        "discard_partial:1",
    ],
)
def test_trainer_killed_and_resumed_equals_uninterrupted(tmp_path, uninterrupted, crash_at):
    out = tmp_path / "run"
    assert run_forked(_train, out, crash_at=crash_at) == KILLED
    assert not (out / "model").exists()
    _train(out)  # resumes from the newest complete checkpoint
    resumed = HookedAttnRes.from_pretrained(out / "model").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert_clean(out / "checkpoint")
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
