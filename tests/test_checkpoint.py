"""Checkpoints in this package's own format: round trips, atomic writes, clear errors."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import (
    build_word_tokenizer,
    emulate_ascii_locale,
    hf_qwen3,
    randomize_routing,
    tiny_model,
    unseal,
)

import hooked_attnres.loading.own_format as own_format_module
from hooked_attnres import CheckpointError, HookedAttnRes, HookedAttnResConfig
from hooked_attnres._atomic import MARKER, backups_of, read_marker, recover

TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def scrambled_model(seed: int = 0, **overrides) -> HookedAttnRes:
    """A tiny model in which every parameter (norm gains and biases too) is random, so a
    parameter that is dropped, swapped or re-initialised on load changes the logits."""
    model = randomize_routing(tiny_model(**overrides), seed=seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            param.add_(0.1 * noise)
    return model


def assert_same_model(loaded: HookedAttnRes, original: HookedAttnRes) -> None:
    expected = original.state_dict()
    found = loaded.state_dict()
    assert list(found) == list(expected)
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype, name
        assert found[name].device.type == "cpu", name
        assert torch.equal(found[name], tensor), name
    assert loaded.cfg == original.cfg
    assert torch.equal(loaded(TOKENS), original(TOKENS))


def rewrite_config(directory: Path, **changes) -> None:
    """Edit a saved ``config.json`` as another tool would write it (`unseal`)."""
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
    unseal(directory)


def rewrite_weights(directory: Path, edit) -> None:
    """Edit a saved ``model.safetensors`` as another tool would write it (`unseal`)."""
    path = directory / "model.safetensors"
    state = safetensors.torch.load_file(str(path))
    edit(state)
    safetensors.torch.save_file(state, str(path))
    unseal(directory)


@pytest.fixture
def saved(tmp_path):
    """(directory, model) of a saved tiny cumulative model with untied embeddings."""
    model = scrambled_model()
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory)
    return directory, model


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bitwise(tmp_path, layout, tied):
    model = scrambled_model(attnres_layout=layout, tie_word_embeddings=tied)
    returned = model.save_pretrained(tmp_path / "ckpt")
    assert Path(returned) == tmp_path / "ckpt"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        MARKER,  # the completion marker, written last
        "config.json",
        "model.safetensors",
    ]
    marker = read_marker(tmp_path / "ckpt")
    assert marker["sequence"] == 1
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    loaded = HookedAttnRes.from_pretrained(str(tmp_path / "ckpt"))
    assert isinstance(loaded, HookedAttnRes)
    assert loaded.cfg.attnres_layout == layout
    assert loaded.cfg.tie_word_embeddings is tied
    assert_same_model(loaded, model)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attnres_mode="full"),
        dict(attnres_recency_bias=None),
        dict(attnres_num_blocks=4, n_layers=4),
        dict(n_key_value_heads=4, d_head=6, rotary_base=10_000.0, eps=1e-5, model_name="x"),
    ],
    ids=["cumulative-full-mode", "no-recency-bias", "one-layer-blocks", "other-fields"],
)
def test_round_trip_other_configs(tmp_path, overrides):
    model = scrambled_model(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    assert_same_model(HookedAttnRes.from_pretrained(tmp_path / "ckpt"), model)


def test_tied_checkpoint_stores_no_unembedding(tmp_path):
    tied = scrambled_model(tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    keys = set(safetensors.torch.load_file(str(tmp_path / "tied" / "model.safetensors")))
    assert "unembed.W_U" not in keys and "embed.W_E" in keys
    loaded = HookedAttnRes.from_pretrained(tmp_path / "tied")
    assert torch.equal(loaded.W_U, loaded.W_E.T)
    with torch.no_grad():  # still tied after loading: editing W_E moves the logits' W_U
        loaded.embed.W_E[3].mul_(2)
    assert torch.equal(loaded.W_U[:, 3], loaded.embed.W_E[3])

    untied = scrambled_model()
    untied.save_pretrained(tmp_path / "untied")
    keys = set(safetensors.torch.load_file(str(tmp_path / "untied" / "model.safetensors")))
    assert "unembed.W_U" in keys


def test_config_json_contents(saved):
    directory, model = saved
    values = json.loads((directory / "config.json").read_text())
    assert values["model_type"] == "hooked_attnres"
    assert values["format_version"] == 1
    assert "device" not in values
    assert values["d_model"] == 32 and values["n_layers"] == 4 and values["d_vocab"] == 50
    assert values["attnres_layout"] == "cumulative" and values["attnres_num_blocks"] == 2
    assert values["dtype"] == "float32"
    # one dtype: nothing else recorded, so the file is what earlier versions wrote
    assert "parameter_dtypes" not in values


def test_bfloat16_round_trip_keeps_dtype(tmp_path):
    model = scrambled_model(dtype=torch.bfloat16)
    assert model.embed.W_E.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert_same_model(loaded, model)


def mixed_model(make: str) -> tuple[HookedAttnRes, dict[str, torch.dtype]]:
    """A model whose parameters have two dtypes, and the odd ones out ``{name: dtype}``:
    ``"bf16-routers"``, a bfloat16 model whose routers (pseudo-queries, key-norm gains,
    recency biases) are float32, as users keep them; ``"tied"``, the same with tied
    embeddings; ``"f32-f64"``, a float32 model with float64 routers.
    The odd ones hold values their model's dtype cannot (rounding them shows)."""
    if make == "f32-f64":
        model = scrambled_model()
        odd = {name: torch.float64 for name, _ in model.named_parameters() if "_res." in name}
    else:
        model = scrambled_model(dtype=torch.bfloat16, tie_word_embeddings=make == "tied")
        odd = {name: torch.float32 for name, _ in model.named_parameters() if "_res." in name}
    generator = torch.Generator().manual_seed(7)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dtype in odd.items():
            noise = torch.randn(params[name].shape, generator=generator, dtype=dtype)
            params[name].data = params[name].data.to(dtype) + 1e-3 * noise
    assert {name for name, p in model.named_parameters() if p.dtype != model.cfg.dtype} == set(odd)
    return model, odd


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mapped"])
@pytest.mark.parametrize("make", ["bf16-routers", "tied", "f32-f64"])
def test_a_model_of_mixed_dtypes_round_trips_bitwise(tmp_path, make, mmap):
    """A model whose parameters have two dtypes saved, but loading it was refused until
    ``dtype=`` cast everything to one (``tensor blocks.0.attn_res.query has dtype F32 but
    config.json says bfloat16``). ``config.json`` now records the parameters whose dtype
    is not ``dtype`` (``parameter_dtypes``), and every parameter comes back in its saved
    dtype with the same bits, without ``dtype=``."""
    model, odd = mixed_model(make)
    model.save_pretrained(tmp_path / "ckpt")
    values = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert values["parameter_dtypes"] == {k: str(v).removeprefix("torch.") for k, v in odd.items()}
    stored = safetensors.torch.load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {k for k, t in stored.items() if t.dtype != model.cfg.dtype} == set(odd)
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt", mmap=mmap)
    assert_same_model(loaded, model)  # every parameter's dtype and bits, the cfg, the logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_model_of_mixed_dtypes_loaded_with_dtype_is_cast_whole(tmp_path, dtype):
    """``dtype=`` still converts every parameter, the recorded odd ones too."""
    model, _ = mixed_model("bf16-routers")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt", dtype=dtype)
    assert loaded.cfg.dtype == dtype
    found = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert found[name].dtype == dtype and torch.equal(found[name], tensor.to(dtype)), name


