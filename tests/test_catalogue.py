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

import functools
import json
import os
import pickle
import random
import shutil
import signal
import threading

import pandas as pd
import pytest
import torch
from crash_helpers import EXITED, KILLED, Reporter, fork_and_wait, run_forked
from helpers import tiny_model, unseal

from hooked_attnres import HookedAttnRes, HookedAttnResConfig
from hooked_attnres._atomic import FAULT_STEPS, MARKER, leftovers_of, read_marker
from hooked_attnres._tl import Slice
from hooked_attnres.analysis import bootstrap_ci, summarize_mass
from hooked_attnres.analysis.lens import lens_hook_names, routing_lens
from hooked_attnres.analysis.mass import band_of
from hooked_attnres.analysis.motifs import Criteria
from hooked_attnres.interventions.routing import batched_mask_hooks, mask_logits
from hooked_attnres.plotting import patching_heatmap, routing_heatmap
from hooked_attnres.study.report import verdict_matrix
from hooked_attnres.study.run import model_is_zero_query

# --- part 1: crashes ---------------------------------------------------------------------

SAVE_STEPS = FAULT_STEPS[: FAULT_STEPS.index("done") + 1]
COMMITTED_FROM = SAVE_STEPS.index("committed")  # a kill from here on keeps the new version


@functools.cache
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
    assert_clean(target)


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


@pytest.mark.parametrize("step", ["discard_marker", "discard_partial"])
def test_a_version_killed_while_discarded_never_comes_back_as_the_checkpoint(tmp_path, step):
    """Audit 150: a save killed while it discarded the old version left it as
    ``.NAME.old-*`` without its marker (deleted first), all or part of its files there. Once
    ``NAME`` was deleted (``rm -rf NAME``: the hidden leftover stays), the legacy restore
    (a lone ``.NAME.old-*`` without a marker: what saves before completion markers left)
    installed it as ``NAME``: the deleted checkpoint came back as the older version,
    unchecked, or half deleted ("has no config.json"), and every later save was refused as
    "not written by this version of the library". The version being discarded is renamed
    to a ``.NAME.tmp-*`` first, which is never installed without its marker."""
    target = tmp_path / "ckpt"
    save(1, target)
    assert run_forked(save, 2, target, crash_at=step) == KILLED
    assert leftovers_of(target)  # the old version, half discarded
    shutil.rmtree(target)  # the user deletes the checkpoint (the hidden leftover stays)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        HookedAttnRes.from_pretrained(target)  # not version 1, nor a half-deleted one
    assert_clean(target)
    save(3, target)  # and a new save is not refused
    assert tag_of(HookedAttnRes.from_pretrained(target)) == 3


def _save_forever(report, target, tags) -> None:
    for index in range(10_000):
        save(tags[index % len(tags)], target)
        report.write(f"{index}\n")


@pytest.mark.parametrize("seed", range(4))
def test_kill_at_a_random_moment(tmp_path, seed):
    """The child saves in a loop and reports each finished save; the parent kills it
    right after a random number of reports, i.e. somewhere inside a later save
    (``CRASH_LOOP_SEED`` varies the draws in benchmarks/crash_loop.py)."""
    rng = random.Random(seed + int(os.environ.get("CRASH_LOOP_SEED", "0")))
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
        threads=1,  # the forked child trains with one thread; every run must match it
    )
    return model, task, config, tok


def _train(out_dir, **kwargs) -> None:
    from hooked_attnres.training import train

    model, task, config, tok = _train_kwargs()
    train(model, task, config, out_dir, tokenizer=tok, progress=False, **kwargs)


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


# --- part 2: bad input -----------------------------------------------------------------------
#
# Each case: (id, call, exception type, key words of the message). ``call(ctx)`` builds
# what it needs from the shared context (tiny models, caches, a fresh directory).


class Ctx:
    """Shared inputs of the bad-input cases (built once per module, lazily)."""

    def __init__(self, root):
        self.root = root
        self.model = tiny_model()  # cumulative, 4 layers, 2 blocks: 3 sources at layer 2
        self.tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
        self._cache = None
        self._count = 0

    def dir(self, name: str = "d"):
        """A fresh directory path (not created)."""
        self._count += 1
        return self.root / f"{name}{self._count}"

    @property
    def cache(self):
        if self._cache is None:
            self._cache = self.model.run_with_cache(self.tokens)[1]
        return self._cache

    def cache_of(self, **overrides):
        return tiny_model(**overrides).run_with_cache(self.tokens)[1]

    def saved(self):
        """A fresh copy of a saved checkpoint of the tiny model."""
        target = self.dir("ckpt")
        self.model.save_pretrained(target)
        return target

    def site_hook(self, layer: int, kind: str, hook: str) -> str:
        return self.model.site(layer, kind).hook(hook)

    def run_hook(self, name: str, fn) -> None:
        self.model.run_with_hooks(self.tokens, fwd_hooks=[(name, fn)])


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("catalogue"))


def _rewrite_config(directory, **changes):
    """Edit a saved config as another tool would write it (`unseal`)."""
    values = json.loads((directory / "config.json").read_text())
    values.update(changes)
    (directory / "config.json").write_text(json.dumps(values))
    unseal(directory)
    return directory


