"""The study end to end (tables, verdicts, the report in text and HTML), on the shipped
checkpoints and on tiny models, and the shipped checkpoints themselves."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import subtitle_lines, tiny_study_runs, title_of, unseal

from hooked_attnres import HookedAttnRes
from hooked_attnres._study_limits import GRID_TASKS
from hooked_attnres.analysis import CLAIMS, recency_schedule
from hooked_attnres.study import (
    SHIPPED,
    available,
    checkpoint_dir,
    find_runs,
    get_condition,
    load_condition,
    make_task,
    metrics_path,
    probe_prompts,
    run_dir,
    run_study,
    seeds_found,
    train_condition,
    verdict_matrix,
)

SHIPPED_RUNS = [(c, s) for c, seeds in available().items() for s in seeds]


def test_shipped_checkpoints_match_their_sha256sums():
    lines = (SHIPPED / "SHA256SUMS").read_text().split("\n")
    listed = dict(reversed(line.split(maxsplit=1)) for line in lines if line.strip())
    files = sorted(
        p.relative_to(SHIPPED).as_posix() for p in SHIPPED.glob("*/model/*") if p.is_file()
    )
    # every file of every shipped model is listed (weights, config, tokenizer), nothing else
    assert sorted(listed) == files and any(f.endswith("/config.json") for f in files)
    for name, digest in listed.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize(
    "change",
    [
        "a flipped byte",
        "a file not listed",
        "an edited config",
        "a listed file missing",
        "the folder listed nowhere",
    ],
)
def test_a_shipped_checkpoint_whose_weights_differ_from_sha256sums_is_refused(
    change, tmp_path, monkeypatch
):
    """Audit 197: the shipped checkpoints have no completion marker (they are never
    rewritten), so their loads checked nothing: one byte flipped inside a tensor of the
    shipped ``attnres`` seed 0 weights (the file still parses) loaded silently as that model,
    though ``SHA256SUMS`` beside them records every weight file's digest (only this test
    file read it). `load_condition` compares every file of a shipped checkpoint's model/
    with it now (weights, config.json, tokenizer; an edited config.json loaded silently
    with other logits while only the weights were listed, until session 23), and refuses
    a file it does not list (a copy of the shipped folder here: the package's own files
    are not touched)."""
    import shutil

    from hooked_attnres import CheckpointIntegrityError
    from hooked_attnres.study import checkpoints as checkpoints_module

    copy = tmp_path / "study"
    shutil.copytree(SHIPPED, copy)
    monkeypatch.setattr(checkpoints_module, "SHIPPED", copy)
    weights = copy / "attnres_seed0" / "model" / "model.safetensors"
    clean = load_condition("attnres", 0)  # as shipped: loads
    if change == "an edited config":  # session 23: only the weights were listed
        weights = weights.with_name("config.json")  # the file the message names
        config = json.loads(weights.read_text())
        config["eps"] = 1e-5  # shipped: 1e-6; a model that loads, with other logits
        weights.write_text(json.dumps(config))
        import torch

        tokens = torch.tensor([[1, 2, 3, 4]])
        # what the edit does, unchecked
        edited = HookedAttnRes.from_pretrained(weights.parent, verify=False).eval()
        assert (edited(tokens) - clean(tokens)).abs().max() > 1e-4
        found = hashlib.sha256(weights.read_bytes()).hexdigest()
        expected = (
            f"has SHA-256 {found}, not the {_sums_of(copy)[weights.relative_to(copy).as_posix()]}"
        )
    elif change == "a flipped byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x40
        weights.write_bytes(bytes(data))
        found = hashlib.sha256(bytes(data)).hexdigest()
        expected = (
            f"has SHA-256 {found}, not the {_sums_of(copy)[weights.relative_to(copy).as_posix()]}"
        )
    elif change == "a listed file missing":  # audit 211: loaded without its tokenizer
        weights = weights.with_name("tokenizer.json")
        weights.unlink()
        expected = f"is listed in {copy / 'SHA256SUMS'} but missing"
    else:  # review 213: a shipped folder is listed whole, even where the manifest lacks it
        gone = "attnres_seed0/model/model." if change == "a file not listed" else "attnres_seed0/"
        lines = (copy / "SHA256SUMS").read_text().splitlines(keepends=True)
        (copy / "SHA256SUMS").write_text("".join(line for line in lines if gone not in line))
        expected = "is not listed in"
    with pytest.raises(CheckpointIntegrityError) as info:
        load_condition("attnres", 0)
    message = str(info.value)
    assert f"{weights} {expected}" in message, message
    assert "reinstall hooked-attnres" in message, message


@pytest.mark.parametrize("line", ["5205ac90\n", "not-a-digest  attnres_seed0/model/x\n"])
def test_a_sha256sums_line_that_is_no_digest_and_file_is_refused_by_number(
    line, tmp_path, monkeypatch
):
    """Review 207: a line of ``SHA256SUMS`` without a file name failed with Python's bare
    "not enough values to unpack"; one whose digest is no SHA-256 was read as a digest
    that no file could match. Both are refused, naming the line."""
    import shutil

    from hooked_attnres import CheckpointIntegrityError
    from hooked_attnres.study import checkpoints as checkpoints_module

    copy = tmp_path / "study"
    shutil.copytree(SHIPPED, copy)
    monkeypatch.setattr(checkpoints_module, "SHIPPED", copy)
    sums = copy / "SHA256SUMS"
    sums.write_text(sums.read_text() + "\n" + line)
    number = len(sums.read_text().splitlines())
    with pytest.raises(CheckpointIntegrityError) as info:
        load_condition("attnres", 0)
    assert f"line {number} of {sums} is no '{{sha256}}  {{file}}' pair ({line.strip()!r})" in str(
        info.value
    ), info.value


def _sums_of(root: Path) -> dict[str, str]:
    lines = (root / "SHA256SUMS").read_text().split("\n")
    return dict(reversed(line.split(maxsplit=1)) for line in lines if line.strip())


@pytest.mark.parametrize("condition,seed", SHIPPED_RUNS)
def test_shipped_checkpoints_are_their_recipe_and_score_as_recorded(condition, seed):
    recipe = get_condition(condition)
    metrics = json.loads(metrics_path(condition, seed).read_text())
    # the run that produced the checkpoint is the condition's recipe
    assert metrics["train_config"] == recipe.train_config().to_dict()
    assert metrics["tasks"] == [repr(recipe.make_task())]
    assert metrics["description"] == json.loads(json.dumps(recipe.description(seed)))
    model = load_condition(condition, seed)
    assert model.cfg.n_layers == recipe.n_layers
    config = recipe.train_config()  # the trainer's held-out set (256 prompts for paperlike)
    batch = make_task(recipe.task).sample(
        config.eval_size, seed=config.data_seed, split="test", vocab=model.tokenizer.get_vocab()
    )
    with torch.no_grad():
        if recipe.kind == "vanilla":
            # the trainer scored the plain Qwen3, not the recency wrap the study loads (another
            # function: accuracies up to 2 points apart on the probe prompts), so score that
            from transformers import Qwen3ForCausalLM

            hf = Qwen3ForCausalLM.from_pretrained(checkpoint_dir(condition, seed)).eval()
            assert hf.config.num_hidden_layers == recipe.n_layers
            logits = hf(input_ids=batch.tokens).logits
        else:
            logits = model(batch.tokens)
    accuracy = batch.accuracy(logits)
    # the trainer's held-out accuracy, to the prompt
    recorded = next(iter(metrics["final_accuracy"].values()))
    assert accuracy == pytest.approx(recorded, abs=1e-9)
    if metrics.get("stopped_early"):  # a paperlike run: stopped at its first pass >= 0.50
        assert recipe.stop_accuracy is not None and recorded >= recipe.stop_accuracy
        assert metrics["step"] < recipe.steps
        evaluated = [h["accuracy"] for h in metrics["history"] if "accuracy" in h]
        assert all(min(a.values()) < recipe.stop_accuracy for a in evaluated[:-1])


@pytest.mark.parametrize("task_name", GRID_TASKS)
def test_probe_prompts_are_none_of_the_prompts_their_recipe_trained_or_stopped_on(task_name):
    """docs/study.md, "Held-out prompts, answers and seeds": the study's probe prompts
    (test split, data seeds 1 and 2) are none of the prompts a grid recipe trains on (its
    stream, data seed 0) or scores during training (the trainer's held-out set, data seed 0,
    which chose `paperlike`'s stop). A seed or split slip would make them coincide: probe
    prompts of the recipe's data seed are its held-out set, and of the train split its first
    batches (the positive controls; audit 216 measured 0 of 512 per shipped model in the
    whole streams, up to 76,800 prompts)."""
    from types import SimpleNamespace

    from hooked_attnres.study import FRESH_PROBE_SEED, PROBE_SEED
    from hooked_attnres.tasks import task_tokenizer

    recipe = get_condition(f"{task_name}_cumulative_L8")
    config, task = recipe.train_config(), recipe.make_task()
    tokenizer = task_tokenizer(task)
    model = SimpleNamespace(tokenizer=tokenizer)  # probe_prompts reads its tokenizer only
    vocab = tokenizer.get_vocab()

    def rows(batch):
        return {tuple(row) for row in batch.tokens.tolist()}

    trained = set().union(
        *(
            rows(task.sample(config.batch_size, config.data_seed, "train", vocab, stream=step))
            for step in range(16)
        )
    )
    scored = rows(task.sample(config.eval_size, config.data_seed, "test", vocab))
    probe = probe_prompts(model, 256, PROBE_SEED, task)
    fresh = probe_prompts(model, 256, FRESH_PROBE_SEED, task, exclude=probe)
    assert config.data_seed not in (PROBE_SEED, FRESH_PROBE_SEED)
    for drawn in (probe, fresh):
        assert len(rows(drawn)) == 256  # no prompt twice
        assert not rows(drawn) & (trained | scored)
    assert not rows(probe) & rows(fresh)
    # the controls: the same comparison finds the prompts of a seed or split slip
    assert len(rows(probe_prompts(model, 256, config.data_seed, task)) & scored) == 256
    slipped = task.sample(256, config.data_seed, "train", vocab)  # stream 0: step 0's batch
    assert len(rows(slipped) & trained) >= config.batch_size


def test_the_vanilla_checkpoint_is_a_plain_hugging_face_directory():
    from transformers import Qwen3ForCausalLM

    path = checkpoint_dir("vanilla")
    hf = Qwen3ForCausalLM.from_pretrained(path).eval()
    plain = HookedAttnRes.from_hf_qwen3(path, wrap="none")
    tokens = probe_prompts(plain, 16, task="saturated").tokens
    with torch.no_grad():
        assert (hf(tokens).logits - plain(tokens)).abs().max() <= 1e-4


def test_missing_checkpoints_say_how_to_train_them(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="hooked-attnres train --condition attnres --seeds 5"
    ):
        checkpoint_dir("attnres", seed=5)
    with pytest.raises(ValueError, match="condition must be one of"):
        checkpoint_dir("bogus")
    with pytest.raises(ValueError, match="condition must be one of"):
        run_study(tmp_path / "x", conditions=("attnres", "baseline"), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoints folder at"):
        run_study(tmp_path / "x", checkpoints=tmp_path / "nothing", progress=False)
    # named as the caller wrote it, not as the command line's flag (audit 56: it said
    # "--checkpoints ... is a file" to run_study(checkpoints=...))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"^checkpoints .*a_file is a file, not a folder"):
        run_study(tmp_path / "x", checkpoints=tmp_path / "a_file", progress=False)


def test_one_condition_by_its_name_is_studied_and_a_bare_seed_is_refused(tmp_path, monkeypatch):
    """``conditions="hard_cumulative_L8"`` was read as its letters ("conditions repeats
    ['u', 'a', '_']", and `seeds_found` "holds no ... for all of ['h', 'a', ...]"), and
    ``seeds=0`` raised "TypeError: 'int' object is not iterable"."""
    import hooked_attnres.study.run as study_module

    assert find_runs(None, "hard_cumulative_L8", [0, 2]) == find_runs(
        None, ["hard_cumulative_L8"], [0, 2]
    )
    assert find_runs(None, "attnres", None) == [("attnres", 0)]
    assert seeds_found(None, "hard_cumulative_L8") == seeds_found(None, ["hard_cumulative_L8"])
    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: pytest.fail("loaded"))
    for seeds in (0, 3, "0"):
        with pytest.raises(ValueError, match=r"seeds must be a list of model seeds, e\.g\. seeds="):
            run_study(tmp_path / "x", conditions="attnres", seeds=seeds, progress=False)


def test_seeds_that_are_not_a_list_are_refused_and_selections_are_read_once():
    """Audit 47 refused ``seeds=3``, but ``seeds=True`` and ``seeds=2.0`` still raised
    "TypeError: 'bool' object is not iterable", ``seeds="0"`` was told to pass
    ``seeds=['0']`` (itself refused), and ``conditions=3`` raised a TypeError. Seeds or
    conditions given as a generator were read twice (the duplicate check emptied it):
    "the shipped checkpoints hold no hard_cumulative_L8_seed{n}/model; train it" for
    checkpoints that exist."""
    import numpy as np

    name = "hard_cumulative_L8"
    expected = [(name, 0), (name, 1)]
    assert find_runs(None, name, (s for s in [0, 1])) == expected
    assert find_runs(None, (c for c in [name]), np.array([0, 1])) == expected
    assert find_runs(None, (c for c in [name]), None) == find_runs(None, [name], None)
    for seeds in (True, 2.0, "0", b"0"):
        with pytest.raises(ValueError, match=r"^seeds must be a list of model seeds, e\.g\. ") as e:
            find_runs(None, name, seeds)
        assert f"seeds=[{seeds!r}]" not in str(e.value)
    with pytest.raises(ValueError, match=r"e\.g\. seeds=\[3\] for that one seed; got"):
        find_runs(None, name, np.int64(3))
    with pytest.raises(ValueError, match=r"^conditions must be a condition name or a list"):
        find_runs(None, 3, None)
    # audit 52: a 0-d array or tensor claims to be iterable and raised "TypeError: iteration
    # over a 0-d array" (seed 3, or three seeds?); audit 64: refused by the one check of
    # every selection (as_items), which find_runs repeated with its own message
    for seeds in (np.array(3), torch.tensor(3)):
        with pytest.raises(
            ValueError,
            match=rf"^seeds must be a list \(or a tuple, range, array or generator\) of items, "
            rf"got the 0-d {type(seeds).__name__} .*: pass \[value\.item\(\)\] for its one item$",
        ):
            find_runs(None, name, seeds)


def test_only_folders_named_as_training_names_them_are_found_as_seeds(tmp_path):
    """`available` read any digits after "_seed": a copy named attnres_seed00 beside
    attnres_seed0 listed seed 0 twice, so the study measured that model twice and was
    refused only after the work; attnres_seed01 alone listed seed 1, whose folder
    attnres_seed1 does not exist; and attnres_seed\u00b2 (a digit to str.isdigit, not to
    int) crashed with "invalid literal for int()"."""
    for name in ("attnres_seed0", "attnres_seed00", "attnres_seed01", "attnres_seed\u00b2"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
    assert available(tmp_path) == {"attnres": [0]}
    assert [run_dir(tmp_path, "attnres", s).name for s in available(tmp_path)["attnres"]] == [
        "attnres_seed0"
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # named as run_study's caller wrote them (they read "n_resamples must be ..." and
        # "seed must be ...", which in run_study reads as the model seeds)
        ({"n_bootstrap": 0}, "^n_bootstrap must be an integer >= 1, got 0"),
        # audit 116: 10**12 failed after the first model's sweep, allocating 291 TiB
        ({"n_bootstrap": 10**12}, r"^n_bootstrap must be an integer <= 100000 \(the most"),
        ({"bootstrap_seed": -1}, "^bootstrap_seed must be an integer >= 0, got -1"),
        ({"bootstrap_seed": 0.5}, "^bootstrap_seed must be an integer >= 0, got 0.5"),
        ({"n_prompts": 0}, "n_prompts must be an integer >= 2 .*, got 0"),
        # one prompt: every bootstrap interval is NaN, and NaN compared False ("absent")
        ({"n_prompts": 1}, "n_prompts must be an integer >= 2 .*, got 1"),
        ({"n_prompts": 2.5}, "n_prompts must be an integer >= 2 .*, got 2.5"),
        ({"n_prompts": True}, "n_prompts must be an integer >= 2 .*, got True"),
        ({"seeds": [0, -1]}, "seeds must be an integer >= 0, got -1"),
        # audit 122: the study's tables hold seeds as int64 (a larger one failed after the
        # model's work); refused by its bound, not as a checkpoint that is missing
        ({"seeds": [0, 2**63]}, rf"^seeds must be an integer <= {2**63 - 1} \(the largest"),
    ],
)
def test_bad_study_settings_are_refused_before_any_model_is_loaded(
    tmp_path, monkeypatch, kwargs, message
):
    # n_bootstrap=0 used to fail only after the first model's mass and ablation sweep
    import hooked_attnres.study.run as study_module

    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=message):
        run_study(tmp_path / "x", conditions=("vanilla",), progress=False, **kwargs)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        train_condition("attnres", -1, tmp_path / "never", progress=False)


@pytest.mark.parametrize("seed", [2**64, 2**63])
@pytest.mark.parametrize("kind", ["attnres", "vanilla"])
def test_a_seed_past_torchs_is_refused_before_the_run_starts(tmp_path, kind, seed, monkeypatch):
    """Audit 116: one past torch's largest seed (2**64 - 1) failed in the model's
    initialisation ("Overflow when unpacking long long"), after the run had started.
    Audit 122: from 2**63 on, the run trained, but the study of it failed after the
    model's work (its seed column uint64: pandas' merge raised KeyError numpy.ulonglong)
    or, beside seed 0, read both seeds as floats (2**63 and 2**63 + 1 the same seed)."""
    import hooked_attnres.study.conditions as conditions_module

    monkeypatch.setattr(conditions_module, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=rf"^seed must be an integer <= {2**63 - 1} \(the"):
        train_condition(kind, seed, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_the_studys_bounds_are_exported_beside_max_probe_prompts():
    """Review 124: docs/study.md states ``MAX_BOOTSTRAP`` and ``MAX_SEED`` as the study's
    bounds, beside ``MAX_PROBE_PROMPTS``, which `hooked_attnres.study` exports; they were
    importable only from the private ``hooked_attnres._study_limits``."""
    import re

    import hooked_attnres.study as study
    from hooked_attnres.study import MAX_BOOTSTRAP, MAX_PROBE_PROMPTS, MAX_SEED

    assert {"MAX_BOOTSTRAP", "MAX_PROBE_PROMPTS", "MAX_SEED"} <= set(study.__all__)
    docs = (Path(__file__).resolve().parents[1] / "docs/study.md").read_text()
    for name, value in (("MAX_BOOTSTRAP", MAX_BOOTSTRAP), ("MAX_PROBE_PROMPTS", MAX_PROBE_PROMPTS)):
        assert re.findall(rf"`{name}` = (\d+)", docs) == [str(value)]
    # the largest seed the study's int64 tables hold (audit 122), which torch takes too
    assert MAX_SEED == 2**63 - 1  # numpy.iinfo(numpy.int64).max
    torch.Generator().manual_seed(MAX_SEED)


def test_a_run_found_with_a_seed_the_study_cannot_hold_is_refused_before_any_work(
    tmp_path, monkeypatch
):
    """Audit 122: a run of seed 2**63 (which train wrote until now) was found by the
    study's search and studied; the seed column became uint64 and the study failed after
    the model's whole sweep (pandas' merge: KeyError numpy.ulonglong), or, beside a run of
    seed 0, float64 (the seed written as 9.223372036854776e+18). Refused before any
    model is loaded, naming the folder and the remedy."""
    import hooked_attnres.study.run as study_module

    tiny_study_runs(tmp_path / "runs", "hard_kimi_L8", (0, 2**63))
    monkeypatch.setattr(study_module, "_study_run", lambda *a, **k: pytest.fail("studied"))
    folder = run_dir(tmp_path / "runs", "hard_kimi_L8", 2**63)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))} holds seed {2**63}, "):
        run_study(tmp_path / "out", checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    assert not (tmp_path / "out").exists()
    calls = []  # the other seed is studied when chosen

    def reached(condition, seed, settings):
        calls.append((condition, seed))
        raise RuntimeError("reached")

    monkeypatch.setattr(study_module, "_study_run", reached)
    with pytest.raises(RuntimeError, match="reached"):
        run_study(tmp_path / "out", checkpoints=tmp_path / "runs", seeds=[0], **_QUICK_STUDY)
    assert calls == [("hard_kimi_L8", 0)]


@pytest.mark.parametrize("flag", ["progress", "plots", "robustness"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_the_study_flags_must_be_true_or_false(tmp_path, monkeypatch, flag, value):
    """Audit finding: ``progress``, ``plots`` and ``robustness`` were read by truthiness, so
    ``robustness="no"`` ran the robustness check (and was written so into every kept run's
    key); refused now, by name, before any model is loaded."""
    import hooked_attnres.study.run as study_module

    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: pytest.fail("loaded"))
    kwargs = {"progress": False, flag: value}
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got {value!r}$"):
        run_study(tmp_path / "x", conditions=("vanilla",), **kwargs)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    with pytest.raises(ValueError, match="^out_dir / is the file-system root"):
        run_study("/", conditions=("vanilla",), progress=False)
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def shipped_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    result = run_study(
        out, conditions=("attnres", "vanilla"), n_prompts=48, n_bootstrap=100, progress=False
    )
    return out, result


def test_run_study_writes_every_table_and_the_wrapped_model_follows_the_schedule(shipped_study):
    out, result = shipped_study
    for name in (
        "accuracy.csv",
        "mass.csv",
        "mass_summary.csv",
        "effects.csv",
        "schedule.csv",
        "motifs.csv",
        "verdicts.csv",
        "fresh_motifs.csv",
        "dissociation.json",
        "report.md",
        "report.html",
        "run.json",
    ):
        assert (out / name).exists(), name
    assert not (out / "plots").exists()  # one page, not one file per figure
    assert sum(p.stat().st_size for p in out.iterdir()) <= 8e6
    assert set(result.accuracy.condition) == {"attnres", "vanilla"}
    assert (result.accuracy.accuracy >= 0.95).all()
    # the recency-wrapped baseline: content-independent, equal to the analytic schedule
    assert result.schedule.max_abs_deviation.max() <= 1e-6
    predicted = recency_schedule(8, 4, 3.0).families
    measured = result.mass_summary
    measured = measured[
        (measured.condition == "vanilla")
        & (measured.band == "all")
        & (measured.family == "current")
    ]
    assert measured.mass.mean() == pytest.approx(
        predicted[predicted.family == "current"].weight.mean(), abs=1e-6
    )
    # every claim for every condition and seed, on both prompt sets
    assert len(result.motifs) == len(result.fresh_motifs) == 2 * len(CLAIMS)
    assert set(result.verdicts.claim) == set(CLAIMS)
    assert (result.verdicts.n == 1).all() and result.verdicts.k.isin([0, 1]).all()
    # the mass CSV is the per-prompt table averaged over prompts
    import pandas as pd

    written = pd.read_csv(out / "mass.csv")
    row = written.iloc[0]
    per_prompt = result.mass[
        (result.mass.condition == row.condition)
        & (result.mass.seed == row.seed)
        & (result.mass.router == row.router)
        & (result.mass.layer == row.layer)
        & (result.mass.family == row.family)
    ]
    assert row.mass == pytest.approx(per_prompt.mass.mean()) and row.n_prompts == 48


def test_the_report_states_the_verdicts_in_text_and_html(shipped_study):
    out, result = shipped_study
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    import html

    for sentence in result.verdicts.sentence:
        assert sentence in markdown and html.escape(sentence) in page
    for heading in (
        "Does routing mass tell which depth sources matter?",
        "Verdicts",
        "Accuracy on the held-out probe prompts",
        "Figures",
        "Tables",
        "Settings and versions",
    ):
        assert f"# {heading}" in markdown or f"## {heading}" in markdown
        assert heading in page
    assert page.count("Plotly.newPlot") == len(result.figures)
    assert page.count('<script type="text/javascript">/**') <= 1  # plotly.js inlined once
    assert "analytic schedule to" in markdown


def _line_starting(prefix: str, text: str) -> str:
    """The one line of a report's ``text`` that starts with ``prefix`` (asserted one)."""
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return line