@pytest.mark.parametrize(
    "record, message",
    [
        # the record says float64, the file holds float32
        ({"blocks.0.attn_res.query": "float64"}, "has dtype F32 but config.json says float64"),
        ({"blocks.9.attn_res.query": "float32"}, r"names parameters .*blocks\.9\.attn_res"),
        ({"blocks.0.attn_res.query": "int8"}, r"parameter_dtypes.*'int8' is not supported"),
        (["blocks.0.attn_res.query"], "parameter_dtypes must map parameter names to dtype"),
        ({}, "has dtype F32 but config.json says bfloat16; pass dtype="),  # record removed
    ],
    ids=["wrong-dtype", "unknown-name", "bad-dtype", "not-a-dict", "dropped"],
)
def test_a_dtype_record_that_does_not_match_the_weights_is_refused(tmp_path, record, message):
    """The record is checked against the file's tensors before any is read: a tensor whose
    dtype is neither ``dtype`` nor the one recorded for it is refused as before."""
    model, _ = mixed_model("bf16-routers")
    model.save_pretrained(tmp_path / "ckpt")
    values = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    if record == {}:  # as a writer that does not record dtypes would leave it
        values.pop("parameter_dtypes")
    elif isinstance(record, dict):
        values["parameter_dtypes"].update(record)
    else:
        values["parameter_dtypes"] = record
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(values))
    unseal(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        HookedAttnRes.from_pretrained(tmp_path / "ckpt")


def test_the_shipped_checkpoints_load_as_stored():
    """Every shipped checkpoint in this package's format loads as before the dtype record:
    one dtype (float32), every parameter bitwise the file's tensor, and no record."""
    from hooked_attnres.study import SHIPPED

    directories = sorted(p.parent for p in SHIPPED.glob("*/model/config.json"))
    ours = [
        d
        for d in directories
        if json.loads((d / "config.json").read_text())["model_type"] == "hooked_attnres"
    ]
    assert len(ours) >= 10
    for directory in ours:
        assert "parameter_dtypes" not in json.loads((directory / "config.json").read_text())
        stored = safetensors.torch.load_file(str(directory / "model.safetensors"))
        found = HookedAttnRes.from_pretrained(directory).state_dict()
        assert found.keys() == stored.keys(), directory
        for name, tensor in stored.items():
            assert found[name].dtype == tensor.dtype == torch.float32, (directory, name)
            assert torch.equal(found[name], tensor), (directory, name)


@pytest.mark.parametrize("dtype", [torch.float64, "float64", "torch.float64"])
def test_load_with_dtype_override(saved, dtype):
    directory, model = saved
    loaded = HookedAttnRes.from_pretrained(directory, dtype=dtype)
    assert loaded.cfg.dtype == torch.float64
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float64, name
        assert torch.equal(tensor, original[name].double()), name
    # the override does not touch the checkpoint
    assert HookedAttnRes.from_pretrained(directory).cfg.dtype == torch.float32


def test_load_with_float16_override_runs(saved):
    directory, model = saved
    loaded = HookedAttnRes.from_pretrained(directory, dtype=torch.float16)
    assert loaded.cfg.dtype == torch.float16
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half()), name
    logits = loaded(TOKENS)
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), model(TOKENS), atol=2e-2, rtol=2e-2)


def test_load_bfloat16_checkpoint_as_float32(tmp_path):
    model = scrambled_model(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.cfg.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_load_with_device_cpu(saved):
    directory, model = saved
    loaded = HookedAttnRes.from_pretrained(directory, device="cpu")
    assert loaded.cfg.device == "cpu"
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())
    loaded = HookedAttnRes.from_pretrained(directory, device=torch.device("cpu"), dtype="float32")
    assert_same_model(loaded, model)


def test_invalid_dtype_override_is_refused(saved):
    directory, _ = saved
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        HookedAttnRes.from_pretrained(directory, dtype="int8")


def test_tokenizer_round_trip(tmp_path):
    words = [f"w{i}" for i in range(30)]
    model = scrambled_model()
    model.set_tokenizer(build_word_tokenizer(words))
    text = "w3 w17 w0 w29 w3"
    before = model.to_tokens(text)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer is not None
    assert len(loaded.tokenizer) == 33
    after = loaded.to_tokens(text)
    assert after.tolist() == before.tolist() == [[6, 20, 3, 32, 6]]
    assert loaded.to_str_tokens(text) == text.split()
    assert loaded.to_tokens("w1", prepend_bos=True).tolist() == [[2, 4]]
    assert torch.equal(loaded(text), model(text))


def test_no_tokenizer_loads_as_none(saved):
    directory, _ = saved
    assert HookedAttnRes.from_pretrained(directory).tokenizer is None