def _rewrite_weight(directory, key, fn):
    import safetensors.torch

    path = directory / "model.safetensors"
    state = safetensors.torch.load_file(str(path))
    state[key] = fn(state[key])
    safetensors.torch.save_file(state, str(path))
    unseal(directory)
    return directory


def _flip_a_weight_byte(directory):
    """Flip a bit of the last byte of the weights (tensor data: the file still parses)."""
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    return directory


def _user_folder(ctx):
    folder = ctx.dir("user")
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def _extra_file(ctx):
    target = ctx.saved()
    (target / "extra.txt").write_text("mine")
    return target


def _file(ctx):
    path = ctx.dir("file")
    path.write_text("x")
    return path


def _legacy_backups(ctx):
    target = ctx.saved()
    parent = target.parent
    for suffix in ("aaaaaaaa", "bbbbbbbb"):  # two backups without markers, no NAME: ambiguous
        copy = parent / f".{target.name}.old-{suffix}"
        import shutil

        shutil.copytree(target, copy)
        (copy / MARKER).unlink()
    import shutil

    shutil.rmtree(target)
    return target


def _cfg(**changes):
    from helpers import tiny_config

    return lambda ctx: tiny_config(**changes)


def _train_config(**changes):
    from hooked_attnres.training import TrainConfig

    return lambda ctx: TrainConfig(**changes)


def _train_into(out_dir_fn, **kwargs):
    def call(ctx):
        from hooked_attnres.training import train

        model, task, config, tok = _train_kwargs()
        args = dict(tokenizer=tok, progress=False)
        args.update(kwargs)
        train(model, args.pop("tasks", task), args.pop("config", config), out_dir_fn(ctx), **args)

    return call


def _user_model_dir(ctx):
    out = ctx.dir("run")
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("x")
    return out


def _patch(fn_name, *args, **kwargs):
    def call(ctx):
        import hooked_attnres.interventions as iv

        resolved = [a(ctx) if callable(a) else a for a in args]
        return getattr(iv, fn_name)(ctx.model, *resolved, **kwargs)

    return call


def _run_patch(fn_name, *args, tokens=None, **kwargs):
    def call(ctx):
        hooks = _patch(fn_name, *args, **kwargs)(ctx)
        run_tokens = ctx.tokens if tokens is None else tokens(ctx)
        ctx.model.run_with_hooks(run_tokens, fwd_hooks=hooks)

    return call


def _plain_dict(cache):
    return {name: tensor for name, tensor in cache.items()}


def _act_patch(cache_fn, metric=lambda logits: logits.sum(), tokens=None):
    def call(ctx):
        from hooked_attnres.patching import get_act_patch_routing_weights

        run_tokens = ctx.tokens if tokens is None else tokens(ctx)
        get_act_patch_routing_weights(ctx.model, run_tokens, cache_fn(ctx), metric)

    return call


def _task_batch(n=8):
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    task = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6, n_queries=1)
    return task.sample(n, 0, "test", task_tokenizer(task).get_vocab())


def _mass(**kwargs):
    def call(ctx):
        from hooked_attnres.analysis import routing_mass

        batch = _task_batch()
        model = _train_kwargs()[0].eval()
        return routing_mass(model, batch.tokens, **kwargs)

    return call


def _mass_of(batch, **kwargs):
    from hooked_attnres.analysis import routing_mass

    return routing_mass(_train_kwargs()[0].eval(), batch, **kwargs)


def _attribution(batch, **kwargs):
    from hooked_attnres.analysis import attribute_routing

    model = _train_kwargs()[0].eval()
    return attribute_routing(model, batch, progress=False, n_bootstrap=10, **kwargs)


@functools.cache
def _tables():
    """``(mass, mass summary, effects)`` of the tiny trained model on 8 prompts."""
    mass = _mass_of(_task_batch())
    effects = _effects(_task_batch)(None)
    return mass, summarize_mass(mass, n_bootstrap=10), effects


def _effects(batch_fn, **kwargs):
    def call(ctx):
        from hooked_attnres.analysis import ablation_effects

        model = _train_kwargs()[0].eval()
        return ablation_effects(model, batch_fn(), progress=False, n_bootstrap=10, **kwargs)

    return call


def _one_vector_cache(c):
    """A cache without a batch axis nor a position axis: one [d_model] vector per hook."""
    return c.model.run_with_cache(c.tokens[:1], remove_batch_dim=True, pos_slice=Slice(2))[1]


def _shorter_weights(x, hook):
    return x[..., :-1]


def _longer_weights(x, hook):
    return torch.cat([x, x[..., :1]], dim=-1)