def test_the_study_figures_say_what_their_whiskers_are_as_the_report_and_shipped_report_do(
    shipped_study,
):
    """Session 21's leftover: the figures' whiskers were said to be "95 % bootstrap
    intervals over prompts" only in the report's prose. Every study figure with whiskers
    (all but the routing heatmaps) now says it under its title, from its tables' own
    ``confidence`` and ``n_prompts`` (48 prompts here); the report's paragraph says the
    figures say it, with the level of the study's settings, in the words of
    docs/results/shipped_report.md."""
    out, result = shipped_study
    n_blank = 0
    for name, fig in result.figures.items():
        expected = (
            []
            if name.startswith("routing_")
            else ["whiskers: 95 % percentile-bootstrap intervals over 48 prompts"]
        )
        lines = subtitle_lines(fig)
        assert [line for line in lines if line.startswith("whiskers:")] == expected, name
        # audit 221: a second line says what the blank cells or missing bars are, in the
        # figures that draw one (every model has every seed here: a blank is no slot)
        said = [line for line in lines if not line.startswith("whiskers:")]
        drawn = [np.asarray(t.z if t.type == "heatmap" else t.y, float) for t in fig.data]
        blank = any(np.isnan(values).any() for values in drawn)
        assert bool(said) == blank, (name, said)
        n_blank += blank
    assert n_blank > 0
    shipped = (Path(__file__).resolve().parents[1] / "docs/results/shipped_report.md").read_text()
    written = _line_starting("Effects are in percent", (out / "report.md").read_text())
    assert written == _line_starting("Effects are in percent", shipped)
    assert (
        "whiskers are 95 % bootstrap intervals over prompts (each figure says so under" in written
    )
    # the effect tables' headers read the level too (audit 177's leftover: the fixed
    # "mass [95% CI]"); shipped_report.md's were edited to the regenerated ones

    def headers(text: str) -> set[str]:
        return {line for line in text.splitlines() if line.startswith("| router | family |")}

    (header,) = headers((out / "report.md").read_text())
    assert headers(shipped) == {header} and "| mass [95 % CI] |" in header