# --- atomic writes -----------------------------------------------------------------------


def failing_save_file(state, filename, metadata=None):
    """Write half of a valid safetensors file, then fail (a full disk, a kill)."""
    data = safetensors.torch.save(state, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError("simulated failure while writing the weights")


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path, monkeypatch):
    old = scrambled_model(seed=0)
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    files_before = {p.name: p.read_bytes() for p in target.iterdir()}

    new = scrambled_model(seed=1)
    monkeypatch.setattr(own_format_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated failure"):
        new.save_pretrained(target)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files_before
    assert_same_model(HookedAttnRes.from_pretrained(target), old)


def test_failed_save_to_fresh_target_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(own_format_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated failure"):
        scrambled_model().save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        HookedAttnRes.from_pretrained(tmp_path / "ckpt")


def test_failure_after_weights_are_written_also_rolls_back(tmp_path, monkeypatch):
    """A failure in the last step (saving the tokenizer) must not leave a checkpoint
    with new weights and no tokenizer."""
    old = scrambled_model(seed=0)
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    new = scrambled_model(seed=1)
    tokenizer = build_word_tokenizer(["a", "b"])
    new.set_tokenizer(tokenizer)

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer save failed")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="tokenizer save failed"):
        new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == [
        MARKER,
        "config.json",
        "model.safetensors",
    ]
    assert_same_model(HookedAttnRes.from_pretrained(target), old)


def test_save_replaces_existing_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    scrambled_model(seed=0).save_pretrained(target)
    new = scrambled_model(seed=1, attnres_layout="kimi")
    new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_same_model(HookedAttnRes.from_pretrained(target), new)


def test_stale_tokenizer_files_do_not_survive_a_replace(tmp_path):
    target = tmp_path / "ckpt"
    with_tok = scrambled_model()
    with_tok.set_tokenizer(build_word_tokenizer(["a", "b"]))
    with_tok.save_pretrained(target)
    scrambled_model(seed=1).save_pretrained(target)
    assert HookedAttnRes.from_pretrained(target).tokenizer is None


def test_save_into_empty_directory(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    model = scrambled_model()
    model.save_pretrained(target)
    assert_same_model(HookedAttnRes.from_pretrained(target), model)


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "important.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="holds files this library did not write"):
        scrambled_model().save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["important.txt"]
    assert (target / "important.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_refuses_to_overwrite_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="a file is there"):
        scrambled_model().save_pretrained(target)
    assert target.read_text() == "x"


def crash_between_renames(target: Path) -> Path:
    """State after a crash between ``rename(target, backup)`` and ``rename(tmp, target)``."""
    backup = target.parent / f".{target.name}.old-deadbeef"
    os.rename(target, backup)
    tmp = target.parent / f".{target.name}.tmp-cafef00d"  # the half-finished new version
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    return backup


def test_recover_moves_backup_back(tmp_path):
    target = tmp_path / "ckpt"
    scrambled_model().save_pretrained(target)
    backup = crash_between_renames(target)
    assert not target.exists()
    assert backups_of(target) == [backup, tmp_path / ".ckpt.tmp-cafef00d"]
    assert recover(target) is True
    assert target.is_dir() and not backup.exists()
    assert backups_of(target) == []
    assert recover(target) is False  # nothing to do once the target exists


def test_recover_without_backup_does_nothing(tmp_path):
    assert recover(tmp_path / "missing") is False
    assert not (tmp_path / "missing").exists()


def test_from_pretrained_recovers_after_crash_between_renames(tmp_path):
    target = tmp_path / "ckpt"
    old = scrambled_model()
    old.save_pretrained(target)
    crash_between_renames(target)
    loaded = HookedAttnRes.from_pretrained(target)
    assert_same_model(loaded, old)
    assert target.is_dir() and backups_of(target) == []


def test_next_save_recovers_and_cleans_up_after_crash(tmp_path):
    target = tmp_path / "ckpt"
    scrambled_model(seed=0).save_pretrained(target)
    crash_between_renames(target)
    new = scrambled_model(seed=1)
    new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # backup and tmp removed
    assert_same_model(HookedAttnRes.from_pretrained(target), new)


def test_the_leftovers_of_a_checkpoint_named_like_a_leftover_are_not_taken_for_ours(tmp_path):
    """Audit finding: leftovers were found by name prefix, so ``.a.old-b.old-<id>`` (what a
    kill leaves of a save to a checkpoint named ``a.old-b``) counted as a leftover of ``a``:
    complete and newer, it was installed as ``a``, and loading ``a`` gave the other
    checkpoint's model without a word."""
    mine, other = scrambled_model(seed=0), scrambled_model(seed=1)
    mine.save_pretrained(tmp_path / "a")  # sequence 1
    for _ in range(2):
        other.save_pretrained(tmp_path / "a.old-b")  # sequence 2
    # a kill between the two renames of the next save to "a.old-b": its old version aside
    os.rename(tmp_path / "a.old-b", tmp_path / ".a.old-b.old-0123abcd")
    assert backups_of(tmp_path / "a") == []
    assert_same_model(HookedAttnRes.from_pretrained(tmp_path / "a"), mine)
    assert_same_model(HookedAttnRes.from_pretrained(tmp_path / "a.old-b"), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.old-b"]


def test_a_file_write_removes_its_own_stale_temporaries_only(tmp_path):
    """The temporaries a killed `write_text_atomic` left are removed by the next write of
    that file, and nothing else: not a file of yours that starts like one, nor the
    temporary of another file."""
    from hooked_attnres._atomic import write_text_atomic

    stale = tmp_path / ".metrics.json.partial-0123abcd"  # a killed write of metrics.json
    yours = [tmp_path / ".metrics.json.partial-notes", tmp_path / ".metrics.json.partial-x.txt"]
    for path in [stale, *yours]:
        path.write_text("x")
    write_text_atomic(tmp_path / "metrics.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["metrics.json"] + [p.name for p in yours]
    )


def test_save_with_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format must be .*got 'nonsense'"):
        scrambled_model().save_pretrained(tmp_path / "ckpt", format="nonsense")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("format", ["hooked_attnres", "qwen3_attnres"])
def test_saving_what_is_no_hooked_attnres_is_refused_with_what_to_use(tmp_path, format):
    """``save_checkpoint`` of a ``transformers`` model (e.g. the trainer's vanilla model)
    failed with ``AttributeError: 'Qwen3ForCausalLM' object has no attribute 'cfg'``; it is
    refused naming the type and the way to save and load it, before anything is written."""
    from hooked_attnres.loading import save_checkpoint

    with pytest.raises(TypeError, match=r"a HookedAttnRes, got Qwen3ForCausalLM.*save_pretrained"):
        save_checkpoint(hf_qwen3(), tmp_path / "ckpt", format=format)
    with pytest.raises(TypeError, match="a HookedAttnRes, got str"):
        save_checkpoint("model", tmp_path / "ckpt", format=format)
    assert not (tmp_path / "ckpt").exists()


# --- corrupted and mismatched checkpoints ------------------------------------------------


def test_truncated_weights(saved):
    directory, _ = saved
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    unseal(directory)  # (with its marker: tests/test_integrity.py)
    with pytest.raises(CheckpointError, match="file is truncated") as info:
        HookedAttnRes.from_pretrained(directory)
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all" * 10], ids=["empty", "garbage"]
)
def test_weights_that_are_not_safetensors(saved, content):
    directory, _ = saved
    (directory / "model.safetensors").write_bytes(content)
    unseal(directory)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HookedAttnRes.from_pretrained(directory)


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 1048576\n"
)


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres", "hf"])
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_git_lfs_pointer_files_are_named_as_such(tmp_path, fmt, name):
    """Audit finding: a clone without ``git lfs`` leaves small pointer files where the
    weights (and Hugging Face's tokenizer.json) should be; they were refused as "header
    too large" or, for a tokenizer, with a bare ``JSONDecodeError`` from transformers."""
    directory = tmp_path / "ckpt"
    if fmt == "hf":
        hf_qwen3().save_pretrained(directory)
        build_word_tokenizer(["a", "b"]).save_pretrained(directory)
    else:
        model = scrambled_model()
        model.set_tokenizer(build_word_tokenizer(["a", "b"]))
        model.save_pretrained(directory, format=fmt)
    (directory / name).write_text(LFS_POINTER)
    load = (
        (lambda: HookedAttnRes.from_hf_qwen3(directory, wrap="none"))
        if fmt == "hf"
        else (lambda: HookedAttnRes.from_pretrained(directory))
    )
    with pytest.raises(
        CheckpointError, match=re.escape(f"{directory / name} is a Git LFS pointer file")
    ) as info:
        load()
    assert "git lfs pull" in str(info.value)


def test_a_git_lfs_pointer_at_a_shard_index_is_named_as_such(tmp_path):
    """Review finding: a pointer left at a sharded checkpoint's index was refused as "not a
    valid shard index (Expecting value: line 1 column 1 (char 0))"."""
    directory = tmp_path / "ckpt"
    hf_qwen3().save_pretrained(directory, max_shard_size="20KB")
    index = directory / "model.safetensors.index.json"
    index.write_text(LFS_POINTER)
    with pytest.raises(CheckpointError, match=re.escape(f"{index} is a Git LFS pointer file")):
        HookedAttnRes.from_hf_qwen3(directory, wrap="none")


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres", "hf"])
def test_git_lfs_pointer_of_a_file_no_loader_reads_is_ignored(tmp_path, fmt):
    """Review finding: every file of the folder was checked for a Git LFS pointer, so a
    complete checkpoint fetched with ``git lfs pull --include "*.safetensors"`` (the usual
    way to skip a repository's other large files) was refused for a pointer left at a file
    no loader reads (``pytorch_model.bin``, ``training_args.bin``)."""
    directory = tmp_path / "ckpt"
    if fmt == "hf":
        reference = hf_qwen3().eval()
        reference.save_pretrained(directory)
        build_word_tokenizer(["a", "b"]).save_pretrained(directory)
    else:
        model = scrambled_model()
        model.set_tokenizer(build_word_tokenizer(["a", "b"]))
        model.save_pretrained(directory, format=fmt)
    for name in ("pytorch_model.bin", "training_args.bin"):
        (directory / name).write_text(LFS_POINTER)
    tokens = torch.tensor([[1, 2, 3, 0]])
    if fmt == "hf":
        loaded = HookedAttnRes.from_hf_qwen3(directory, wrap="none")
        expected = reference(tokens).logits
    else:
        loaded = HookedAttnRes.from_pretrained(directory)
        expected = model(tokens)
    torch.testing.assert_close(loaded(tokens), expected)
    assert loaded.tokenizer is not None


def test_missing_key(saved):
    directory, _ = saved
    rewrite_weights(directory, lambda state: state.pop("blocks.2.attn.W_Q"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.2\.attn\.W_Q") as info:
        HookedAttnRes.from_pretrained(directory)
    assert "unexpected keys" not in str(info.value)
    assert "mis-shaped keys" not in str(info.value)


def test_unexpected_key(saved):
    directory, _ = saved
    rewrite_weights(directory, lambda state: state.update({"blocks.1.extra_gate": torch.zeros(3)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): blocks\.1\.extra_gate"
    ) as info:
        HookedAttnRes.from_pretrained(directory)
    assert "missing keys" not in str(info.value)


def test_misshaped_key(saved):
    directory, _ = saved
    rewrite_weights(
        directory, lambda state: state.update({"blocks.0.mlp.W_in": torch.zeros(32, 40)})
    )
    with pytest.raises(
        CheckpointError,
        match=re.escape("mis-shaped keys (1): blocks.0.mlp.W_in expected (32, 48) found (32, 40)"),
    ):
        HookedAttnRes.from_pretrained(directory)


def test_missing_unexpected_and_misshaped_are_all_reported(saved):
    directory, _ = saved

    def edit(state):
        state.pop("ln_final.w")
        state["bogus"] = torch.zeros(1)
        state["embed.W_E"] = torch.zeros(51, 32)

    rewrite_weights(directory, edit)
    with pytest.raises(CheckpointError) as info:
        HookedAttnRes.from_pretrained(directory)
    message = str(info.value)
    assert "missing keys (1): ln_final.w" in message
    assert "unexpected keys (1): bogus" in message
    assert "embed.W_E expected (50, 32) found (51, 32)" in message


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, fmt, mmap, value):
    """A NaN or infinite weight used to load silently (every output through it NaN). With
    ``mmap=True`` the weights read into memory are checked (here: converted to bfloat16);
    mapped ones are not, which would page the whole file in (docs/loading.md)."""
    directory = tmp_path / "ckpt"
    scrambled_model().save_pretrained(directory, format=fmt)
    key = "blocks.1.mlp.W_in" if fmt == "hooked_attnres" else "model.layers.1.mlp.up_proj.weight"

    def poison(state):
        state[key].view(-1)[[3, 7]] = value

    rewrite_weights(directory, poison)
    dtype = torch.bfloat16 if mmap else None  # with mmap, a converting load reads into memory
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"has weights with NaN or infinite values: {key} (2 of 1536 elements)"),
    ):
        HookedAttnRes.from_pretrained(directory, mmap=mmap, dtype=dtype)
    if mmap:  # kept dtype: mapped, not scanned (the documented exception)
        model = HookedAttnRes.from_pretrained(directory, mmap=True)
        assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_a_conversion_that_overflows_is_refused_as_an_overflow(saved):
    """float32 weights beyond float16's range became inf under ``dtype=float16``."""
    directory, _ = saved
    rewrite_weights(directory, lambda state: state["blocks.0.ln1.w"].fill_(1e5))
    HookedAttnRes.from_pretrained(directory, dtype=torch.bfloat16)  # in bfloat16's range
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "blocks.0.ln1.w (32 of 32 elements) (finite as stored in float32; it overflows "
            "float16: its largest magnitude is 1e+05)"
        ),
    ):
        HookedAttnRes.from_pretrained(directory, dtype=torch.float16)


def test_config_with_other_d_model_reports_misshaped_keys(saved):
    directory, _ = saved
    rewrite_config(directory, d_model=64)
    with pytest.raises(CheckpointError, match="mis-shaped keys") as info:
        HookedAttnRes.from_pretrained(directory)
    message = str(info.value)
    # every tensor with a d_model axis: W_E, W_U, ln_final + 13 per layer; a long list is cut
    assert "mis-shaped keys (55)" in message
    assert "blocks.0.attn.W_Q expected (4, 64, 8) found (4, 32, 8)" in message
    assert "(35 more)" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_config_with_fewer_layers_reports_unexpected_keys(saved):
    directory, _ = saved
    rewrite_config(directory, n_layers=3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(17\): blocks\.3\.") as info:
        HookedAttnRes.from_pretrained(directory)
    message = str(info.value)
    assert "blocks.3.attn.W_Q" in message and "blocks.3.mlp_res.recency_bias" in message
    assert "blocks.2." not in message and "missing keys" not in message


def test_config_with_other_layout_reports_router_keys(saved):
    directory, _ = saved
    rewrite_config(directory, attnres_layout="kimi")  # kimi adds a final router
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \(3\): final_res\.key_norm\.w, final_res\.query, "
        r"final_res\.recency_bias",
    ):
        HookedAttnRes.from_pretrained(directory)
    rewrite_config(directory, attnres_layout="none")  # no routers at all
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(24\): blocks\.0\.attn_res\.key_norm\.w"
    ):
        HookedAttnRes.from_pretrained(directory)