CASES = [
    # --- saving: never delete what a save did not write --------------------------------------
    (
        "save-over-user-folder",
        lambda c: c.model.save_pretrained(_user_folder(c)),
        FileExistsError,
        ["refusing to replace", "notes.txt", "did not write", "overwrite=True"],
    ),
    (
        "save-over-checkpoint-with-user-file",
        lambda c: c.model.save_pretrained(_extra_file(c)),
        FileExistsError,
        ["extra.txt", "overwrite=True"],
    ),
    (
        "save-onto-a-file",
        lambda c: c.model.save_pretrained(_file(c)),
        FileExistsError,
        ["a file is there"],
    ),
    (
        "save-overwrite-not-bool",
        lambda c: c.model.save_pretrained(c.dir(), overwrite="yes"),
        TypeError,
        ["overwrite must be True or False"],
    ),
    (
        "save-unknown-format",
        lambda c: c.model.save_pretrained(c.dir(), format="gguf"),
        ValueError,
        ["format must be", "gguf"],
    ),
    (
        "save-public-format-over-user-folder",
        lambda c: c.model.save_pretrained(_user_folder(c), format="qwen3_attnres"),
        FileExistsError,
        ["notes.txt", "did not write"],
    ),
    # --- loading ---------------------------------------------------------------------------------
    (
        "load-mmap-not-bool",
        lambda c: HookedAttnRes.from_pretrained(c.saved(), mmap="yes"),
        TypeError,
        ["mmap must be True or False"],
    ),
    (
        "load-bad-device",
        lambda c: HookedAttnRes.from_pretrained(c.saved(), device="gpu0"),
        ValueError,
        ["device='gpu0'", "not a torch device"],
    ),
    (
        "load-int32-weight",
        lambda c: HookedAttnRes.from_pretrained(
            _rewrite_weight(c.saved(), "embed.W_E", lambda t: t.to(torch.int32))
        ),
        ValueError,
        ["embed.W_E", "I32", "not cast silently"],
    ),
    (
        "load-float64-weight-in-float32-checkpoint",
        lambda c: HookedAttnRes.from_pretrained(
            _rewrite_weight(c.saved(), "embed.W_E", lambda t: t.double())
        ),
        ValueError,
        ["embed.W_E", "F64", "config.json says float32"],
    ),
    (
        "load-config-tie-word-embeddings-no",
        lambda c: HookedAttnRes.from_pretrained(
            _rewrite_config(c.saved(), tie_word_embeddings="no")
        ),
        ValueError,
        ["tie_word_embeddings must be True or False", "'no'"],
    ),
    (
        "load-config-eps-infinite",
        lambda c: HookedAttnRes.from_pretrained(_rewrite_config(c.saved(), eps=float("inf"))),
        ValueError,
        ["eps must be a finite number"],
    ),
    (
        "load-truncated-weights",
        lambda c: (
            lambda d: (
                open(d / "model.safetensors", "r+b").truncate(64),
                HookedAttnRes.from_pretrained(d),
            )
        )(c.saved()),
        ValueError,
        ["truncated"],
    ),
    (
        "load-config-not-json",
        lambda c: (
            lambda d: (
                (d / "config.json").write_bytes(b"\xff\xfe{"),
                unseal(d),
                HookedAttnRes.from_pretrained(d),
            )
        )(c.saved()),
        ValueError,
        ["config.json is not valid JSON"],
    ),
    (
        "load-weights-changed-after-their-save",
        lambda c: HookedAttnRes.from_pretrained(_flip_a_weight_byte(c.saved())),
        ValueError,
        ["was changed after it was saved", "model.safetensors has SHA-256", "verify=False"],
    ),
    (
        "load-missing-directory",
        lambda c: HookedAttnRes.from_pretrained(c.dir()),
        FileNotFoundError,
        ["no checkpoint directory"],
    ),
    (
        "load-ambiguous-old-backups",
        lambda c: HookedAttnRes.from_pretrained(_legacy_backups(c)),
        FileNotFoundError,
        ["no complete version", "2 backups", "by hand"],
    ),
    (
        "hf-num-blocks-zero",
        lambda c: HookedAttnRes.from_hf_qwen3(c.saved(), num_blocks=0),
        ValueError,
        ["num_blocks must be an integer >= 1"],
    ),
    (
        "hf-recency-bias-infinite",
        lambda c: HookedAttnRes.from_hf_qwen3(c.saved(), recency_bias=float("inf")),
        ValueError,
        ["recency_bias must be a finite number"],
    ),
    # --- config fields ---------------------------------------------------------------------------
    (
        "config-tie-word-embeddings-string",
        _cfg(tie_word_embeddings="no"),
        ValueError,
        ["tie_word_embeddings must be True or False"],
    ),
    ("config-eps-infinite", _cfg(eps=float("inf")), ValueError, ["eps must be a finite number"]),
    ("config-eps-string", _cfg(eps="1e-6"), ValueError, ["eps must be a finite number", "'1e-6'"]),
    (
        "config-rotary-base-bool",
        _cfg(rotary_base=True),
        ValueError,
        ["rotary_base must be a finite number"],
    ),
    (
        "config-initializer-range-bool",
        _cfg(initializer_range=True),
        ValueError,
        ["initializer_range"],
    ),
    (
        "config-default-prepend-bos-string",
        _cfg(default_prepend_bos="yes"),
        ValueError,
        ["default_prepend_bos must be True or False"],
    ),
    (
        "config-use-attn-in",
        _cfg(use_attn_in=True),
        ValueError,
        ["use_attn_in=True is not supported"],
    ),
    ("config-num-experts", _cfg(num_experts=4), ValueError, ["num_experts=4 is not supported"]),
    (
        "config-recency-bias-string",
        _cfg(attnres_recency_bias="3"),
        ValueError,
        ["attnres_recency_bias must be a finite number"],
    ),
    ("config-device-int", _cfg(device=3), ValueError, ["device must be a string"]),
    (
        "config-device-unknown",
        _cfg(device="tpu9"),
        ValueError,
        ["device='tpu9' is not a torch device"],
    ),
    ("config-model-name-int", _cfg(model_name=3), ValueError, ["model_name must be a string"]),
    (
        "config-dict-missing-fields",
        lambda c: HookedAttnRes({"d_model": 32}),
        ValueError,
        ["missing required", "n_layers", "d_vocab"],
    ),
    (
        "config-json-invalid",
        lambda c: HookedAttnResConfig.from_json("{d_model: 3"),
        ValueError,
        ["not valid JSON"],
    ),
    (
        "config-from-dict-list",
        lambda c: HookedAttnResConfig.from_dict([1, 2]),
        TypeError,
        ["must be a dict"],
    ),
    # --- hook outputs ----------------------------------------------------------------------------
    (
        "hook-weights-fewer-sources",
        lambda c: c.run_hook(c.site_hook(2, "attn_res", "weights"), _shorter_weights),
        ValueError,
        ["blocks.2.attn_res.hook_weights", "2 sources", "reads 3"],
    ),
    (
        "hook-weights-more-sources",
        lambda c: c.run_hook(c.site_hook(2, "attn_res", "weights"), _longer_weights),
        ValueError,
        ["blocks.2.attn_res.hook_weights", "4 sources", "reads 3"],
    ),
    (
        "hook-logits-more-sources",
        lambda c: c.run_hook(c.site_hook(3, "mlp_res", "logits"), _longer_weights),
        ValueError,
        ["blocks.3.mlp_res.hook_logits", "4 sources", "reads 3"],
    ),
    (
        "hook-sources-fewer-sources",
        lambda c: c.run_hook(c.site_hook(2, "attn_res", "sources"), lambda x, hook: x[..., :-1, :]),
        ValueError,
        ["blocks.2.attn_res.hook_sources", "2 sources", "reads 3"],
    ),
    (
        "hook-resid-other-batch",
        lambda c: c.run_hook("blocks.1.hook_resid_post", lambda x, hook: x[:1]),
        ValueError,
        ["blocks.1.hook_resid_post", "(1, 6, 32)", "(2, 6, 32)"],
    ),
    (
        "hook-returns-a-list",
        lambda c: c.run_hook("blocks.1.hook_resid_post", lambda x, hook: x.tolist()),
        ValueError,
        ["returned a list"],
    ),
    (
        "hook-returns-integers",
        lambda c: c.run_hook("blocks.0.hook_resid_pre", lambda x, hook: x.long()),
        ValueError,
        ["dtype torch.int64", "floating-point"],
    ),
    (
        "add-hook-then-shape-change",
        lambda c: (
            c.model.add_hook(c.site_hook(1, "mlp_res", "weights"), _shorter_weights),
            c.model(c.tokens),
        ),
        ValueError,
        ["blocks.1.mlp_res.hook_weights", "sources"],
    ),
    (
        "loss-of-one-token",
        lambda c: c.model(c.tokens[:, :1], return_type="loss"),
        ValueError,
        ["at least two positions"],
    ),
    (
        "state-for-another-sublayer",
        lambda c: c.model.forward_from(c.model.depth_states(c.tokens)[1], 1),
        ValueError,
        ["enters sublayer 2", "cannot enter the MLP sublayer of layer 0"],
    ),
    # --- interventions: checked when the call is made --------------------------------------------
    (
        "layers-start-after-stop",
        _patch("mask_sources", "embedding", layers=(3, 1)),
        ValueError,
        ["layers=(3, 1)", "selects no layer"],
    ),
    (
        "layers-empty-list",
        _patch("mask_sources", "embedding", layers=[]),
        ValueError,
        ["empty", "selects no layer"],
    ),
    ("sources-empty-list", _patch("mask_sources", []), ValueError, ["sources is empty"]),
    (
        "positions-empty-list",
        _patch("mask_sources", "embedding", positions=[]),
        ValueError,
        ["positions is empty"],
    ),
    (
        "positions-floats",
        _patch("patch_sources", "embedding", positions=[1.5]),
        ValueError,
        ["positions [1.5] must be integers", "None for all"],
    ),
    ("sources-none", _patch("mask_sources", None), ValueError, ["sources must be"]),
    (
        "patch-sources-cache-of-other-layout",
        _patch("patch_sources", "embedding", lambda c: c.cache_of(attnres_layout="full")),
        ValueError,
        ["comes from a model with layout 'full'", "layout 'cumulative'"],
    ),
    (
        "patch-sources-dict-cache-with-more-sources",
        _patch(
            "patch_sources", "embedding", lambda c: _plain_dict(c.cache_of(attnres_num_blocks=4))
        ),
        ValueError,
        ["hook_sources", "sources; this router reads"],
    ),
    (
        "patch-sources-tensor-wrong-width",
        _patch("patch_sources", "embedding", torch.zeros(7)),
        ValueError,
        ["d_model=32", "(7,)"],
    ),
    (
        # one value per prompt as [batch, d_model]: read as [pos, d_model] before audit 128
        "patch-sources-value-of-one-row-per-prompt",
        _patch("patch_sources", "embedding", torch.zeros(2, 32)),
        ValueError,
        ["patch_sources: a value tensor", "got shape (2, 32)", "value[:, None, :]", "[None]"],
    ),
    (
        "patch-sources-unknown-value",
        _patch("patch_sources", "embedding", "median"),
        ValueError,
        ["'median'", "'zero', 'mean'"],
    ),
    (
        "patch-sources-cache-of-other-batch",
        _run_patch("patch_sources", "embedding", lambda c: c.cache, tokens=lambda c: c.tokens[:1]),
        ValueError,
        ["[batch, pos] = [2, 6]", "[1, 6]"],
    ),
    (
        "patch-committed-cache-of-other-width",
        _patch("patch_committed", "block_1", lambda c: c.cache_of(d_model=64, n_heads=4)),
        ValueError,
        ["d_model 64", "d_model 32"],
    ),
    (
        "set-weights-cache-of-other-layout",
        _patch("set_weights", lambda c: c.cache_of(attnres_layout="kimi")),
        ValueError,
        ["layout 'kimi'"],
    ),
    (
        "set-weights-tensor-of-other-batch",
        _run_patch("set_weights", torch.full((5, 6, 3), 1 / 3), routers="attn_res", layers=2),
        ValueError,
        ["(5, 6, 3)", "does not broadcast"],
    ),
    (  # torch's bare "The size of tensor a (2) must match the size of tensor b (3)" (audit 145)
        "mask-logits-of-another-width",
        lambda c: mask_logits(torch.zeros(1, 3, 2), torch.tensor([True, False, False]), "this"),
        ValueError,
        ["this's mask", "(3,) does not broadcast", "(1, 3, 2)"],
    ),
    (  # "'str' object has no attribute 'positions'" (audit 145)
        "batched-mask-hooks-of-text",
        lambda c: batched_mask_hooks(["x"], 1),
        TypeError,
        ["batched_mask_hooks takes Ablation objects", "str 'x'"],
    ),
    # --- activation patching: the whole cache is checked before the sweep ------------------------
    (
        "patching-cache-with-more-sources",
        _act_patch(lambda c: _plain_dict(c.cache_of(attnres_num_blocks=4))),
        ValueError,
        ["the clean cache", "3 sources; this router reads 2"],
    ),
    (
        "patching-cache-of-other-layout",
        _act_patch(lambda c: c.cache_of(attnres_layout="full")),
        ValueError,
        ["the clean cache comes from a model with layout 'full'"],
    ),
    (
        "patching-metric-returns-text",
        _act_patch(lambda c: c.cache, metric=lambda logits: "x"),
        TypeError,
        ["patching_metric must return", "str"],
    ),
    (
        "patching-metric-a-name",
        _act_patch(lambda c: c.cache, metric="logit_diff"),
        TypeError,
        ["patching_metric must be a function of the logits", "got the str 'logit_diff'"],
    ),
    (
        "attribution-patching-metric-a-name",
        lambda c: __import__(
            "hooked_attnres.analysis", fromlist=["x"]
        ).attribution_patch_routing_weights(c.model, c.tokens, c.cache, "logit_diff"),
        TypeError,
        ["patching_metric must be a function of the logits", "got the str 'logit_diff'"],
    ),
    (
        "patching-tokens-as-list",
        _act_patch(lambda c: c.cache, tokens=lambda c: [[1, 2]]),
        TypeError,
        ["corrupted_tokens must be", "list"],
    ),
    # --- analyses --------------------------------------------------------------------------------
    (
        "bootstrap-confidence-text",
        lambda c: bootstrap_ci([1.0, 2.0], confidence="0.9"),
        ValueError,
        ["confidence must be a number"],
    ),
    (
        "bootstrap-resamples-bool",
        lambda c: bootstrap_ci([1.0, 2.0], n_resamples=True),
        ValueError,
        ["n_resamples must be an integer"],
    ),
    (
        "effects-chunk-zero",
        _effects(_task_batch, chunk=0),
        ValueError,
        ["chunk must be an integer >= 1"],
    ),
    (
        "effects-tokens-instead-of-batch",
        _effects(lambda: _task_batch().tokens),
        TypeError,
        ["batch must be a TaskBatch", "ablation_effects reads its metrics"],
    ),
    (
        "effects-empty-batch",
        _effects(lambda: _task_batch()[:0]),
        ValueError,
        ["the batch holds no prompts", "ablation_effects has nothing to measure"],
    ),
    (
        "mass-empty-batch",
        lambda c: _mass_of(_task_batch()[:0]),
        ValueError,
        ["the batch holds no prompts", "routing_mass has nothing to measure"],
    ),
    (
        "attribution-empty-batch",
        lambda c: _attribution(_task_batch()[:0]),
        ValueError,
        ["the batch holds no prompts", "attribute_routing has nothing to measure"],
    ),
    (
        "mass-bands-a-list",
        lambda c: _mass_of(_task_batch(), bands=[[0], [1]]),
        ValueError,
        ["bands must be a dict of band name -> layers", "got the list [[0], [1]]"],
    ),
    (
        "mass-bands-empty",
        lambda c: _mass_of(_task_batch(), bands={}),
        ValueError,
        ["bands={} names no band"],
    ),
    (
        "mass-answer-pos-wrong-length",
        _mass(answer_pos=torch.tensor([1, 2])),
        ValueError,
        ["answer_pos must be an integer tensor [batch=8]"],
    ),
    (
        "mass-answer-pos-out-of-range",
        _mass(answer_pos=torch.full((8,), 99)),
        ValueError,
        ["answer_pos must be in [0,"],
    ),
    (
        "summarize-by-unknown-column",
        lambda c: summarize_mass(_mass(positions="all")(c), by=("head",)),
        ValueError,
        ["cannot group by ['head']"],
    ),
    (
        "summarize-the-effects-table",
        lambda c: summarize_mass(_tables()[2]),
        ValueError,
        ["mass lacks the column(s) ['mass', 'prompt']", "pass routing_mass(...) output"],
    ),
    (
        "summarize-a-dict",
        lambda c: summarize_mass(_tables()[0].to_dict()),
        TypeError,
        ["mass must be a pandas DataFrame", "got dict"],
    ),
    (
        "dissociation-tables-swapped",
        lambda c: __import__("hooked_attnres.analysis", fromlist=["x"]).dissociation_report(
            _tables()[2], _tables()[1]
        ),
        ValueError,
        ["mass_summary lacks the column(s) ['mass']", "the first argument"],
    ),
    (
        "motif-verdicts-of-a-summary",
        lambda c: __import__("hooked_attnres.analysis", fromlist=["x"]).motif_verdicts(
            _tables()[1]
        ),
        ValueError,
        ["report lacks the column(s) ['claim', 'present']", "motif_report(...)"],
    ),
    (
        "schedule-comparison-of-the-effects",
        lambda c: __import__("hooked_attnres.analysis", fromlist=["x"]).schedule_comparison(
            _tables()[2],
            __import__("hooked_attnres.analysis", fromlist=["x"]).recency_schedule(2, 2),
        ),
        ValueError,
        ["mass lacks the column(s)", "routing_mass(...) output"],
    ),
    ("batch-row-out-of-range", lambda c: _task_batch()[100], IndexError, ["row 100", "8 prompts"]),
    # audit 145: silent wrong results, then bare errors
    (  # a layer given as text was in no band: 'other'
        "band-of-a-layer-as-text",
        lambda c: band_of("0", {"early": [0, 1]}),
        ValueError,
        ["band_of's layer must be an integer >= 0", "'0'"],
    ),
    (  # a negative fraction made every harm "large"
        "criteria-negative-effect-fraction",
        lambda c: Criteria(min_effect_fraction=-1),
        ValueError,
        ["min_effect_fraction must be >= 0", "got -1"],
    ),
    (  # an accuracy drop above 1 no model can meet
        "criteria-accuracy-drop-above-one",
        lambda c: Criteria(min_accuracy_drop=2.0),
        ValueError,
        ["min_accuracy_drop must be [0, 1]", "got 2.0"],
    ),
    (  # NumPy parsed ["1", "2"] as 1.0 and 2.0
        "bootstrap-of-text",
        lambda c: bootstrap_ci(["1", "2"]),
        TypeError,
        ["values must be numbers", "<U1", "astype(float)"],
    ),
    (  # a flag read by truthiness: "no" was True (9 depth components, not 5)
        "accumulated-resid-flag-as-text",
        lambda c: c.cache.accumulated_resid(incl_mid="no"),
        TypeError,
        ["incl_mid must be True or False", "'no'"],
    ),
    (
        "lens-hook-names-flag-as-text",
        lambda c: lens_hook_names(c.model, incl_mid="yes"),
        TypeError,
        ["incl_mid must be True or False", "'yes'"],
    ),
    (  # IndexError: tuple index out of range
        "accumulated-resid-of-a-cache-without-batch-nor-position-axis",
        lambda c: _one_vector_cache(c).accumulated_resid(),
        ValueError,
        ["cache.accumulated_resid", "neither a batch axis", "pos_slice=Slice(2)", "pos_slice=2"],
    ),
    (  # IndexError: tuple index out of range
        "routing-lens-of-a-cache-without-batch-nor-position-axis",
        lambda c: routing_lens(c.model, _one_vector_cache(c)),
        ValueError,
        ["routing_lens: this cache has neither a batch axis", "pos_slice=2"],
    ),
    (  # "'str' object has no attribute 'named_parameters'"
        "model-is-zero-query-of-a-path",
        lambda c: model_is_zero_query("x"),
        TypeError,
        ["model_is_zero_query takes a HookedAttnRes, got str"],
    ),
    (  # "'dict' object has no attribute 'columns'" inside require_labelled
        "routing-heatmap-of-a-dict",
        lambda c: routing_heatmap({"mass": [0.5]}),
        TypeError,
        ["mass must be a pandas DataFrame", "routing_mass(...)", "got dict"],
    ),
    (
        "patching-heatmap-of-text",
        lambda c: patching_heatmap([["a", "b"]], ["r"], ["x", "y"], "t"),
        TypeError,
        ["values must be numbers"],
    ),
    (  # "'list' object has no attribute 'shape'"
        "embed-state-of-a-list",
        lambda c: c.model.embed_state([1, 2, 3]),
        TypeError,
        ["embed_state takes a [batch, pos] integer tensor", "got list"],
    ),
    (  # KeyError: 'condition'
        "verdict-matrix-of-an-empty-table",
        lambda c: verdict_matrix(pd.DataFrame()),
        ValueError,
        ["verdicts lacks the column(s) ['condition', 'claim', 'k', 'n', 'verdict']"],
    ),
    (
        "logit-diff-of-other-logits",
        lambda c: _task_batch().logit_diff(torch.zeros(3, 4, 5)),
        ValueError,
        ["logits must be [batch=8"],
    ),
    # --- the trainer -----------------------------------------------------------------------------
    (
        "train-grad-clip-negative",
        _train_config(grad_clip=-1),
        ValueError,
        ["grad_clip must be > 0", "reverse"],
    ),
    (
        "train-grad-clip-zero",
        _train_config(grad_clip=0),
        ValueError,
        ["grad_clip must be > 0", "zero every update"],
    ),
    (
        "train-lr-infinite",
        _train_config(lr=float("inf")),
        ValueError,
        ["lr must be a finite number, got inf"],
    ),
    (
        "train-lr-nan",
        _train_config(lr=float("nan")),
        ValueError,
        ["lr must be a finite number, got nan"],
    ),
    (
        "train-steps-bool",
        _train_config(steps=True),
        ValueError,
        ["steps must be an integer", "True"],
    ),
    (
        "train-steps-float",
        _train_config(steps=2.0),
        ValueError,
        ["steps must be an integer", "2.0"],
    ),
    (
        "train-beta-above-one",
        _train_config(betas=(0.9, 1.5)),
        ValueError,
        ["betas must be in [0, 1)"],
    ),
    (
        "train-weight-decay-negative",
        _train_config(weight_decay=-0.1),
        ValueError,
        ["weight_decay must be >= 0"],
    ),
    (
        "train-data-seed-negative",
        _train_config(data_seed=-1),
        ValueError,
        ["data_seed must be an integer >= 0"],
    ),
    (
        "train-checkpoint-every-bool",
        _train_config(checkpoint_every=True),
        ValueError,
        ["checkpoint_every must be an integer"],
    ),
    ("train-out-dir-is-a-file", _train_into(_file), FileExistsError, ["is a file"]),
    (
        "train-out-dir-model-has-user-files",
        _train_into(_user_model_dir),
        FileExistsError,
        ["mine.txt", "choose another out_dir"],
    ),
    (
        "train-tasks-not-tasks",
        _train_into(lambda c: c.dir("run"), tasks=["retrieval"]),
        TypeError,
        ["tasks must be Task objects"],
    ),
    (
        "train-config-as-dict",
        _train_into(lambda c: c.dir("run"), config={"steps": 3}),
        TypeError,
        ["config must be a TrainConfig"],
    ),
]