def test_a_failed_study_leaves_the_previous_results_and_foreign_folders_are_refused(
    tmp_path, monkeypatch
):
    out = tmp_path / "study"
    kwargs = dict(
        conditions=("vanilla",),
        n_prompts=16,
        n_bootstrap=20,
        progress=False,
        plots=False,
        robustness=False,
    )
    run_study(out, **kwargs)
    before = (out / "report.md").read_text()
    import hooked_attnres.study.run as study_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(study_module, "study_report", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_study(out, **{**kwargs, "n_prompts": 24})
    assert (out / "report.md").read_text() == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    calls = []
    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: calls.append(a))
    with pytest.raises(FileExistsError, match="does not hold an earlier study"):
        run_study(foreign, **kwargs)
    assert not calls and (foreign / "notes.txt").read_text() == "keep me"  # refused before work


def test_a_study_of_tiny_models_has_every_claim_for_every_seed(tmp_path):
    condition = get_condition("hard_kimi_L8")
    tiny_study_runs(tmp_path / "runs", condition.name, (0, 1), n_layers=6, num_blocks=3)
    result = run_study(
        tmp_path / "out",
        checkpoints=tmp_path / "runs",
        n_prompts=24,
        n_bootstrap=50,
        progress=False,
    )
    assert sorted(set(result.motifs.seed)) == [0, 1]
    assert len(result.motifs) == 2 * len(CLAIMS)
    assert set(zip(result.motifs.seed, result.motifs.claim, strict=True)) == {
        (s, c) for s in (0, 1) for c in CLAIMS
    }
    verdicts = result.verdicts.set_index("claim")
    assert list(verdicts.index) == list(CLAIMS) and (verdicts.n == 2).all()
    assert all(
        f"of 2 seeds ({v})" in s for v, s in zip(verdicts.verdict, verdicts.sentence, strict=True)
    )
    # the report's matrix: one row per condition, one "k/n verdict" cell per claim, where k
    # counts the seeds whose per-seed row says present (recounted here from result.motifs)
    matrix = verdict_matrix(result.verdicts).set_index("condition")
    assert list(matrix.index) == [condition.name] and list(matrix.columns) == list(CLAIMS)
    for claim in CLAIMS:
        k = int(result.motifs[result.motifs.claim == claim].present.sum())
        assert matrix.loc[condition.name, claim].startswith(f"{k}/2 ")
    assert "| condition |" in (tmp_path / "out" / "report.md").read_text()
    # a model that does not clearly prefer the answer (clean logit difference under 1 logit,
    # like a model at chance): percent of it would magnify noise, so the task's figures are
    # in logits and name that model; otherwise in percent
    from hooked_attnres.study import study_figures

    def titles(figures):
        return [title_of(f) for n, f in figures.items() if not n.startswith("rout")]

    def units(figures):
        return {
            a.title.text
            for n, f in figures.items()
            if not n.startswith("rout")
            for a in f.select_yaxes()
            if a.title.text and "effect" in a.title.text
        }

    seed1 = (result.effects.seed == 1) & (result.effects.metric == "logit_diff")
    for clean, in_logits in ((5.0, False), (0.01, True), (-0.5, True)):
        result.effects.loc[result.effects.metric == "logit_diff", "clean"] = 5.0
        result.effects.loc[seed1, "clean"] = clean
        figures = study_figures(result)
        assert titles(figures) and all(
            ("in logits" in t and "seed 1" in t) == in_logits for t in titles(figures)
        )
        assert units(figures) and all(("logits" in u) == in_logits for u in units(figures))
    # just under the 1-logit rule: the title printed "a clean logit difference of 1.00"
    # (saturated_cumulative_L16 seed 1 on 16 prompts: 0.9969) as the reason for logits
    for clean in (0.9995, 0.99999):
        result.effects.loc[seed1, "clean"] = clean
        for title in titles(study_figures(result)):
            printed = float(title.split("clean logit difference of ")[1].rstrip(")"))
            assert printed < 1.0 and printed == pytest.approx(clean, abs=1e-3), title


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=30000",
]


def chromium() -> str:
    import shutil

    found = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if found is None:
        pytest.fail(
            "the report test needs a headless Chromium: `apt-get install chromium` "
            "(.ci/run installs it)"
        )
    return found