def test_tied_config_for_untied_weights_reports_unexpected_unembedding(saved):
    directory, _ = saved
    rewrite_config(directory, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): unembed\.W_U"):
        HookedAttnRes.from_pretrained(directory)


def test_missing_config(saved):
    directory, _ = saved
    (directory / "config.json").unlink()
    unseal(directory)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedAttnRes.from_pretrained(directory)


def test_invalid_json(saved):
    directory, _ = saved
    (directory / "config.json").write_text('{"d_model": 32,')
    unseal(directory)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedAttnRes.from_pretrained(directory)


def test_json_that_is_not_an_object(saved):
    directory, _ = saved
    (directory / "config.json").write_text("[1, 2]")
    unseal(directory)
    with pytest.raises(CheckpointError, match="JSON object"):
        HookedAttnRes.from_pretrained(directory)


def test_unknown_model_type(saved):
    directory, _ = saved
    rewrite_config(directory, model_type="gpt_neox")
    with pytest.raises(CheckpointError, match="model_type='gpt_neox'"):
        HookedAttnRes.from_pretrained(directory)


def test_missing_model_type(saved):
    directory, _ = saved
    values = json.loads((directory / "config.json").read_text())
    del values["model_type"]
    (directory / "config.json").write_text(json.dumps(values))
    unseal(directory)
    with pytest.raises(CheckpointError, match="model_type=None"):
        HookedAttnRes.from_pretrained(directory)