@pytest.mark.parametrize(
    "call, error, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_input_is_refused_clearly(ctx, call, error, words):
    try:
        with pytest.raises(error) as info:
            call(ctx)
    finally:
        ctx.model.reset_hooks()  # the add_hook case leaves its hook on purpose
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


# --- part 3: faults handled without an error (each checks the state it leaves) -------------------


def test_a_refused_save_touches_nothing(ctx):
    folder = _user_folder(ctx)
    with pytest.raises(FileExistsError):
        ctx.model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    assert leftovers_of(folder) == []
    ctx.model.save_pretrained(folder, overwrite=True)  # asked for: the folder is replaced
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "config.json", "model.safetensors"]


def test_a_loaded_model_does_not_change_with_its_file(ctx):
    """Copy-on-load: overwriting the weights in place or truncating the file after loading
    neither changes the logits nor kills the process (it did with memory mapping)."""
    target = ctx.saved()
    model = HookedAttnRes.from_pretrained(target)
    before = model(ctx.tokens)
    path = target / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size - 20_000)
        handle.write(os.urandom(20_000))
    assert torch.equal(model(ctx.tokens), before)
    os.truncate(path, 100)
    assert torch.equal(model(ctx.tokens), before)


def _mmap_then_truncate(target, tokens) -> None:
    model = HookedAttnRes.from_pretrained(target, mmap=True)
    os.truncate(target / "model.safetensors", 100)
    model(tokens)  # touches the unmapped pages