def test_the_html_report_renders_every_figure_in_a_real_browser(shipped_study, tmp_path):
    import subprocess

    out, result = shipped_study
    page = (out / "report.html").as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    # CI keeps the screenshot as an artefact (.ci/run sets HOOKED_ATTNRES_ARTEFACTS=docs/ci,
    # ignored by git); elsewhere it goes to the test's temporary folder. The one kept in the
    # repository, docs/report_screenshot.png, is of the full shipped study.
    shot = Path(os.environ.get("HOOKED_ATTNRES_ARTEFACTS") or tmp_path) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    # one browser run dumps the rendered page and takes the screenshot (two runs took
    # 2 x ~1.5 s of Chromium's start-up); a browser that did only one of them fails below
    dom = subprocess.run(
        [chromium(), *flags, "--window-size=1280,3000", f"--screenshot={shot}", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # plotly replaces each figure's empty div by a rendered plot container with SVG roots
    assert dom.count('class="plot-container plotly"') == len(result.figures) > 0
    assert dom.count('class="main-svg"') >= 2 * len(result.figures)
    import html

    for sentence in result.verdicts.sentence:
        assert html.escape(sentence, quote=False) in dom
    assert shot.stat().st_size > 50_000  # a page with content, not a blank image


def test_probe_prompts_use_the_loaded_conditions_task_and_refuse_to_guess():
    from hooked_attnres.study.run import PROBE_SEED

    model = load_condition("attnres")  # the saturated probe: 6 pairs
    hard = make_task("hard")  # 9 pairs, same vocabulary: a wrong guess would go unnoticed
    vocab = model.tokenizer.get_vocab()
    assert torch.equal(
        probe_prompts(model, 8).tokens,
        make_task("saturated").sample(8, PROBE_SEED, "test", vocab).tokens,
    )
    assert torch.equal(
        probe_prompts(model, 8, task="hard").tokens,
        hard.sample(8, PROBE_SEED, "test", vocab).tokens,
    )
    hard_model = load_condition("hard_cumulative_L8")  # its condition's task: 9 pairs
    hard_model_tokens = hard.sample(8, PROBE_SEED, "test", hard_model.tokenizer.get_vocab()).tokens
    assert torch.equal(probe_prompts(hard_model, 8).tokens, hard_model_tokens)
    import copy

    assert torch.equal(probe_prompts(copy.deepcopy(hard_model), 8).tokens, hard_model_tokens)
    unknown = HookedAttnRes.from_pretrained(checkpoint_dir("attnres"))
    with pytest.raises(ValueError, match="pass task="):
        probe_prompts(unknown, 8)
    # the count is named as the caller wrote it (it said "n must be an integer >= 1, got 0");
    # with a set to exclude, 0 crashed (IndexError: "tensors used as indices must be long"),
    # True gave 1 prompt and 2.5 said "got 9.0" (the draw's size)
    first = probe_prompts(model, 4)
    for bad in (0, -1, 2.5, True):
        for exclude in (None, first):
            with pytest.raises(ValueError, match=rf"n_prompts must be an integer >= 1, got {bad}"):
                probe_prompts(model, bad, exclude=exclude)
    # exclude="x" raised a bare AttributeError ('str' object has no attribute 'tokens')
    for bad in ("x", first.tokens, [first]):
        with pytest.raises(TypeError, match=r"^exclude must be a TaskBatch .* or None, got "):
            probe_prompts(model, 4, exclude=bad)
    # audit 64: a task that is no Task nor a name raised a bare AttributeError ("'int' object
    # has no attribute 'sample'"); a Task class (not an instance) a TypeError about sample()
    for bad in (3, ["hard"], type(hard), True):
        with pytest.raises(
            TypeError,
            match=r"^task must be a Task, a study task name \(saturated, .*\) or None, got ",
        ):
            probe_prompts(model, 4, task=bad)


def test_too_many_or_too_few_probe_prompts_are_refused_before_any_work(tmp_path, monkeypatch):
    """Audit 56: ``n_prompts=10**9`` was drawn before anything failed (a Python loop: 21 s
    and 65 MB per 50 000 prompts measured, so about 119 hours towards 1.3 TB, after the
    first model was loaded); `study_condition` of one prompt failed only after its forward
    passes and whole ablation sweep (NaN intervals), and a bad ``n_bootstrap`` after the
    forward pass and the routing mass."""
    import hooked_attnres.study.run as study_module
    from hooked_attnres.study import MAX_PROBE_PROMPTS, study_condition
    from hooked_attnres.tasks.base import Task

    assert MAX_PROBE_PROMPTS == 16384  # the bound docs/study.md and --prompts state
    model = load_condition("attnres")
    first = probe_prompts(model, 4)
    drawn = []

    def no_draw(self, n, *args, **kwargs):
        drawn.append(n)
        raise AssertionError("drew prompts")

    monkeypatch.setattr(Task, "sample", no_draw)
    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: pytest.fail("loaded"))
    for too_many in (MAX_PROBE_PROMPTS + 1, 10**9):
        message = rf"^n_prompts must be an integer <= {MAX_PROBE_PROMPTS} \(the most probe "
        with pytest.raises(ValueError, match=message + rf".*\), got {too_many}$"):
            run_study(tmp_path / "x", conditions=("vanilla",), n_prompts=too_many, progress=False)
        for exclude in (None, first):
            with pytest.raises(ValueError, match=message):
                probe_prompts(model, too_many, exclude=exclude)
    with pytest.raises(AssertionError, match="drew prompts"):
        probe_prompts(model, MAX_PROBE_PROMPTS)  # the bound itself is drawn
    assert drawn == [MAX_PROBE_PROMPTS]
    monkeypatch.undo()

    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"^batch holds 1 prompt; study_condition needs "):
            study_condition(model, first[:1], progress=False)
        with pytest.raises(ValueError, match=r"one prompt has none"):
            study_condition(model, first[[2]], progress=False)
        huge = first[torch.zeros(MAX_PROBE_PROMPTS + 1, dtype=torch.long)]
        with pytest.raises(ValueError, match=rf"^batch holds {MAX_PROBE_PROMPTS + 1} prompts; "):
            study_condition(model, huge, progress=False)
        with pytest.raises(ValueError, match="^n_bootstrap must be an integer >= 1, got 0"):
            study_condition(model, first, n_bootstrap=0, progress=False)
        with pytest.raises(ValueError, match="^seed must be an integer >= 0, got -1"):
            study_condition(model, first, seed=-1, progress=False)
    finally:
        handle.remove()
    assert calls == []  # refused before the first forward pass


def test_load_condition_checks_its_arguments_before_the_checkpoint_and_ignores_none(tmp_path):
    """Audit 56: ``num_blocks`` / ``recency_bias`` were checked after the checkpoint was
    looked for (a missing one said "holds no checkpoint" for ``num_blocks=0``), and a Block
    AttnRes condition accepted both and ignored them (``num_blocks=2`` loaded the trained
    4-block model)."""
    missing = tmp_path / "no_runs"
    for kwargs, message in (
        ({"num_blocks": 0}, "^num_blocks must be an integer >= 1 or None, got 0"),
        ({"num_blocks": 2.5}, "^num_blocks must be an integer >= 1 or None, got 2.5"),
        ({"recency_bias": float("nan")}, "^recency_bias must be a finite number or None"),
        ({"recency_bias": True}, "^recency_bias must be a finite number or None, got True"),
    ):
        with pytest.raises(ValueError, match=message):
            load_condition("vanilla", 0, missing, **kwargs)
    for kwargs in ({"num_blocks": 2}, {"recency_bias": 1.0}):
        with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} applies to the recency wrap"):
            load_condition("attnres", 0, missing, **kwargs)
        with pytest.raises(ValueError, match="load 'hard_vanilla_L8'"):
            load_condition("hard_cumulative_L8", 0, **kwargs)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_condition("vanilla", 0, missing, num_blocks=2)  # good arguments: then the path
    wrapped = load_condition("vanilla", 0, num_blocks=2, recency_bias=1.5).cfg
    assert (wrapped.attnres_num_blocks, wrapped.attnres_recency_bias) == (2, 1.5)
    default = load_condition("vanilla", 0).cfg
    recipe = get_condition("vanilla")
    assert (default.attnres_num_blocks, default.attnres_recency_bias) == (
        recipe.n_layers // 2,
        3.0,  # RECENCY_BIAS, the seed paper's b
    )


def test_a_run_trained_on_another_task_than_its_conditions_is_refused(tmp_path):
    import shutil

    target = run_dir(tmp_path, "attnres", 0)
    shutil.copytree(checkpoint_dir("attnres").parent, target)
    metrics = json.loads((target / "metrics.json").read_text())
    metrics["eval_tasks"] = [repr(make_task("hard"))]  # as `train --task-arg n_pairs=9` records
    (target / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="was trained and evaluated on .*n_pairs=9.*task="):
        load_condition("attnres", 0, tmp_path)