def test_vanilla_qwen3_checkpoint_points_to_from_hf_qwen3(tmp_path):
    hf_qwen3().save_pretrained(tmp_path / "qwen3")
    with pytest.raises(CheckpointError, match="vanilla Qwen3.*from_hf_qwen3"):
        HookedAttnRes.from_pretrained(tmp_path / "qwen3")


def test_missing_weights(saved):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    unseal(directory)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HookedAttnRes.from_pretrained(directory)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        HookedAttnRes.from_pretrained(tmp_path / "does-not-exist")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="a checkpoint is a directory"):
        HookedAttnRes.from_pretrained(tmp_path / "model.safetensors")


def test_unknown_config_field(saved):
    directory, _ = saved
    rewrite_config(directory, attnres_num_blcoks=2)
    with pytest.raises(CheckpointError, match="attnres_num_blcoks"):
        HookedAttnRes.from_pretrained(directory)


def test_invalid_config_value(saved):
    directory, _ = saved
    rewrite_config(directory, attnres_layout="diagonal")
    with pytest.raises(CheckpointError, match="not a valid config.*attnres_layout='diagonal'"):
        HookedAttnRes.from_pretrained(directory)


def without_config_fields(directory: Path, *names: str) -> None:
    path = directory / "config.json"
    values = json.loads(path.read_text())
    for name in names:
        del values[name]
    path.write_text(json.dumps(values))
    unseal(directory)


