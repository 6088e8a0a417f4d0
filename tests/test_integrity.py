"""A checkpoint changed after its save is refused (audit 98): the completion marker records
every file's SHA-256, and loads and the trainer's resume compare the files with it. Before,
a truncated file failed deep in a reader, and bytes flipped inside a tensor (the file
still parses) or an edited config loaded silently as another model."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import hf_qwen3, randomize_routing, tiny_model
from test_training import SHAPE, TASK, config

from hooked_attnres import CheckpointIntegrityError, HookedAttnRes
from hooked_attnres._atomic import MARKER, atomic_directory, backups_of
from hooked_attnres.loading import load_checkpoint
from hooked_attnres.loading.qwen3_attnres import load_qwen3_attnres
from hooked_attnres.study import build_model
from hooked_attnres.tasks import task_tokenizer
from hooked_attnres.training import train

TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
# the config field of each format that the edit changes (a value, not the layout)
EPS_FIELD = {"hooked_attnres": "eps", "qwen3_attnres": "rms_norm_eps"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_tensor_bytes(path: Path) -> None:
    """Flip a bit in each of 4 bytes in the middle of a safetensors file's tensor data
    (after its 8-byte length and JSON header): the file still parses."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = (start + len(data)) // 2
    for offset in range(4):
        data[middle + offset] ^= 0x40
    path.write_bytes(bytes(data))


def edit_config(path: Path, field: str) -> None:
    values = json.loads(path.read_text())
    values[field] = values[field] * 10
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def saved_model(directory: Path, fmt: str = "hooked_attnres") -> HookedAttnRes:
    model = randomize_routing(tiny_model(), seed=0)
    model.save_pretrained(directory, format=fmt)
    return model


def assert_names_the_change(error, name: str, before: str, after: str) -> None:
    message = str(error.value)
    assert f"{name} has" in message
    assert f"SHA-256 {after} (saved: {before})" in message
    assert "verify=False" in message  # what to do


@pytest.mark.parametrize("fmt", ["hooked_attnres", "qwen3_attnres"])
@pytest.mark.parametrize("damage", ["truncated", "flipped", "config"])
def test_a_checkpoint_changed_after_its_save_is_refused_naming_the_file(tmp_path, fmt, damage):
    directory = tmp_path / "ckpt"
    saved_model(directory, fmt)
    name = "config.json" if damage == "config" else "model.safetensors"
    path = directory / name
    before = sha256(path)
    if damage == "truncated":
        truncate(path)
    elif damage == "flipped":
        flip_tensor_bytes(path)
        safetensors.torch.load_file(str(path))  # still a valid file: only the digest tells
    else:
        edit_config(path, EPS_FIELD[fmt])
    with pytest.raises(CheckpointIntegrityError, match="was changed after it was saved") as info:
        HookedAttnRes.from_pretrained(directory)
    assert_names_the_change(info, name, before, sha256(path))
    if damage == "truncated":
        size = path.stat().st_size
        assert f"{size} bytes (shorter: truncated or rewritten) (saved: {size + 100})" in str(
            info.value
        )


def test_flipped_weights_load_with_verify_false_as_the_file_now_holds_them(tmp_path):
    """The opt-out loads the changed file as it is: the weights the file now holds, which
    are not the saved model's (the silent change the check refuses by default)."""
    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    flip_tensor_bytes(directory / "model.safetensors")
    stored = safetensors.torch.load_file(str(directory / "model.safetensors"))
    loaded = HookedAttnRes.from_pretrained(directory, verify=False)
    found = loaded.state_dict()
    assert all(torch.equal(found[name], tensor) for name, tensor in stored.items())
    assert any(not torch.equal(found[k], v) for k, v in model.state_dict().items())


def test_an_edited_config_loads_with_verify_false(tmp_path):
    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    edit_config(directory / "config.json", "eps")
    assert HookedAttnRes.from_pretrained(directory, verify=False).cfg.eps == model.cfg.eps * 10
    with pytest.raises(TypeError, match="verify"):
        HookedAttnRes.from_pretrained(directory, verify="no")


def test_an_intact_checkpoint_loads_bitwise_and_its_marker_records_the_digests(tmp_path):
    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    marker = json.loads((directory / MARKER).read_text())
    assert marker["sha256"] == {name: sha256(directory / name) for name in marker["files"]}
    loaded = HookedAttnRes.from_pretrained(directory)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_missing_file_and_an_unreadable_marker_are_refused(tmp_path):
    directory = tmp_path / "ckpt"
    saved_model(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"config\.json is missing \(the save wrote"):
        HookedAttnRes.from_pretrained(directory)
    other = tmp_path / "other"
    saved_model(other)
    (other / MARKER).write_text('{"format": "hooked_attnres.complete", "seq')
    with pytest.raises(CheckpointIntegrityError, match=re.escape(f"{MARKER} (the completion ma")):
        HookedAttnRes.from_pretrained(other)