def test_a_run_of_another_task_is_refused_before_the_first_model_is_studied(tmp_path, monkeypatch):
    """Audit 56: `run_study` checked each run's recorded task when it loaded it, so a run
    trained on another task as the last of a study failed after every other model's work."""
    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0, 1))
    metrics = {"eval_tasks": [repr(make_task("saturated"))]}  # not the hard task
    (run_dir(tmp_path / "runs", condition, 1) / "metrics.json").write_text(json.dumps(metrics))
    runs = _CountedRuns(monkeypatch)
    runs.arm()
    with pytest.raises(ValueError, match=r"hard_kimi_L8_seed1 was trained and evaluated on"):
        run_study(tmp_path / "out", checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    assert runs.calls == []


def test_the_robustness_prompts_are_disjoint_from_the_first_set():
    model = load_condition("attnres")
    first = probe_prompts(model, 64)
    fresh = probe_prompts(model, 64, seed=2, exclude=first)
    assert len(fresh) == 64
    assert not {tuple(r) for r in first.tokens.tolist()} & {tuple(r) for r in fresh.tokens.tolist()}
    assert torch.equal(probe_prompts(model, 64, seed=2, exclude=first).tokens, fresh.tokens)


def test_a_saturated_run_under_a_paperlike_name_is_refused(tmp_path):
    """`paperlike` and `saturated` read the same prompts; the recorded stopping rule tells
    their runs apart, so a run filed under the wrong one is refused, both ways."""
    import shutil

    paperlike = run_dir(tmp_path, "paperlike_cumulative_L8", 0)
    shutil.copytree(checkpoint_dir("paperlike_cumulative_L8").parent, paperlike)
    assert load_condition("paperlike_cumulative_L8", 0, tmp_path) is not None
    wrong = run_dir(tmp_path, "saturated_cumulative_L8", 0)
    shutil.copytree(paperlike, wrong)
    with pytest.raises(ValueError, match="stop_accuracy=0.5, but condition 'saturated"):
        load_condition("saturated_cumulative_L8", 0, tmp_path)
    metrics = json.loads((paperlike / "metrics.json").read_text())
    del metrics["train_config"]["stop_accuracy"]  # as a saturated run records it
    (paperlike / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="stop_accuracy=None, but condition 'paperlike"):
        load_condition("paperlike_cumulative_L8", 0, tmp_path)


@pytest.mark.parametrize("under", [("hard_cumulative_L8", 1), ("hard_kimi_L8", 0)])
def test_a_run_folder_under_another_seeds_or_conditions_name_is_refused(
    tmp_path, monkeypatch, under
):
    """Audit 150: a run folder copied or renamed to another seed's name (shipped
    ``hard_cumulative_L8`` seed 0 as ``_seed1``) was studied as a second model: two
    identical rows, every seed spread 0, and "M2-attn replicated in 2 of 2 seeds" from one
    model; under another condition of the same task (``hard_kimi_L8``) it was studied as
    that condition's. Its ``metrics.json`` records the run (``description``): refused,
    before any model is studied."""
    import shutil

    condition, seed = under
    source = checkpoint_dir("hard_cumulative_L8", 0).parent
    recorded = json.loads((source / "metrics.json").read_text())["description"]
    shutil.copytree(source, run_dir(tmp_path / "runs", condition, seed))
    differs = "model_seed=0" if seed else "layout='cumulative'"
    assert recorded == get_condition("hard_cumulative_L8").description(0)
    with pytest.raises(ValueError, match=rf"holds another run than its name says.*{differs}"):
        load_condition(condition, seed, tmp_path / "runs")
    runs = _CountedRuns(monkeypatch)
    runs.arm()
    with pytest.raises(ValueError, match="holds another run than its name says"):
        run_study(tmp_path / "out", checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    assert runs.calls == []
    shutil.rmtree(run_dir(tmp_path / "runs", condition, seed))
    shutil.copytree(source, run_dir(tmp_path / "runs", "hard_cumulative_L8", 0))  # its own name
    assert load_condition("hard_cumulative_L8", 0, tmp_path / "runs") is not None


def test_a_run_stopped_in_its_final_writes_is_refused_until_finished(tmp_path, monkeypatch):
    """Audit 150: a training run killed between its last two writes (a run started over
    with other settings removes the earlier ``metrics.json``, then writes ``model/``, then
    the new ``metrics.json``) left ``model/`` (possibly the earlier run's) with no
    ``metrics.json`` beside its checkpoint: the study read that model as the folder's run,
    its task unchecked. Refused now, naming the command that finishes the run."""
    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0, 1))
    checkpoint = run_dir(tmp_path / "runs", condition, 1) / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4}))
    message = r"hard_kimi_L8_seed1 has a training checkpoint but no metrics.json.*--seeds 1"
    with pytest.raises(ValueError, match=message):
        load_condition(condition, 1, tmp_path / "runs")
    assert load_condition(condition, 0, tmp_path / "runs") is not None  # no checkpoint
    runs = _CountedRuns(monkeypatch)
    runs.arm()
    with pytest.raises(ValueError, match=message):
        run_study(tmp_path / "out", checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    assert runs.calls == []


def test_an_unfinished_training_run_is_refused_not_left_out_of_the_study(tmp_path, monkeypatch):
    """Audit 178: ``hooked-attnres train --seeds 0 1`` killed during seed 1's training
    leaves ``{condition}_seed1/`` with its checkpoint and no ``model/``; the study's
    default selection (every seed found, every condition found) skipped that folder
    without a word, so the study of the two seeds asked for was silently a study of one
    ("present in 1 of 1 seeds"), and a condition whose every run was unfinished was left
    out of the report. Refused now before any model is studied, naming the folder, its
    step and how to finish it or leave it out; with the seeds (and conditions) named so
    that it is left out, the study runs."""
    import shutil

    condition = "hard_kimi_L8"
    root = tmp_path / "runs"
    tiny_study_runs(root, condition, (0,))
    checkpoint = run_dir(root, condition, 1) / "checkpoint"  # seed 1: unfinished
    checkpoint.mkdir(parents=True)
    state = {"step": 3, "train_config": {"steps": 8}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    message = (
        r"hard_kimi_L8_seed1 holds an unfinished training run \(step 3 of 8, no model/\): "
        r"the study would leave it out; finish it \(hooked-attnres train --condition "
        r"hard_kimi_L8 --seeds 1 --out .*runs: it resumes .*--seeds"
    )
    for conditions, seeds in ((None, None), ([condition], None), (None, [1]), (None, [0, 1])):
        with pytest.raises(ValueError, match=message):
            find_runs(root, conditions, seeds)
    runs = _CountedRuns(monkeypatch)
    runs.arm()
    with pytest.raises(ValueError, match=message):
        run_study(tmp_path / "out", checkpoints=root, **_QUICK_STUDY)
    assert runs.calls == []
    # a condition whose only run is unfinished (it was left out of the report)
    shutil.copytree(checkpoint, run_dir(root, "hard_cumulative_L8", 0) / "checkpoint")
    with pytest.raises(ValueError, match=r"hard_cumulative_L8_seed0 holds an unfinished .*1 more"):
        find_runs(root, None, [0, 1])
    with pytest.raises(ValueError, match=r"hard_cumulative_L8_seed0 holds an unfinished"):
        find_runs(root, None, [0])
    # left out by name: the finished run alone
    assert find_runs(root, [condition], [0]) == [(condition, 0)]
    # a run folder killed before its first checkpoint (nothing in it yet) is unfinished too
    shutil.rmtree(run_dir(root, "hard_cumulative_L8", 0))
    shutil.rmtree(run_dir(root, condition, 1) / "checkpoint")
    with pytest.raises(
        ValueError,
        match=r"hard_kimi_L8_seed1 holds an unfinished training run "
        r"\(no checkpoint yet, no model/\)",
    ):
        find_runs(root, None, None)
    shutil.rmtree(run_dir(root, condition, 1))
    assert find_runs(root, None, None) == [(condition, 0)]


def test_an_unfinished_legacy_run_is_told_its_own_options_and_an_unreadable_state(tmp_path):
    """Review 187: the train command that finishes an unfinished run is the one
    `_check_trained_task` names (`finish_command`): for the original two recipes with the
    options the run was started with (a resume without them is refused as another run);
    a checkpoint whose ``trainer_state.json`` cannot be read is still an unfinished run."""
    checkpoint = run_dir(tmp_path, "attnres", 2) / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{not json")
    with pytest.raises(
        ValueError,
        match=r"attnres_seed2 holds an unfinished training run \(a checkpoint, no model/\): "
        r".*--seeds 2 --out .*, with the --steps / --set / --task-arg options it was started "
        r"with, if any: it resumes from its checkpoint\)",
    ):
        find_runs(tmp_path, None, None)


def test_a_custom_legacy_run_stopped_in_its_final_writes_is_told_its_own_options(tmp_path):
    """Review 155: audit 150's refusal of a run stopped in its final writes named the train
    command without the options an ``attnres`` / ``vanilla`` run (the recipes that take
    --steps / --set / --task-arg) was started with; run as named, that command was refused
    as another run (``train_config.batch_size differs``), whose remedy (--no-resume or
    another --out) discards the run. The message says to give them; so given, the command
    finishes the run and the study reads it."""
    from hooked_attnres import cli

    options = ["--steps", "1", "--set", "batch_size=2", "--set", "eval_size=4"]
    command = ["train", "--condition", "attnres", "--seeds", "0", "--out", str(tmp_path)]
    assert cli.main([*command, *options, "--no-progress", "--threads", "1"]) == 0
    (run_dir(tmp_path, "attnres", 0) / "metrics.json").unlink()  # stopped before it
    with pytest.raises(ValueError, match="--seeds 0 --out .*, with the --steps / --set / --task"):
        load_condition("attnres", 0, tmp_path)
    assert cli.main([*command, "--no-progress", "--threads", "1"]) == 1  # without them
    assert cli.main([*command, *options, "--no-progress", "--threads", "1"]) == 0
    assert load_condition("attnres", 0, tmp_path) is not None


def test_a_kept_run_whose_bytes_changed_is_recomputed_not_read(tmp_path):
    """Audit 150: a kept run (`partial_dir`) whose file still unpickles after a change (4
    bytes of a float flipped) was read as it was, so the resumed study wrote the changed
    number silently (``accuracy`` 0.75 read as another value). The tables' SHA-256 is
    kept with them: a kept run whose tables differ from it is recomputed."""
    from hooked_attnres.study import run as study_module

    table = pd.DataFrame({"accuracy": [0.75], "n_prompts": [8]})
    key = {"format": "test", "condition": "hard_kimi_L8", "seed": 0}
    study_module._write_partial(tmp_path, "hard_kimi_L8", 0, key, {"accuracy": table})
    read = study_module._read_partial(tmp_path, "hard_kimi_L8", 0, key)
    pd.testing.assert_frame_equal(read["accuracy"], table)
    path = study_module._partial_file(tmp_path, "hard_kimi_L8", 0)
    data = path.read_bytes()
    stored = np.float64(0.75).tobytes()
    assert data.count(stored) == 1
    path.write_bytes(data.replace(stored, np.float64(0.25).tobytes()))
    assert study_module._read_partial(tmp_path, "hard_kimi_L8", 0, key) is None


class _CountedRuns:
    """Stands in for the study's per-model run (``_study_run``): records the ``(condition,
    seed)`` of every call and, once `arm` is given ``interrupt_at=k``, raises
    ``KeyboardInterrupt`` at the k-th call (Ctrl-C in the middle of a study)."""

    def __init__(self, monkeypatch) -> None:
        import hooked_attnres.study.run as study_module

        self.calls: list[tuple] = []
        self._module, self._monkeypatch = study_module, monkeypatch
        self._original = study_module._study_run

    def arm(self, interrupt_at: Optional[int] = None) -> None:
        """Forget the calls so far and count anew (interrupting at call ``interrupt_at``)."""
        self.calls.clear()

        def counted(condition, seed, *args):
            self.calls.append((condition, seed))
            if len(self.calls) == interrupt_at:
                raise KeyboardInterrupt
            return self._original(condition, seed, *args)

        self._monkeypatch.setattr(self._module, "_study_run", counted)


def test_an_interrupted_study_resumes_with_only_the_unfinished_models(tmp_path, monkeypatch):
    """Ctrl-C after the first model used to lose its work; the same call now reads it back
    and computes only the rest, with the same tables as an uninterrupted study. A kept run
    is not reused when the settings, the checkpoint or the file itself changed."""
    import hooked_attnres.study.run as study_module

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0, 1))
    kwargs = dict(
        checkpoints=tmp_path / "runs",
        n_prompts=12,
        n_bootstrap=20,
        progress=False,
        plots=False,
    )
    reference = run_study(tmp_path / "reference", **kwargs)
    runs = _CountedRuns(monkeypatch)
    out = tmp_path / "out"
    kept = study_module.partial_dir(out)
    runs.arm(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(out, **kwargs)
    assert runs.calls == [(condition, 0), (condition, 1)] and not out.exists()
    assert [p.name for p in kept.iterdir()] == [f"{condition}_seed0.pkl"]

    runs.arm()
    result = run_study(out, **kwargs)
    assert runs.calls == [(condition, 1)]  # seed 0 was read back, not recomputed
    for name in ("accuracy", "mass_summary", "effects", "motifs", "verdicts", "fresh_motifs"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(reference, name))
    assert (out / "report.md").is_file() and not kept.exists()

    def interrupted_then_rerun(**changes) -> list:
        runs.arm(interrupt_at=2)
        with pytest.raises(KeyboardInterrupt):
            run_study(out, **kwargs)
        if "damage" in changes:
            (kept / f"{condition}_seed0.pkl").write_bytes(b"not a pickle")
        if "retrain" in changes:  # another model in seed 0's checkpoint folder
            tiny_study_runs(tmp_path / "other", condition, (5,))
            source = run_dir(tmp_path / "other", condition, 5) / "model" / "model.safetensors"
            target = run_dir(tmp_path / "runs", condition, 0) / "model" / "model.safetensors"
            target.write_bytes(source.read_bytes())
            unseal(target.parent)  # replaced by hand (with the marker: refused as changed)
        runs.arm()
        settings = {**kwargs, **{k: v for k, v in changes.items() if k in kwargs}}
        run_study(out, **settings)
        return list(runs.calls)

    both = [(condition, 0), (condition, 1)]
    assert interrupted_then_rerun() == [(condition, 1)]
    assert interrupted_then_rerun(n_bootstrap=30) == both  # other settings
    assert interrupted_then_rerun(damage=True) == both  # an unreadable kept file
    assert interrupted_then_rerun(retrain=True) == both  # another checkpoint


def test_the_schedule_sentence_decides_from_every_seed_and_prints_its_side_of_the_threshold(
    tmp_path,
):
    """Audit findings: a NaN deviation of one seed was skipped by pandas' max (the claim
    "holds" on the other seed's 1e-7), and a deviation just above the 1e-6 criterion was
    printed "1.0e-06" next to "does not hold (criterion <= 1e-6)"."""
    from hooked_attnres.analysis.motifs import PREREGISTERED
    from hooked_attnres.study.report import _schedule_sentences
    from hooked_attnres.study.run import StudyResult

    threshold = PREREGISTERED.schedule_max_deviation
    empty = pd.DataFrame()

    def sentence(deviations):
        schedule = pd.DataFrame(
            {"condition": "vanilla", "seed": [0, 1], "max_abs_deviation": deviations}
        )
        result = StudyResult(tmp_path, empty, empty, empty, empty, empty, schedule, empty)
        return _schedule_sentences(result)[0]

    assert "to 1.0e-06 " in sentence([threshold, 0.0]) and "claim holds" in sentence([threshold, 0])
    above = threshold * (1 + 1e-7)
    text = sentence([above, 0.0])
    assert "claim does not hold" in text
    printed = float(text.split("schedule to ")[1].split(" ")[0])
    assert printed > threshold and printed == pytest.approx(above, rel=1e-9)
    assert "to 7.6e-08 " in sentence([7.6e-8, 1e-8])  # the usual two digits otherwise
    with pytest.raises(ValueError, match="vanilla seed 0 holds a non-finite deviation"):
        sentence([float("nan"), 1e-7])
    # audit 109: a seed labelled NaN was left out by groupby: "holds" on seed 0's 1e-7
    unlabelled = pd.DataFrame(
        {"condition": "vanilla", "seed": [0, float("nan")], "max_abs_deviation": [1e-7, 1e-3]}
    )
    result = StudyResult(tmp_path, empty, empty, empty, empty, empty, unlabelled, empty)
    with pytest.raises(ValueError, match=r"schedule table has NaN labels .*\{'seed': 1\}"):
        _schedule_sentences(result)


def test_a_study_resumed_with_another_thread_count_recomputes_the_kept_models(
    tmp_path, monkeypatch
):
    """Audit finding: the effects of 1 and 2 threads differ by ~1e-8 (paperlike_cumulative_L8
    seed 1: 1.0e-8 in ci_high), but a kept run was reused whatever the thread count, so a
    resumed study mixed models computed with both while run.json named one."""
    import hooked_attnres.study.run as study_module

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0, 1))
    kwargs = dict(
        checkpoints=tmp_path / "runs", n_prompts=6, n_bootstrap=5, progress=False, plots=False
    )
    runs = _CountedRuns(monkeypatch)
    out = tmp_path / "out"
    runs.arm(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(out, **kwargs)
    assert [p.name for p in study_module.partial_dir(out).iterdir()] == [f"{condition}_seed0.pkl"]
    runs.arm()
    threads = torch.get_num_threads() + 1  # a real second thread is slow on a shared machine
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    result = run_study(out, **kwargs)
    assert runs.calls == [(condition, 0), (condition, 1)]  # the kept seed 0 is recomputed
    assert result.settings["threads"] == threads


def test_a_kept_run_is_not_reused_after_its_checkpoints_tokenizer_changed(tmp_path):
    """The probe prompts are token ids of the checkpoint's own tokenizer: the same words
    with other ids (same size, so the same model shapes) are other prompts, so the kept
    tables of the run must not be reused (the key fingerprints the tokenizer files)."""
    from hooked_attnres.study.run import _run_key, _RunSettings
    from hooked_attnres.tasks.vocabulary import build_tokenizer

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path, condition, (0,))
    settings = _RunSettings(tmp_path, 6, 5, False)
    before = _run_key(condition, 0, settings)
    model = checkpoint_dir(condition, 0, tmp_path)
    saved = HookedAttnRes.from_pretrained(model).tokenizer
    words = list(get_condition(condition).make_task().words())
    other = build_tokenizer(list(reversed(words)))
    assert len(other) == len(saved) and other.get_vocab() != saved.get_vocab()
    other.save_pretrained(str(model))
    unseal(model)  # replaced by hand (with the marker: refused as changed)
    assert HookedAttnRes.from_pretrained(model).tokenizer.get_vocab() == other.get_vocab()
    after = _run_key(condition, 0, settings)
    assert {k for k in before if before[k] != after[k]} == {"checkpoint"}