# (field, saved value that is not the default): every format-1 save wrote them, so a
# config.json without one was read as the default, another model (audit 204)
@pytest.mark.parametrize(
    "field, value",
    [
        ("attnres_num_blocks", 2),
        ("attnres_layout", "kimi"),
        ("eps", 1e-3),
        ("rotary_base", 500.0),
        ("attnres_recency_bias", 1.5),
        ("n_ctx", 24),
    ],
)
def test_config_without_a_saved_field_is_refused(tmp_path, field, value):
    model = scrambled_model(**{field: value})
    directory = model.save_pretrained(tmp_path / "ckpt")
    defaults = HookedAttnResConfig(d_model=32, n_layers=4, n_heads=4, d_vocab=50)
    assert getattr(model.cfg, field) != getattr(defaults, field)  # the default is another model
    without_config_fields(directory, field)
    with pytest.raises(
        CheckpointError, match=re.escape(f"has no {[field]} in its config.json")
    ) as info:
        HookedAttnRes.from_pretrained(directory)
    # and names every field a config.json may omit (it named device alone)
    assert str(info.value).endswith("but ['device', 'default_padding_side'])")


def test_config_without_default_padding_side_loads(tmp_path):
    """The one field added after format version 1: a checkpoint saved before it (as the
    shipped attnres_seed0) loads with the default, right padding, as it was then."""
    model = scrambled_model()
    directory = model.save_pretrained(tmp_path / "ckpt")
    without_config_fields(directory, "default_padding_side")
    assert_same_model(HookedAttnRes.from_pretrained(directory), model)


# 1.0 and true: JSON numbers and booleans that equal 1 in Python were read as version 1
@pytest.mark.parametrize("version", [2, 0, "1", None, 1.0, True])
def test_wrong_format_version(saved, version):
    directory, _ = saved
    rewrite_config(directory, format_version=version)
    with pytest.raises(CheckpointError, match=re.escape(f"format_version={version!r}")):
        HookedAttnRes.from_pretrained(directory)


def test_loader_errors_are_value_errors():
    """`CheckpointError` is catchable as ValueError (and is not a FileNotFoundError)."""
    assert issubclass(CheckpointError, ValueError)
    assert not issubclass(CheckpointError, OSError)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
def test_saved_files_get_the_umask_mode_not_owner_only(tmp_path, umask, fmt):
    """safetensors 0.8 creates owner-only (0600) files; a save gives every file the mode a
    plain ``open`` would (0o666 less the umask), so a shared folder can be read."""
    model = tiny_model()
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "m", format=fmt)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {
        p.name: 0o666 & ~umask for p in files
    }