def test_mmap_is_opt_in_and_its_risk_is_real(ctx):
    """What docs/loading.md says about ``mmap=True``: overwriting the file in place changes
    the model, truncating it kills the process with SIGBUS."""
    target = ctx.saved()
    model = HookedAttnRes.from_pretrained(target, mmap=True)
    before = model(ctx.tokens)
    path = target / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size - 20_000)
        handle.write(b"\x7f" * 20_000)
    assert not torch.equal(model(ctx.tokens), before)
    status = fork_and_wait(_mmap_then_truncate, ctx.saved(), ctx.tokens)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS


def test_one_prompt_has_no_bootstrap_interval():
    with pytest.warns(RuntimeWarning, match="at least 2 prompts"):
        mean, low, high = bootstrap_ci([0.7])
    assert mean == pytest.approx(0.7)
    assert low != low and high != high  # NaN, not a zero-width interval


def test_patching_checks_the_whole_cache_before_the_sweep(ctx):
    from hooked_attnres.patching import get_act_patch_routing_weights

    calls = []
    cache = _plain_dict(ctx.cache)
    last = ctx.model.sites()[-1].hook("weights")
    cache[last] = cache[last][..., :-1]  # only the last router is wrong
    with pytest.raises(ValueError, match="mlp_res.hook_weights"):
        get_act_patch_routing_weights(ctx.model, ctx.tokens, cache, lambda x: calls.append(1))
    assert calls == []  # refused before the first cell