@pytest.mark.parametrize("condition", ["hard_cumulative_L8", "attnres"])
def test_decay_alone_moves_the_single_source_router_gain(condition):
    """docs/training.md: AdamW decays every parameter, norm gains included. The layer-0
    attention router of the cumulative layout has one source, so its key-norm gain gets no
    gradient and only the decay moves it: from 1 to prod(1 - lr_s * weight_decay) over the
    learning rates the run recorded."""
    import math

    metrics = json.loads(metrics_path(condition, 0).read_text())
    decay = metrics["train_config"]["weight_decay"]
    expected = math.prod(1 - record["lr"] * decay for record in metrics["history"])
    gain = HookedAttnRes.from_pretrained(checkpoint_dir(condition, 0)).blocks[0].attn_res
    assert expected < 1 - 1e-3  # the decay is visible at all
    assert torch.allclose(gain.key_norm.w, torch.full_like(gain.key_norm.w, expected), rtol=1e-5)


def test_a_vanilla_model_of_a_partial_shape_gets_the_attnres_defaults():
    """docs/training.md: ``build_model(..., shape=dict(d_model=64, n_layers=4, n_heads=4))``
    ("HookedAttnResConfig fields, the rest default"). The vanilla condition raised
    ``KeyError: 'd_mlp'``; it now completes the shape with the same documented defaults
    (d_head d_model // n_heads, d_mlp 3 * d_model, as many KV heads as heads, n_ctx 2048)
    as the AttnRes condition, so both are of one shape; a given ``eps`` reaches both (the
    vanilla model ignored it)."""
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    tok = task_tokenizer(KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6))
    shape = dict(d_model=64, n_layers=4, n_heads=4, eps=1e-5)
    vanilla = build_model("vanilla", 0, tok, shape).config
    attnres = build_model("attnres", 0, tok, shape).cfg
    ours = (
        vanilla.hidden_size,
        vanilla.num_hidden_layers,
        vanilla.num_attention_heads,
        vanilla.head_dim,
        vanilla.intermediate_size,
        vanilla.num_key_value_heads,
        vanilla.max_position_embeddings,
        vanilla.rope_parameters["rope_theta"],
        vanilla.rms_norm_eps,
    )
    assert ours[:7] == (64, 4, 4, 64 // 4, 3 * 64, 4, 2048)
    assert ours == (
        attnres.d_model,
        attnres.n_layers,
        attnres.n_heads,
        attnres.d_head,
        attnres.d_mlp,
        attnres.n_key_value_heads,
        attnres.n_ctx,
        attnres.rotary_base,
        attnres.eps,
    )


def test_a_vanilla_model_refuses_the_shape_fields_it_would_ignore():
    """The vanilla Qwen3ForCausalLM is built from the shape's sizes, ``eps`` and
    ``rotary_base``; a ``shape`` with another field off its default made an AttnRes model
    that has it and a vanilla one that silently had not (a float32, untied model
    initialised at std 0.02), so the vanilla build refuses it. Fields at their defaults
    are accepted."""
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    tok = task_tokenizer(KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6))
    base = dict(d_model=32, n_layers=2, n_heads=2)
    for extra in (
        dict(tie_word_embeddings=True),
        dict(initializer_range=0.5),
    ):
        attnres = build_model("attnres", 0, tok, {**base, **extra}, 1)
        ((key, value),) = extra.items()
        assert getattr(attnres.cfg, key) == value  # the AttnRes model has it
        with pytest.raises(ValueError, match=rf"would ignore {key}=.*leave them out"):
            build_model("vanilla", 0, tok, {**base, **extra})
    vanilla = build_model("vanilla", 0, tok, {**base, "dtype": torch.float32, "seed": None})
    assert vanilla.config.hidden_size == 32 and vanilla.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, "bfloat16"])