def test_atomic_directory_gives_nested_owner_only_files_the_umask_mode(tmp_path):
    """Independent of the writer: a file created 0600 in a subfolder gets 0o666 & ~umask."""
    from hooked_attnres._atomic import atomic_directory

    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            os.close(os.open(tmp / "sub" / "w.bin", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(previous)
    assert (tmp_path / "d" / "sub" / "w.bin").stat().st_mode & 0o777 == 0o644


# --- round trips of every kind of model (audit of session 13) --------------------------

WORDS = [f"w{i}" for i in range(30)]
BATCH = ["w3 w17 w0 w29", "w5"]  # two lengths: the shorter row is padded


def _processed(**kwargs):
    model = scrambled_model(tie_word_embeddings=True)
    model.process_weights(**kwargs)
    return model


def _with_flags():
    model = scrambled_model(attnres_layout="none")
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    return model


@pytest.mark.parametrize("mmap", [False, True], ids=["copy", "mmap"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: _processed(),
        lambda: _processed(center_unembed=True),
        _with_flags,
        lambda: scrambled_model(attnres_layout="kimi", dtype=torch.bfloat16),
        lambda: scrambled_model(attnres_layout="full", dtype=torch.float16),
        lambda: scrambled_model(attnres_layout="cumulative", dtype=torch.float64),
        lambda: HookedAttnRes.from_hf_qwen3(hf_qwen3(vocab_size=50), wrap="none"),
        lambda: HookedAttnRes.from_hf_qwen3(hf_qwen3(vocab_size=50), wrap="recency"),
        lambda: HookedAttnRes.from_hf_qwen3(
            hf_qwen3(vocab_size=50, tie_word_embeddings=True), wrap="exact", num_blocks=2
        ),
    ],
    ids=[
        "processed-tied",
        "processed-centred",
        "set-use-flags",
        "kimi-bf16",
        "full-f16",
        "cumulative-f64",
        "hf-none",
        "hf-recency",
        "hf-exact-tied",
    ],
)
def test_round_trip_of_transformed_models_is_bitwise(tmp_path, make, mmap):
    """Folded / centred weights (cfg.layer_norm_folding, untied head), the set_use_* hook
    flags (their hook points exist after loading), every dtype and the HF wraps."""
    model = make()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt", mmap=mmap)
    assert_same_model(loaded, model)
    assert sorted(loaded.hook_dict) == sorted(model.hook_dict)


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
@pytest.mark.parametrize("changed", ["tokenizer", "config"])
def test_padding_side_changed_after_attaching_survives_a_round_trip(tmp_path, fmt, changed):
    """``model.tokenizer.padding_side = "left"`` (the TransformerLens way, docs/hooks.md)
    pads on the left; transformers does not save a tokenizer's padding_side, so the loaded
    model padded on the right (the padding moved to the other end of the short row)."""
    model = scrambled_model()
    model.set_tokenizer(build_word_tokenizer(WORDS))
    if changed == "tokenizer":
        model.tokenizer.padding_side = "left"
    else:
        model.cfg.default_padding_side = "left"
    tokens = model.to_tokens(BATCH)
    pad = model.tokenizer.pad_token_id
    assert tokens[1].tolist() == [pad, pad, pad, model.to_tokens("w5")[0, 0].item()]
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    for mmap in (False, True):
        loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt", mmap=mmap)
        assert loaded.default_padding_side == "left"
        assert torch.equal(loaded.to_tokens(BATCH), tokens)
        if fmt == "hooked_attnres":
            assert loaded.cfg == model.cfg
            assert torch.equal(loaded(BATCH), model(BATCH))


def test_tokenizer_files_without_a_padding_side_keep_the_configured_one(tmp_path):
    """Saves before the padding side was written (and other tools' tokenizers) still pad on
    cfg.default_padding_side."""
    model = scrambled_model(default_padding_side="left")
    model.set_tokenizer(build_word_tokenizer(WORDS))
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "tokenizer_config.json"
    values = json.loads(path.read_text())
    assert values.pop("padding_side") == "left"
    path.write_text(json.dumps(values))
    unseal(tmp_path / "ckpt")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt")
    assert loaded.default_padding_side == "left"
    assert torch.equal(loaded.to_tokens(BATCH), model.to_tokens(BATCH))


def test_float64_qwen3_attnres_export_loads_without_rounding(tmp_path):
    """The qwen3_attnres loader defaults to float32, which rounded a float64 model's
    weights (logits off by 2.3e-6 on the tiny model); float64 weights now load as float64."""
    model = scrambled_model(dtype=torch.float64)
    model.save_pretrained(tmp_path / "export", format="qwen3_attnres")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "export")
    assert loaded.cfg.dtype == torch.float64
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float64, name
        assert torch.equal(tensor, expected[name]), name
    # narrower dtypes still load as float32 (exactly: the conversion widens)
    half = scrambled_model(dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "half", format="qwen3_attnres")
    widened = HookedAttnRes.from_pretrained(tmp_path / "half")
    assert widened.cfg.dtype == torch.float32
    for name, tensor in half.state_dict().items():
        assert torch.equal(widened.state_dict()[name], tensor.float()), name


def test_qwen3_attnres_export_refuses_default_prepend_bos(tmp_path):
    model = scrambled_model(default_prepend_bos=True)
    model.set_tokenizer(build_word_tokenizer(WORDS))
    with pytest.raises(ValueError, match="no field for default_prepend_bos=True"):
        model.save_pretrained(tmp_path / "export", format="qwen3_attnres")
    assert not (tmp_path / "export").exists()
    model.save_pretrained(tmp_path / "own")  # this package's format keeps it
    assert HookedAttnRes.from_pretrained(tmp_path / "own").cfg.default_prepend_bos is True


def test_folded_model_through_qwen3_attnres_keeps_its_function(tmp_path):
    """The public format cannot say a model is folded: it loads with
    layer_norm_folding=False, but with the folded weights (every folded gain exactly 1), so
    it is the same function and folding it again changes no weight."""
    model = scrambled_model(tie_word_embeddings=True)
    model.process_weights()
    model.save_pretrained(tmp_path / "export", format="qwen3_attnres")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "export")
    assert loaded.cfg.layer_norm_folding is False
    assert loaded.cfg.tie_word_embeddings is False
    before = {name: tensor.clone() for name, tensor in loaded.state_dict().items()}
    for name, tensor in model.state_dict().items():
        assert torch.equal(before[name], tensor), name
    loaded.fold_layer_norm()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.allclose(loaded(TOKENS), model(TOKENS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
def test_save_failing_at_each_file_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, fmt):
    """The k-th file written by a save over an existing checkpoint raises, for every k
    (weights, config.json, the tokenizer files, the completion marker): the old version
    stays, byte for byte, and no temporary directory is left."""
    import builtins

    import hooked_attnres.loading.qwen3_attnres as qwen3_attnres_module

    target = tmp_path / "ckpt"
    old = scrambled_model(seed=0)
    old.set_tokenizer(build_word_tokenizer(["a", "b"]))
    old.save_pretrained(target, format=fmt)
    files_before = {p.name: p.read_bytes() for p in target.iterdir()}
    new = scrambled_model(seed=1)
    new.set_tokenizer(build_word_tokenizer(WORDS))

    real_open, real_os_open = builtins.open, os.open
    real_save = safetensors.torch.save_file
    written: list[str] = []
    for k in range(1, 20):
        count = [0]

        def tick(where, k=k, count=count):
            count[0] += 1
            if count[0] == k:
                raise OSError(f"simulated failure at write {k} ({where})")
            written.append(Path(where).name)

        def writing_open(file, mode="r", *args, k=k, **kwargs):
            if any(flag in mode for flag in "wax+") and str(tmp_path) in str(file):
                tick(file)
            return real_open(file, mode, *args, **kwargs)

        def writing_os_open(path, flags, *args, k=k, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR) and str(tmp_path) in str(path):
                tick(path)
            return real_os_open(path, flags, *args, **kwargs)

        def writing_save_file(state, filename, metadata=None):
            tick(filename)
            return real_save(state, filename, metadata=metadata)

        written.clear()
        monkeypatch.setattr(builtins, "open", writing_open)
        monkeypatch.setattr(io, "open", writing_open)
        monkeypatch.setattr(os, "open", writing_os_open)
        monkeypatch.setattr(own_format_module, "save_file", writing_save_file)
        monkeypatch.setattr(qwen3_attnres_module, "save_file", writing_save_file)
        try:
            new.save_pretrained(target, format=fmt)
        except OSError as error:
            assert f"write {k}" in str(error)
            failed = True
        else:
            failed = False
        finally:
            monkeypatch.undo()
        if not failed:
            break
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], k
        assert {p.name: p.read_bytes() for p in target.iterdir()} == files_before, k
    assert not failed
    # every file of the save was made to fail once (the marker through its temporary name)
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(written)
    assert any(name.startswith(MARKER) for name in written), written
    loaded = HookedAttnRes.from_pretrained(target)  # the first complete save: the new model
    for name, tensor in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert len(loaded.tokenizer) == len(WORDS) + 3


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
def test_from_hf_qwen3_on_a_saved_checkpoint_points_to_from_pretrained(tmp_path, fmt):
    scrambled_model().save_pretrained(tmp_path / "ckpt", format=fmt)
    with pytest.raises(CheckpointError, match=f"model_type='{fmt}'.*from_pretrained"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "ckpt")