def _nan_logits_from_step(step: int, monkeypatch):
    import hooked_attnres.training.trainer as trainer_module

    real, calls = trainer_module.model_logits, {"n": 0}

    def logits(model, tokens):
        out = real(model, tokens)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= step:
                return out * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "model_logits", logits)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from hooked_attnres.training import TrainingDivergedError

    _nan_logits_from_step(5, monkeypatch)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(
            TrainingDivergedError, match=r"loss is nan at step 5.*step 4\) is kept"
        ) as error:
            _train(tmp_path)  # trains with threads=1
        assert error.value.step == 5  # the step that diverged, for the command line's advice
        assert pickle.loads(pickle.dumps(error.value)).step == 5
        assert torch.get_num_threads() == 3  # the caller's count, also after an error
    finally:
        torch.set_num_threads(previous)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    assert_clean(tmp_path / "checkpoint")


@pytest.mark.parametrize(
    "poisoned_at, message",
    [
        # the last update: a finite last loss, no final model
        (6, "not finite after step 6"),
        # an earlier update (the loss before it finite): blamed on that update, not on the
        # next step's NaN loss as before
        (5, "not finite after step 5; its update made them so"),
    ],
)
def test_weights_made_non_finite_by_an_update_are_never_written(
    tmp_path, monkeypatch, poisoned_at, message
):
    from hooked_attnres.training import TrainingDivergedError

    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] == poisoned_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(TrainingDivergedError, match=message) as error:
        _train(tmp_path)
    assert error.value.step == poisoned_at  # the update that made them so
    assert not (tmp_path / "model").exists()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last good checkpoint