def test_a_marker_written_before_digests_is_checked_by_size(tmp_path):
    """Markers of earlier versions record sizes only: such a checkpoint loads as before,
    and a file of another size is refused (before, only leftovers were checked)."""
    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    marker = json.loads((directory / MARKER).read_text())
    del marker["sha256"]
    (directory / MARKER).write_text(json.dumps(marker))
    loaded = HookedAttnRes.from_pretrained(directory)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    size = (directory / "config.json").stat().st_size
    edit_config(directory / "config.json", "eps")
    found = (directory / "config.json").stat().st_size
    assert found != size
    with pytest.raises(CheckpointIntegrityError, match=f"config.json has {found} bytes"):
        HookedAttnRes.from_pretrained(directory)


def test_a_vanilla_directory_saved_with_a_marker_is_checked_by_from_hf_qwen3(tmp_path):
    """The trainer writes a vanilla run's model (Hugging Face's files) with a marker."""
    directory = tmp_path / "vanilla"
    with atomic_directory(directory) as tmp:
        hf_qwen3().save_pretrained(tmp)
    before = sha256(directory / "model.safetensors")
    flip_tensor_bytes(directory / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_hf_qwen3(directory, wrap="none")
    assert_names_the_change(
        info, "model.safetensors", before, sha256(directory / "model.safetensors")
    )
    HookedAttnRes.from_hf_qwen3(directory, wrap="none", verify=False)


def test_recovery_skips_a_newer_leftover_changed_after_its_commit(tmp_path):
    """A committed but not yet installed version (``.NAME.tmp-*``, what a kill after the
    commit point leaves) whose weights changed since is not installed: the load falls back
    to the intact older version. Before, its sizes matched, so it was installed."""
    target = tmp_path / "ckpt"
    older = saved_model(target)
    newer = tmp_path / "newer"
    saved_model(newer)
    saved_model(newer)  # sequence 2: newer than target's 1
    leftover = tmp_path / ".ckpt.tmp-0123abcd"
    os.rename(newer, leftover)
    flip_tensor_bytes(leftover / "model.safetensors")
    loaded = HookedAttnRes.from_pretrained(target)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in older.state_dict().items())
    assert backups_of(target) == []


# --- the trainer's resume ----------------------------------------------------------------


def stopped_run(out: Path):
    tok = task_tokenizer(TASK)
    model = build_model("attnres", 0, tok, SHAPE, 2)
    cfg = config(steps=4, checkpoint_every=2, eval_every=4)
    train(model, TASK, cfg, out, tokenizer=tok, progress=False, stop_after=2)
    return tok, cfg