def test_a_save_through_a_symbolic_link_replaces_the_linked_checkpoint(tmp_path):
    """Audit finding: a save to a path that is a link to a checkpoint renamed the link
    aside and put a new directory in its place: the link was gone and the linked checkpoint
    (e.g. on a larger disk) kept the old model, which every load of its real path gave.
    The link is followed now, for saves and loads alike."""
    old, new = scrambled_model(seed=0), scrambled_model(seed=1)
    real = tmp_path / "disk" / "ckpt"
    old.save_pretrained(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_same_model(HookedAttnRes.from_pretrained(real), new)
    assert_same_model(HookedAttnRes.from_pretrained(link), new)
    assert read_marker(real)["sequence"] == 2  # the second save of that checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["ckpt"]


def test_a_parent_that_cannot_be_opened_is_an_error_not_another_lock(tmp_path, monkeypatch):
    """Audit finding: when the parent directory could not be opened for any reason (e.g.
    too many open files), the save locked the fallback file ``.hooked_attnres.lock``
    instead, a lock other processes (which lock the directory) do not hold: the save was
    not serialised with theirs, and the file stayed. Only a permission error falls back."""
    import errno

    real_open = os.open

    def no_descriptors_left(path, flags, *args, **kwargs):
        if Path(path) == tmp_path:
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_descriptors_left)
    with pytest.raises(OSError, match="Too many open files"):
        scrambled_model().save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_while_a_job_lock_is_removed_does_not_keep_the_folder_held(
    tmp_path, monkeypatch
):
    """An interrupt (Ctrl-C) arriving while `exclusive_job` removes its lock file must not
    leave the lock held: the next job in this process would be refused for good."""
    from hooked_attnres._atomic import RUN_LOCK, exclusive_job

    real_unlink = os.unlink

    def interrupted(path, *args, **kwargs):
        if Path(path).name == RUN_LOCK:
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt), exclusive_job(tmp_path, "test"):
        pass
    monkeypatch.undo()
    with exclusive_job(tmp_path, "test"):  # was: DirectoryBusyError (this process held it)
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
def test_a_tokenizer_config_outside_ascii_is_saved_and_loaded_whatever_the_locale(
    tmp_path, monkeypatch, fmt
):
    """Audit 68: transformers writes tokenizer_config.json in UTF-8 with its characters as
    they are (a special token "<｜think｜>"), and save_tokenizer / model_with_saved_tokenizer
    read and rewrote it in the locale's encoding: under an ASCII locale (emulated here, as
    for the study's report) save_pretrained failed with a bare UnicodeDecodeError, and
    from_pretrained refused the file as "not a valid tokenizer config"."""
    model = scrambled_model()
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<｜think｜>"]})
    model.set_tokenizer(tokenizer)
    model.tokenizer.padding_side = "left"
    emulate_ascii_locale(monkeypatch)
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    text = (tmp_path / "ckpt" / "tokenizer_config.json").read_bytes().decode("utf-8")
    assert "<｜think｜>" in text and json.loads(text)["padding_side"] == "left"
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt")
    assert loaded.default_padding_side == "left"
    assert loaded.to_str_tokens("w3 <｜think｜>", prepend_bos=False) == ["w3", "<｜think｜>"]


# --- model_class= at the classmethods ------------------------------------------------------


class _SubModel(HookedAttnRes):
    pass


def test_from_pretrained_refuses_model_class_naming_load_checkpoint(saved):
    directory, _ = saved
    with pytest.raises(TypeError, match=r"from_pretrained loads its own class.*load_checkpoint"):
        HookedAttnRes.from_pretrained(directory, model_class=_SubModel)
    # the remedy the message names builds the class asked for
    from hooked_attnres.loading import load_checkpoint

    assert type(load_checkpoint(directory, model_class=_SubModel)) is _SubModel


def test_from_hf_qwen3_refuses_model_class_naming_the_function():
    with pytest.raises(
        TypeError, match=r"from_hf_qwen3 loads its own class.*hf_qwen3\.from_hf_qwen3"
    ):
        HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="none", model_class=_SubModel)


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres", "trainer_vanilla"])
def test_a_save_failing_for_lack_of_space_raises_the_os_error(tmp_path, fmt):
    """Audit 188: on a full disk ``save_pretrained`` (either format) raised safetensors'
    ``SafetensorError: Error while serializing: I/O error: No space left on device (os
    error 28)``, not an `OSError` (only the trainer converted it, audit 178). The one
    shared save (`atomic_directory`) raises the `OSError` now, for every writer: the
    trainer's save of a vanilla model (``transformers``' save_pretrained) too, and the
    failed save is rolled back. Here a file size limit (``RLIMIT_FSIZE``: the write fails
    with EFBIG, as a full disk fails with ENOSPC) smaller than the weights, in a forked
    child."""
    import errno
    import resource
    import signal

    from crash_helpers import fork_and_wait

    from hooked_attnres._atomic import atomic_directory
    from hooked_attnres.training.trainer import save_model

    model = hf_qwen3() if fmt == "trainer_vanilla" else tiny_model()
    report = tmp_path / "raised.json"

    def run() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            if fmt == "trainer_vanilla":  # as the trainer writes its checkpoint's model
                with atomic_directory(tmp_path / "m") as tmp:
                    save_model(model, tmp)
            else:
                model.save_pretrained(tmp_path / "m", format=fmt)
            raised = {"type": None}
        except Exception as error:
            raised = {
                "type": type(error).__name__,
                "is_os_error": isinstance(error, OSError),
                "errno": getattr(error, "errno", None),
                "message": str(error),
            }
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        report.write_text(json.dumps(raised))

    status = fork_and_wait(run)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    raised = json.loads(report.read_text())
    assert raised["is_os_error"] and raised["errno"] == errno.EFBIG, raised
    assert raised["message"] == f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"
    assert not (tmp_path / "m").exists()  # rolled back
    assert [p.name for p in tmp_path.iterdir()] == ["raised.json"]