def test_a_vanilla_model_is_built_in_the_shapes_dtype_as_the_attnres_one_is(dtype):
    """``dtype`` in a ``shape`` made an AttnRes model of that dtype and was refused for the
    vanilla one (a field it "would ignore"). Both honour it now, the vanilla model as the
    AttnRes one does: initialised in float32 from the seed, then converted. So its
    parameters have the dtype, and its weights and logits are those of the float32 model
    built without ``dtype`` and converted afterwards."""
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    tok = task_tokenizer(KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6))
    base = dict(d_model=32, n_layers=2, n_heads=2)
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    attnres = build_model("attnres", 0, tok, {**base, "dtype": dtype}, 1)
    vanilla = build_model("vanilla", 0, tok, {**base, "dtype": dtype})
    assert attnres.cfg.dtype == expected
    assert {p.dtype for p in vanilla.parameters()} == {expected}
    converted = build_model("vanilla", 0, tok, base).to(expected)  # built in float32
    built = {**vanilla.state_dict(), **dict(vanilla.named_buffers())}  # rotary tables too
    reference = {**converted.state_dict(), **dict(converted.named_buffers())}
    assert built.keys() == reference.keys()
    assert all(torch.equal(built[k], reference[k]) for k in built)
    tokens = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected_logits = vanilla(tokens).logits, converted(tokens).logits
    assert logits.dtype == expected
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["int8", torch.int64, "float8"])
def test_a_vanilla_model_refuses_a_dtype_the_attnres_model_refuses(dtype):
    """A dtype no model of the package has is refused for ``"vanilla"`` with the
    config's message (the one check of dtypes, `HookedAttnResConfig`), naming the
    supported ones."""
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    tok = task_tokenizer(KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6))
    shape = dict(d_model=32, n_layers=2, n_heads=2, dtype=dtype)
    for kind in ("attnres", "vanilla"):
        with pytest.raises(ValueError, match=r"dtype .* is not supported; use one of \[.*bfloat16"):
            build_model(kind, 0, tok, shape)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_a_vanilla_model_is_built_on_the_shapes_device_as_the_attnres_one_is(device):
    """``device`` says where the model lives, not what it computes: the AttnRes model of a
    ``shape`` honours it, and so does the vanilla one now (it was refused as a field the
    vanilla model "would ignore"). Every parameter and buffer is on that device, and on
    the CPU the weights equal those built without ``device`` (the seed's)."""
    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

    tok = task_tokenizer(KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6))
    base = dict(d_model=32, n_layers=2, n_heads=2)
    expected = torch.device(device)
    attnres = build_model("attnres", 0, tok, {**base, "device": device}, 1)
    vanilla = build_model("vanilla", 0, tok, {**base, "device": device})
    for model in (attnres, vanilla):
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and {t.device for t in tensors} == {expected}
    if expected.type == "cpu":
        plain = build_model("vanilla", 0, tok, base).state_dict()
        on_device = vanilla.state_dict()
        assert plain.keys() == on_device.keys()
        assert all(torch.equal(plain[k], on_device[k]) for k in plain)


def test_a_folder_of_yours_named_like_the_kept_tables_is_refused_before_any_work(
    tmp_path, monkeypatch
):
    """Audit finding: the study keeps finished models in the sibling ``{out}.partial`` and
    removed that folder with ``shutil.rmtree`` when done, so a folder of yours named
    ``results.partial`` was deleted with everything in it by ``run_study("results")``. It
    is refused now, before any model is loaded, and the files are kept."""
    import hooked_attnres.study.run as study_module

    calls = []
    monkeypatch.setattr(study_module, "load_condition", lambda *a, **k: calls.append(a))
    out = tmp_path / "results"
    mine = study_module.partial_dir(out)
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    (mine / "vanilla_seed0.pkl").write_bytes(b"")  # a kept run's name: the study's own
    # not a name the study writes (run_dir writes seed 1 as "seed1"): a review found it
    # taken for the study's own, and deleted at the end
    (mine / "vanilla_seed01.pkl").write_bytes(b"")
    with pytest.raises(
        FileExistsError,
        match=r"results\.partial.*holds files the study did not "
        r"write \(thesis\.tex, vanilla_seed01\.pkl\)",
    ):
        run_study(out, conditions=("vanilla",), progress=False, plots=False)
    assert not calls and (mine / "thesis.tex").read_text() == "keep me"
    (tmp_path / "other").mkdir()
    (tmp_path / "other.partial").write_text("a file of yours")  # a file there: refused too
    with pytest.raises(FileExistsError, match=r"other\.partial for .* it is a file"):
        run_study(tmp_path / "other", conditions=("vanilla",), progress=False, plots=False)
    assert not calls and (tmp_path / "other.partial").read_text() == "a file of yours"


# the smallest study the job-lock tests run: 6 prompts, 5 resamples, no figures or robustness
_QUICK_STUDY = dict(n_prompts=6, n_bootstrap=5, progress=False, plots=False, robustness=False)


def test_the_kept_tables_are_removed_but_files_put_there_during_the_study_are_kept(
    tmp_path, monkeypatch
):
    """What the study removes when it is done: its own kept runs only, if something else
    was put into ``{out}.partial`` while it ran."""
    import hooked_attnres.study.run as study_module

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0,))
    out = tmp_path / "out"
    kept = study_module.partial_dir(out)
    real = study_module._write_partial

    def write_then_add(partial, *args):
        real(partial, *args)
        (partial / "notes.txt").write_text("mine")

    monkeypatch.setattr(study_module, "_write_partial", write_then_add)
    run_study(out, checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    assert (out / "report.md").is_file()
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_study_of_other_models_keeps_an_interrupted_studys_finished_models(
    tmp_path, monkeypatch, capsys
):
    """Audit finding: a study into an ``out_dir`` deleted, when it finished, the whole
    ``{out}.partial``: the kept runs of an earlier study of other conditions into the same
    folder, interrupted, were lost, and running that study again recomputed them. Its own
    kept runs are removed, the other study's stay (and are said to), and that study then
    resumes from them; the folder goes once it is empty."""
    import hooked_attnres.study.run as study_module

    first, other = "hard_kimi_L8", "induction_kimi_L8"
    tiny_study_runs(tmp_path / "runs", first, (0, 1))
    tiny_study_runs(tmp_path / "runs", other, (0,))
    kwargs = dict(
        checkpoints=tmp_path / "runs",
        n_prompts=6,
        n_bootstrap=5,
        plots=False,
        robustness=False,
    )
    runs = _CountedRuns(monkeypatch)
    out = tmp_path / "out"
    kept = study_module.partial_dir(out)
    runs.arm(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(out, conditions=[first], progress=False, **kwargs)
    assert [p.name for p in kept.iterdir()] == [f"{first}_seed0.pkl"]
    saved = (kept / f"{first}_seed0.pkl").read_bytes()
    runs.arm()
    capsys.readouterr()
    run_study(out, conditions=[other], progress=True, **kwargs)
    assert runs.calls == [(other, 0)] and (out / "report.md").is_file()
    assert [p.name for p in kept.iterdir()] == [f"{first}_seed0.pkl"]
    assert (kept / f"{first}_seed0.pkl").read_bytes() == saved
    printed = capsys.readouterr().out
    assert f"{kept} still keeps 1 finished model(s) of another study" in printed
    assert f"({first}_seed0.pkl): run that study again" in printed
    runs.arm()
    run_study(out, conditions=[first], progress=False, **kwargs)
    assert runs.calls == [(first, 1)]  # seed 0 resumed from the kept run
    assert not kept.exists()


def test_a_second_study_into_the_same_folder_is_refused(tmp_path, monkeypatch):
    """Audit finding: two studies into one ``out_dir`` share the kept tables in
    ``{out}.partial``, which the first one to finish deletes: the other then failed with
    ``FileNotFoundError`` writing its next finished model's tables (its work lost). A second
    study is refused now, before any work, naming the process that holds the folder."""
    import hooked_attnres.study.run as study_module
    from hooked_attnres._atomic import DirectoryBusyError

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0,))
    kwargs = dict(checkpoints=tmp_path / "runs", **_QUICK_STUDY)
    out = tmp_path / "out"
    real = study_module.write_bytes_atomic
    second = []

    def second_study_meanwhile(path, data):
        if not second:
            second.append(True)
            with pytest.raises(
                DirectoryBusyError,
                match=r"out\.partial is being written by another study "
                r"\(process \d+\)",
            ):
                run_study(out, **kwargs)
        real(path, data)

    monkeypatch.setattr(study_module, "write_bytes_atomic", second_study_meanwhile)
    run_study(out, **kwargs)
    assert second and (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]


def test_the_bootstrap_seed_is_a_setting_recorded_with_the_run(tmp_path):
    """The study's intervals were drawn with a bootstrap seed that run_study neither took
    nor recorded (study_condition's default 0): run.json could not say how to redraw them,
    and checking that a verdict does not hang on one bootstrap draw needed a copy of the
    study loop. Point estimates do not depend on it; intervals equal an independent
    percentile bootstrap over prompts with that seed."""
    import numpy as np

    kwargs = dict(
        conditions="vanilla",
        n_prompts=8,
        n_bootstrap=40,
        progress=False,
        plots=False,
        robustness=False,
    )
    first = run_study(tmp_path / "a", **kwargs)
    other = run_study(tmp_path / "b", bootstrap_seed=7, **kwargs)
    assert first.settings["bootstrap_seed"] == 0 and other.settings["bootstrap_seed"] == 7
    assert json.loads((tmp_path / "b" / "run.json").read_text())["bootstrap_seed"] == 7
    pd.testing.assert_series_equal(first.effects.effect, other.effects.effect)
    pd.testing.assert_series_equal(first.mass_summary.mass, other.mass_summary.mass)
    assert not np.allclose(first.effects.ci_low, other.effects.ci_low)
    for result, seed in ((first, 0), (other, 7)):
        mass = result.mass.groupby(["router", "family", "prompt"]).mass.mean()  # all layers
        summary = result.mass_summary[result.mass_summary.band == "all"]
        for row in summary.itertuples():
            values = mass.loc[(row.router, row.family)].sort_index().to_numpy()
            draws = np.random.default_rng(seed).integers(0, len(values), (40, len(values)))
            low, high = np.quantile(values[draws].mean(axis=1), [0.025, 0.975])
            assert (row.ci_low, row.ci_high) == pytest.approx((low, high), abs=1e-12)
    with pytest.raises(ValueError, match="^bootstrap_seed must be an integer >= 0, got -1"):
        run_study(tmp_path / "c", bootstrap_seed=-1, **kwargs)


def test_the_shipped_report_records_the_settings_a_default_study_records():
    """README: the main job's report.md equals docs/results/shipped_report.md but for the
    time. The bootstrap seed became a recorded setting (audit 47), so a default run's
    "Settings and versions" block had a ``"bootstrap_seed": 0`` line the shipped report
    lacked. The block's keys (in order) and the study's settings are compared with what
    `run_study`'s defaults record; versions, threads and time are the machine's."""
    import inspect

    from hooked_attnres.study.run import _RunSettings, _settings

    text = (Path(__file__).resolve().parents[1] / "docs/results/shipped_report.md").read_text()
    block = text.split("## Settings and versions", 1)[1].split("```json\n", 1)[1]
    shipped = json.loads(block.split("\n```", 1)[0])
    default = {k: p.default for k, p in inspect.signature(run_study).parameters.items()}
    settings = _RunSettings(
        None,
        default["n_prompts"],
        default["n_bootstrap"],
        default["robustness"],
        default["bootstrap_seed"],
    )
    recorded = {**_settings(settings, find_runs(None, None, None)), "seconds": 0.0}
    assert list(recorded) == list(shipped)
    assert list(recorded["versions"]) == list(shipped["versions"])
    for key in set(recorded) - {"versions", "threads", "seconds"}:
        assert recorded[key] == shipped[key], key