@pytest.mark.parametrize(
    "name", ["optimizer.pt", "trainer_state.json", "model/model.safetensors", "model/config.json"]
)
def test_a_resume_from_a_changed_checkpoint_is_refused_and_keeps_it(tmp_path, name):
    """The trainer keeps one checkpoint (each save replaces the last), so there is no earlier
    one to fall back to: the resume refuses, naming the file, and leaves the checkpoint as
    it is. Flipped bytes in ``optimizer.pt`` resumed silently before (final weights 5.7e-4
    from the uninterrupted run's)."""
    out = tmp_path / "run"
    tok, cfg = stopped_run(out)
    path = out / "checkpoint" / name
    before = sha256(path)
    if name.endswith(".safetensors"):
        flip_tensor_bytes(path)
    elif name.endswith(".json"):
        values = json.loads(path.read_text())
        values["step" if name == "trainer_state.json" else "eps"] *= 3
        path.write_text(json.dumps(values, indent=2) + "\n")
    else:
        data = bytearray(path.read_bytes())
        data[len(data) * 3 // 4] ^= 0x40
        path.write_bytes(bytes(data))
    after = sha256(path)
    fresh = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(CheckpointIntegrityError, match="no earlier checkpoint is kept") as info:
        train(fresh, TASK, cfg, out, tokenizer=tok, progress=False)
    assert f"SHA-256 {after} (saved: {before})" in str(info.value)
    assert f"{name} has" in str(info.value) and "resume=False" in str(info.value)
    assert sha256(path) == after and not (out / "model").exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.json", "model/model.safetensors"])
def test_a_truncated_file_of_a_checkpoint_without_a_marker_is_named(tmp_path, name):
    """Audit 197: a checkpoint without a completion marker (an earlier trainer version's,
    or assembled by hand) is not checked against its save, so a truncated file failed in
    its reader with words that named neither the file nor the checkpoint nor a remedy:
    torch's ``PytorchStreamReader failed reading zip archive: failed finding central
    directory`` (RuntimeError), ``Error while deserializing header: incomplete metadata,
    file not fully covered`` (SafetensorError) and ``Unterminated string starting at: line
    52 column 7`` (JSONDecodeError). It is a `CheckpointError` naming the file now, and the
    checkpoint is left as it is."""
    from helpers import unseal

    from hooked_attnres import CheckpointError

    out = tmp_path / "run"
    tok, cfg = stopped_run(out)
    unseal(out / "checkpoint")
    path = out / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    after = sha256(path)
    fresh = build_model("attnres", 0, tok, SHAPE, 2)
    with pytest.raises(CheckpointError) as info:
        train(fresh, TASK, cfg, out, tokenizer=tok, progress=False)
    message = str(info.value)
    assert message.startswith(f"could not read {path}: the file is truncated or corrupt ("), message
    assert "no completion marker" in message and "resume=False" in message, message
    assert sha256(path) == after and not (out / "model").exists()


# --- legitimate copies and the remedies of the study and the command line (audit 103) -----


def test_json_files_whose_line_endings_git_converted_load_as_saved(tmp_path):
    """A checkpoint committed to git and checked out with ``core.autocrlf`` (Git for
    Windows' default) has CRLF line endings in its JSON files, and one saved on Windows
    (CRLF) and checked out elsewhere LF ones: the same JSON values, so the same model. Both
    were refused as changed after the save (``config.json has 1258 bytes (saved: 1210)``).
    A change beyond the line endings is still refused."""
    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    names = [n for n in json.loads((directory / MARKER).read_text())["files"] if ".json" in n]
    assert names
    for name in names:  # the autocrlf checkout
        path = directory / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    loaded = HookedAttnRes.from_pretrained(directory)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # saved with CRLF (the marker records the CRLF bytes), checked out with LF
    marker = json.loads((directory / MARKER).read_text())
    for name in names:
        path = directory / name
        marker["files"][name] = path.stat().st_size
        marker["sha256"][name] = sha256(path)
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    (directory / MARKER).write_text(json.dumps(marker))
    assert HookedAttnRes.from_pretrained(directory).cfg == model.cfg
    edit_config(directory / "config.json", "eps")
    with pytest.raises(CheckpointIntegrityError, match="config.json has"):
        HookedAttnRes.from_pretrained(directory)


def test_the_study_names_its_own_remedy_for_a_changed_run(tmp_path):
    """``load_condition`` (and so the study and ``hooked-attnres study``) has no
    ``verify``: the refusal said ``pass verify=False``, which neither takes. It says to
    restore the run or train it again."""
    from helpers import tiny_study_runs

    from hooked_attnres.study import load_condition

    tiny_study_runs(tmp_path / "runs", "hard_cumulative_L8", (0,))
    path = tmp_path / "runs" / "hard_cumulative_L8_seed0" / "model"
    flip_tensor_bytes(path / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors has SHA-256") as info:
        load_condition("hard_cumulative_L8", 0, tmp_path / "runs")
    message = str(info.value)
    assert "verify=False" not in message, message
    assert "restore it from a backup, or train the run again" in message, message
    assert (
        f"hooked-attnres train --condition hard_cumulative_L8 --seeds 0 --out "
        f"{tmp_path / 'runs'} --no-resume" in message
    ), message


def test_info_names_the_command_lines_remedy_for_a_changed_checkpoint(tmp_path, capsys):
    """``hooked-attnres info`` said ``pass verify=False``, a Python argument the command
    line has no option for; it names ``--no-verify``, which describes the files as they
    are now."""
    from hooked_attnres import cli

    directory = tmp_path / "ckpt"
    model = saved_model(directory)
    edit_config(directory / "config.json", "eps")
    assert cli.main(["info", str(directory), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "was changed after it was saved: config.json has" in err, err
    assert "verify=False" not in err and "pass --no-verify" in err, err
    assert cli.main(["info", str(directory), "--threads", "1", "--no-verify"]) == 0
    assert f"layout {model.cfg.attnres_layout}" in capsys.readouterr().out


def test_a_shorter_edited_config_is_not_called_truncated(tmp_path):
    """A config rewritten shorter (here without indentation) was described as
    ``config.json has 1131 bytes (truncated)``: the size tells only that it is shorter."""
    directory = tmp_path / "ckpt"
    saved_model(directory)
    path = directory / "config.json"
    size = path.stat().st_size
    values = json.loads(path.read_text())
    values["eps"] *= 10
    path.write_text(json.dumps(values))
    found = path.stat().st_size
    assert found < size
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(directory)
    message = str(info.value)
    assert f"config.json has {found} bytes (shorter: truncated or rewritten) (saved: {size})" in (
        message
    ), message


def test_a_chat_template_whose_line_endings_git_converted_loads_as_saved(tmp_path):
    """Audit 105: audit 103 let JSON files whose line endings alone differ pass, but a
    checkpoint whose tokenizer has a chat template (every Qwen3 tokenizer:
    ``transformers`` saves it as ``chat_template.jinja``, a text file git converts too)
    was still refused after a ``core.autocrlf`` checkout (``chat_template.jinja has 57
    bytes (saved: 55)``). ``transformers`` reads the template in text mode (CRLF read as
    LF), so it is the saved template: it loads, and the template read equals the saved
    one. A template changed beyond its line endings, or holding a CR of its own (read as
    a line break), is still refused."""
    from helpers import build_word_tokenizer

    directory = tmp_path / "ckpt"
    model = randomize_routing(tiny_model(), seed=0)
    tokenizer = build_word_tokenizer(["a", "b", "c"])
    tokenizer.chat_template = "{% for m in messages %}\n{{ m['content'] }}\n{% endfor %}"
    model.set_tokenizer(tokenizer)
    model.save_pretrained(directory)
    template = directory / "chat_template.jinja"
    saved = template.read_bytes()
    assert b"\n" in saved
    for path in directory.iterdir():  # the autocrlf checkout: every text file (no NUL)
        data = path.read_bytes()
        if path.name != MARKER and b"\0" not in data[:8000]:
            path.write_bytes(data.replace(b"\n", b"\r\n"))
    loaded = HookedAttnRes.from_pretrained(directory)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    template.write_bytes(saved.replace(b"content", b"role").replace(b"\n", b"\r\n"))
    with pytest.raises(CheckpointIntegrityError, match="chat_template.jinja has"):
        HookedAttnRes.from_pretrained(directory)
    # a template saved with CRLF (read as LF), given a CR of its own before each: its
    # CRLF made LF are the saved bytes, but it reads with a blank line after each line
    tokenizer.chat_template = "{% for m in messages %}\r\n{{ m['content'] }}\r\n{% endfor %}"
    model.save_pretrained(directory)
    assert b"\r\n" in template.read_bytes()
    expected = HookedAttnRes.from_pretrained(directory).tokenizer.chat_template
    template.write_bytes(template.read_bytes().replace(b"\r\n", b"\r\r\n"))
    read = HookedAttnRes.from_pretrained(directory, verify=False).tokenizer.chat_template
    assert read != expected  # another template
    with pytest.raises(CheckpointIntegrityError, match="chat_template.jinja has"):
        HookedAttnRes.from_pretrained(directory)


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_qwen3_attnres", "from_hf_qwen3"])
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(verify="no"), TypeError, r"^verify must be True or False, got 'no'"),
        (dict(verify=0), TypeError, r"^verify must be True or False, got 0"),
        (dict(mmap=1), TypeError, r"^mmap must be True or False, got 1"),
        (dict(mmap="no"), TypeError, r"^mmap must be True or False, got 'no'"),
        (dict(device=3.5), ValueError, r"^device=3.5 is not a torch device"),
        # one past this machine's GPUs (every CUDA device where there is none): torch
        # failed when the loaded model was moved, after every weight was read
        (
            dict(device=f"cuda:{torch.cuda.device_count()}"),
            ValueError,
            r"^device='cuda:\d+' is not on this machine: it has \d+ CUDA device\(s\)",
        ),
    ],
)
def test_every_loader_checks_its_arguments_before_reading(tmp_path, loader, bad, error, message):
    # audit 137: load_qwen3_attnres, called directly, read its flags by truthiness
    # (verify=0 loaded the changed file below unchecked, mmap="no" memory-mapped) and took
    # device=3.5; now the one check of load_checkpoint and from_hf_qwen3
    # (io.check_load_arguments), made before any file is read: of a directory that does
    # not exist the arguments are refused first
    call = {
        "load_checkpoint": load_checkpoint,
        "load_qwen3_attnres": load_qwen3_attnres,
        "from_hf_qwen3": lambda d, **kw: HookedAttnRes.from_hf_qwen3(d, wrap="none", **kw),
    }[loader]
    with pytest.raises(error, match=message):
        call(tmp_path / "nothing here", **bad)
    if loader != "load_qwen3_attnres":
        return
    directory = tmp_path / "ckpt"
    saved_model(directory, "qwen3_attnres")
    flip_tensor_bytes(directory / "model.safetensors")
    with pytest.raises(error, match=message):
        call(directory, **bad)
    with pytest.raises(CheckpointIntegrityError):  # what verify=True (the default) says
        call(directory)