# --- threads: a hooked model is used by one thread at a time --------------------------------------


def _hold_hooks(model, name, entered, release):
    with model.hooks(fwd_hooks=[(name, lambda x, hook: x * 0)]):
        entered.set()
        assert release.wait(timeout=60)


def test_another_threads_hooks_do_not_leak_into_a_forward_pass(ctx):
    from hooked_attnres import ConcurrentUseError

    model = tiny_model()
    expected = model(ctx.tokens)
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=_hold_hooks, args=(model, "blocks.0.hook_attn_out", entered, release)
    )
    holder.start()
    assert entered.wait(timeout=60)
    try:
        with pytest.raises(ConcurrentUseError, match="another thread has hooks attached"):
            model(ctx.tokens)
        with pytest.raises(ConcurrentUseError, match="another thread has hooks attached"):
            model.run_with_cache(ctx.tokens)
        with pytest.raises(ConcurrentUseError, match="another thread has hooks attached"):
            model.reset_hooks()
    finally:
        release.set()
        holder.join()
    assert torch.equal(model(ctx.tokens), expected)  # usable again, hooks gone


def test_hooks_are_refused_while_another_thread_runs_the_model(ctx):
    from hooked_attnres import ConcurrentUseError

    model = tiny_model()
    entered, release = threading.Event(), threading.Event()

    def block_inside_forward(module, args, output):  # a raw PyTorch hook: not a TL hook
        entered.set()
        assert release.wait(timeout=60)

    handle = model.blocks[1].mlp.register_forward_hook(block_inside_forward)
    runner = threading.Thread(target=model, args=(ctx.tokens,))
    runner.start()
    assert entered.wait(timeout=60)
    try:
        with pytest.raises(ConcurrentUseError, match="another thread is running this model"):
            model.run_with_hooks(ctx.tokens, fwd_hooks=[("hook_embed", lambda x, hook: x)])
        assert all(not p.fwd_hooks for p in model.hook_points())  # nothing was attached
    finally:
        release.set()
        runner.join()
        handle.remove()


def test_plain_forward_passes_of_two_threads_run_side_by_side(ctx):
    model = tiny_model()
    expected = model(ctx.tokens)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(model(ctx.tokens))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(torch.equal(r, expected) for r in results)


def test_outputs_of_an_earlier_trainer_version_resume_and_are_replaced(tmp_path, uninterrupted):
    """Checkpoints and models written before completion markers carry none: the trainer
    still resumes from them (exactly) and may replace them (they hold only trainer files)."""
    _train(tmp_path, stop_after=4)
    (tmp_path / "checkpoint" / MARKER).unlink()  # as an earlier version wrote it
    _train(tmp_path)
    resumed = HookedAttnRes.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(resumed[name], t) for name, t in uninterrupted.items())
    (tmp_path / "model" / MARKER).unlink()
    _train(tmp_path)  # a finished run writes its model again, over the legacy one
    assert read_marker(tmp_path / "model") is not None
    assert_clean(tmp_path / "checkpoint")