def test_study_condition_refuses_a_progress_flag_before_the_forward_pass():
    """Audit 81: `study_condition` passed ``progress`` on to `ablation_effects`, which
    checks it (`require_bool`) only after the forward pass, the routing mass and the mass
    summaries had run; now it is refused first, as every other argument."""
    from helpers import tiny_model

    from hooked_attnres.study.run import study_condition

    model = tiny_model(attnres_layout="kimi").eval()
    batch = _random_batch(4)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(TypeError, match="^progress must be True or False, got 'no'$"):
        study_condition(model, batch, n_bootstrap=10, progress="no")
    # audit 116: past MAX_BOOTSTRAP, refused before the forward pass, not in the bootstrap
    with pytest.raises(ValueError, match=r"^n_bootstrap must be an integer <= 100000 \("):
        study_condition(model, batch, n_bootstrap=10**12, progress=False)
    assert not calls  # no forward pass ran


def test_study_condition_refuses_a_batch_that_is_no_task_batch():
    """Audit 127: ``study_condition(model, batch.tokens)`` failed with "'Tensor' object has
    no attribute 'tokens'", ``[batch]`` was refused as "batch holds 1 prompt" and ``None``
    as "object of type 'NoneType' has no len()". Refused naming what it takes."""
    from helpers import tiny_model

    from hooked_attnres.study.run import study_condition

    model = tiny_model(attnres_layout="kimi").eval()
    batch = _random_batch(4)
    for bad in (batch.tokens, [batch], None):
        with pytest.raises(
            TypeError,
            match=rf"^batch must be a TaskBatch \(probe prompts, .*got {type(bad).__name__}",
        ):
            study_condition(model, bad, progress=False)


def _random_batch(n: int, seed: int = 0):
    """``n`` prompts of 8 random tokens below 50 (a tiny model's vocabulary), answer at the
    last position."""
    from hooked_attnres.tasks.base import TaskBatch

    generator = torch.Generator().manual_seed(seed)
    return TaskBatch(
        tokens=torch.randint(0, 50, (n, 8), generator=generator),
        answer_pos=torch.full((n,), 7),
        answer=torch.arange(1, n + 1),
        contrast=torch.arange(11, n + 11),
        corrupted_tokens=torch.randint(0, 50, (n, 8), generator=generator),
        targets=torch.full((n, 8), -100),
    )


def _not_finite_at(model: HookedAttnRes, prompts: list[int], answer_pos: Optional[int] = None):
    """Make the logits of a whole-sequence pass NaN at ``prompts``: at ``answer_pos`` only,
    and +inf at the earlier positions of ``prompts[-1]`` (which no metric reads), or
    everywhere (``answer_pos`` None). A forward hook on the unembedding (its handle)."""

    def hook(module, args, out):
        out = out.clone()
        if out.shape[1] == 1:  # the fast sweep's pass at the answer positions only
            return out
        if answer_pos is None:
            out[prompts] = float("nan")
        else:
            out[prompts, answer_pos] = float("nan")
            out[prompts[-1], :answer_pos] = float("inf")
        return out

    return model.unembed.register_forward_hook(hook)


def test_study_condition_refuses_logits_that_are_not_finite_before_the_sweep(monkeypatch):
    """Audit 95: clean logits that were NaN at some prompts' answer positions (a float16
    overflow) gave NaN effects and intervals for every cell, refused by
    `dissociation_report` only after the mass tables and the whole ablation sweep, naming
    no model; refused now after the clean forward pass, counting the prompts (here 2 of 6;
    a non-finite logit at a position no metric reads is not counted)."""
    from helpers import tiny_model

    import hooked_attnres.study.run as study_module

    model = tiny_model(attnres_layout="kimi").eval()
    for name in ("routing_mass", "summarize_mass", "ablation_effects"):
        monkeypatch.setattr(study_module, name, lambda *a, _name=name, **k: pytest.fail(_name))
    handle = _not_finite_at(model, [3, 1], answer_pos=7)
    with pytest.raises(
        ValueError,
        match=r"^the clean logits of the model are not finite at the answer position of 2 of 6 "
        r"probe prompts \(first: prompt 1, whose logit_diff is nan\)",
    ):
        study_module.study_condition(model, _random_batch(6), n_bootstrap=50, progress=False)
    handle.remove()


def test_a_study_names_the_model_whose_logits_are_not_finite(tmp_path, monkeypatch):
    """Audit 95: `run_study` refuses such a model before its sweep, naming its condition
    and seed (the refusal named neither, after the sweep)."""
    import hooked_attnres.study.run as study_module

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0, 1), n_layers=4, num_blocks=2)
    load = study_module.load_condition

    def load_then_overflow(condition: str, seed: int, *args, **kwargs):
        model = load(condition, seed, *args, **kwargs)
        if seed == 1:
            _not_finite_at(model, [0, 2, 5])
        return model

    monkeypatch.setattr(study_module, "load_condition", load_then_overflow)
    sweep = study_module.ablation_effects
    swept = []
    monkeypatch.setattr(
        study_module,
        "ablation_effects",
        lambda model, *a, **k: swept.append(model._study_seed) or sweep(model, *a, **k),
    )
    with pytest.raises(
        ValueError,
        match=r"^the clean logits of the model of condition 'hard_kimi_L8' seed 1 are not "
        r"finite at the answer position of 3 of 6 probe prompts \(first: prompt 0,",
    ):
        run_study(tmp_path / "out", tmp_path / "runs", **_QUICK_STUDY)
    assert swept == [0]  # seed 0's sweep ran, seed 1's did not


def test_the_recency_bias_is_recorded_only_for_a_study_that_wraps_a_vanilla_model(tmp_path):
    """Audit 95: ``run.json`` (and the report's settings) recorded ``"recency_bias": 3.0``
    for a study of trained Block AttnRes models only, where no model is read through the
    recency wrap (it read as those models' bias); ``None`` there now, as
    ``fresh_probe_seed`` is without the robustness check. A study with a vanilla condition
    records the bias it wrapped that model with, and the report names it."""
    from hooked_attnres.study.report import model_text
    from hooked_attnres.study.run import RECENCY_BIAS, _RunSettings, _settings

    condition = "hard_kimi_L8"
    tiny_study_runs(tmp_path / "runs", condition, (0,), n_layers=4, num_blocks=2)
    run_study(tmp_path / "out", tmp_path / "runs", **_QUICK_STUDY)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["recency_bias"] is None
    assert '"recency_bias": null' in (tmp_path / "out" / "report.md").read_text()
    settings = _RunSettings(None, 6, 5, False)
    for runs, bias in (
        ([(condition, 0), ("hard_cumulative_L8", 1)], None),
        ([(condition, 0), ("hard_vanilla_L8", 0)], RECENCY_BIAS),
        ([("vanilla", 0)], RECENCY_BIAS),
    ):
        assert _settings(settings, runs)["recency_bias"] == bias, runs
    vanilla = get_condition("hard_vanilla_L8")
    assert vanilla.kind == "vanilla"
    with pytest.raises(ValueError, match="settings record no recency_bias"):
        model_text(vanilla.name, None)


def test_the_study_report_refuses_model_labels_mixing_text_and_numbers(tmp_path):
    """Audit 121: a schedule table whose seed mixed 0 and '0' (one part read back from a
    CSV) was counted as two seeds: "... prompts and 2 seed(s); the claim holds" of one
    seed's rows (the table with seed 0 twice: "1 seed(s)"). The report's readers refuse a
    condition or seed column that mixes text and numbers (`require_keys`), naming it."""
    from hooked_attnres.study.report import _schedule_sentences
    from hooked_attnres.study.run import StudyResult

    empty = pd.DataFrame()

    def sentence(seeds):
        schedule = pd.DataFrame({"condition": "vanilla", "seed": seeds, "max_abs_deviation": 1e-7})
        result = StudyResult(tmp_path, empty, empty, empty, empty, empty, schedule, empty)
        return _schedule_sentences(result)[0]

    assert "and 1 seed(s)" in sentence([0, 0])
    with pytest.raises(ValueError, match=r"schedule table's column 'seed' mixes text and"):
        sentence(pd.Series([0, "0"], dtype=object))


def test_the_report_functions_refuse_what_is_no_study_result():
    """Audit 138: a table (``result.accuracy``) or an output folder passed where a
    `StudyResult` goes failed with "'DataFrame' object has no attribute 'settings'" or
    "'str' object has no attribute 'accuracy'"."""
    import pandas as pd

    from hooked_attnres.study import (
        accuracy_table,
        study_figures,
        study_report,
        study_report_html,
        verdict_sentences,
    )

    for fn in (accuracy_table, study_figures, study_report, study_report_html, verdict_sentences):
        for bad in (pd.DataFrame({"accuracy": [1.0]}), "study_out"):
            with pytest.raises(
                TypeError,
                match=rf"^{fn.__name__} takes the StudyResult that run_study\(...\) returns, "
                f"got the {type(bad).__name__}",
            ):
                fn(bad)
    # review of audit 138: the message said "(or write_study's)", which reads as the path
    # write_study returns, the very thing refused
    folder = Path("study_out")
    with pytest.raises(
        TypeError, match=rf"^study_report takes .*got the {type(folder).__name__}"
    ) as caught:
        study_report(folder)
    assert "write_study's" not in str(caught.value)
    assert "a study folder (the path write_study returns) is no StudyResult" in str(caught.value)


def test_the_report_defines_accuracy_in_the_words_of_the_shipped_report(shipped_study):
    """Audit 184 made an answer tied for the largest logit score 1/k (argmax had scored it
    1 or 0 by token id); the report's definition of accuracy says so, and
    docs/results/shipped_report.md holds the same paragraph (the main job's report.md must
    equal it but for the seconds line; no shipped model has such a tie in float32)."""
    out, _ = shipped_study
    shipped = (Path(__file__).resolve().parents[1] / "docs/results/shipped_report.md").read_text()
    written = _line_starting("Each row scores", (out / "report.md").read_text())
    assert written == _line_starting("Each row scores", shipped)
    assert "tied with k - 1 other tokens for the largest scores 1/k" in written
