"""A checkpoint folder without a completion marker is checked against a digest manifest
(``SHA256SUMS`` in the folder's grandparent that lists files of the folder), by every
loader (audit 211). The shipped checkpoints (``hooked_attnres/data/study``) carry no marker
and are listed in such a manifest; before, only the study's ``load_condition`` compared
them with it (``verify_shipped``), and ``HookedAttnRes.from_pretrained(checkpoint_dir(...))``
loaded a flipped weight byte or an edited ``config.json`` silently as the shipped model.

Every test works on a copy of (part of) the shipped tree: the package's files are never
touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from hooked_attnres import CheckpointIntegrityError, HookedAttnRes
from hooked_attnres.loading.qwen3_attnres import load_qwen3_attnres
from hooked_attnres.study import SHIPPED

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
ATTNRES = "attnres_seed0"  # a hooked_attnres-format folder (from_pretrained)
VANILLA = "vanilla_seed0"  # a vanilla Qwen3 folder (from_hf_qwen3)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(root: Path) -> dict[str, str]:
    """``{relative path: digest}`` of ``root/SHA256SUMS``, parsed here independently."""
    lines = (root / "SHA256SUMS").read_text().splitlines()
    return {line[66:]: line[:64] for line in lines if line.strip()}


def shipped_copy(tmp_path: Path, runs=(ATTNRES, VANILLA)) -> Path:
    """``tmp_path/study`` holding ``SHA256SUMS`` and the ``model`` folders of ``runs``."""
    root = tmp_path / "study"
    root.mkdir()
    shutil.copy2(SHIPPED / "SHA256SUMS", root / "SHA256SUMS")
    for run in runs:
        shutil.copytree(SHIPPED / run / "model", root / run / "model")
    return root


def flip_weight_byte(path: Path) -> None:
    """Flip one bit of a byte in the middle of the tensor data (the file still parses)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[(start + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def edit_config(path: Path, field: str) -> None:
    values = json.loads(path.read_text())
    values[field] = values[field] * 10  # a model that loads, with other logits
    path.write_text(json.dumps(values, indent=2))


def load(directory: Path, **kwargs) -> HookedAttnRes:
    if json.loads((directory / "config.json").read_text())["model_type"] == "qwen3":
        return HookedAttnRes.from_hf_qwen3(directory, wrap="recency", **kwargs)
    return HookedAttnRes.from_pretrained(directory, **kwargs)


EPS = {ATTNRES: "eps", VANILLA: "rms_norm_eps"}


@pytest.mark.parametrize("run", [ATTNRES, VANILLA])
@pytest.mark.parametrize("damage", ["a flipped weight byte", "an edited config.json"])
def test_a_changed_file_of_a_listed_folder_is_refused_naming_it(tmp_path, run, damage):
    root = shipped_copy(tmp_path, (run,))
    directory = root / run / "model"
    clean = load(directory)  # as shipped: loads
    if damage == "a flipped weight byte":
        path = directory / "model.safetensors"
        flip_weight_byte(path)
    else:
        path = directory / "config.json"
        edit_config(path, EPS[run])
    # what the change does unchecked: another model, loaded without a word before
    changed = load(directory, verify=False)
    with torch.no_grad():
        assert not torch.equal(changed(TOKENS), clean(TOKENS))
    with pytest.raises(CheckpointIntegrityError) as info:
        load(directory)
    message = str(info.value)
    expected = listed(root)[f"{run}/model/{path.name}"]
    assert f"{path} has SHA-256 {sha256(path)}, not the {expected} {root / 'SHA256SUMS'} lists" in (
        message
    ), message
    assert "verify=False" in message and "reinstall hooked-attnres" in message, message


def test_every_loader_of_a_directory_checks_the_manifest(tmp_path, capsys):
    """``load_checkpoint``, ``load_qwen3_attnres`` and ``hooked-attnres info`` (the loaders
    of a directory that ``test_a_changed_file...`` does not call) refuse it too."""
    from hooked_attnres import cli
    from hooked_attnres.loading import load_checkpoint

    root = shipped_copy(tmp_path, (ATTNRES,))
    directory = root / ATTNRES / "model"
    flip_weight_byte(directory / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors has SHA-256"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors has SHA-256"):
        load_qwen3_attnres(directory)  # checked before its config is read
    assert cli.main(["info", str(directory), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors has SHA-256" in err and "pass --no-verify" in err, err
    assert cli.main(["info", str(directory), "--threads", "1", "--no-verify"]) == 0


@pytest.mark.parametrize("run", [ATTNRES, VANILLA])
def test_an_untouched_listed_folder_loads_as_shipped(tmp_path, run):
    root = shipped_copy(tmp_path, (run,))
    found = load(root / run / "model").state_dict()
    shipped = load(SHIPPED / run / "model", verify=False).state_dict()
    assert found.keys() == shipped.keys()
    assert all(torch.equal(found[key], shipped[key]) for key in found)


def test_the_shipped_folder_itself_is_checked_and_loads():
    """``from_pretrained(checkpoint_dir("attnres"))``, the natural path: checked (every file
    of the folder is listed) and loaded."""
    from hooked_attnres.study import checkpoint_dir

    model = HookedAttnRes.from_pretrained(checkpoint_dir("attnres"))
    assert (
        model.cfg.n_layers
        == json.loads((checkpoint_dir("attnres") / "config.json").read_text())["n_layers"]
    )


@pytest.mark.parametrize("where", ["no manifest", "a manifest listing other folders"])
def test_a_folder_without_marker_or_manifest_of_its_own_loads_unchecked_as_before(tmp_path, where):
    """No marker and no manifest that lists this folder's files: nothing records the files,
    so a flipped byte loads as the file now holds it (the documented limit), as before."""
    root = shipped_copy(tmp_path, (ATTNRES,))
    if where == "no manifest":
        (root / "SHA256SUMS").unlink()
        directory = root / ATTNRES / "model"
    else:  # a run of one's own beside the listed ones: not this manifest's business
        directory = root / "myrun_seed0" / "model"
        shutil.copytree(root / ATTNRES / "model", directory)
    flip_weight_byte(directory / "model.safetensors")
    loaded = HookedAttnRes.from_pretrained(directory).state_dict()  # no refusal
    unchecked = HookedAttnRes.from_pretrained(directory, verify=False).state_dict()
    shipped = HookedAttnRes.from_pretrained(SHIPPED / ATTNRES / "model").state_dict()
    assert all(torch.equal(loaded[key], unchecked[key]) for key in loaded)  # the file as is
    assert not all(torch.equal(loaded[key], shipped[key]) for key in loaded)  # the flip


def test_a_manifest_elsewhere_than_the_grandparent_is_not_read(tmp_path):
    """The rule is narrow: the folder's grandparent, not its parent nor further up."""
    root = shipped_copy(tmp_path, (ATTNRES,))
    directory = root / ATTNRES / "model"
    flip_weight_byte(directory / "model.safetensors")
    (root / "SHA256SUMS").rename(root / ATTNRES / "SHA256SUMS")  # the parent
    HookedAttnRes.from_pretrained(directory)  # unchecked, as before
    (root / ATTNRES / "SHA256SUMS").rename(tmp_path / "SHA256SUMS")  # further up
    HookedAttnRes.from_pretrained(directory)


def test_a_completion_marker_takes_precedence_over_a_manifest(tmp_path):
    """A save into a listed folder writes a marker: the folder is checked against the
    marker (the newer record), not the manifest that listed the files before it."""
    root = shipped_copy(tmp_path, (ATTNRES,))
    directory = root / ATTNRES / "model"
    model = HookedAttnRes.from_pretrained(directory)
    with torch.no_grad():
        model.W_E.add_(1.0)  # model.safetensors no longer the listed one
    model.save_pretrained(directory, overwrite=True)
    assert torch.equal(HookedAttnRes.from_pretrained(directory).W_E, model.W_E)


def test_a_file_not_listed_or_listed_and_missing_is_refused(tmp_path):
    """A file of a listed folder that the manifest does not list cannot be checked (a
    hidden one, e.g. ``.DS_Store``, is read by no loader and passes, as do notes: see
    ``test_a_whole_manifest_lets...``); a listed file that is
    missing is refused: the shipped ``vanilla`` folder without its tokenizer files loaded
    as a model without a tokenizer."""
    root = shipped_copy(tmp_path, (VANILLA,))
    directory = root / VANILLA / "model"
    (directory / ".DS_Store").write_bytes(b"\0")
    load(directory)  # hidden: not read by a loader, not checked
    (directory / "special_tokens_map.json").write_text("{}")  # a loader reads it
    with pytest.raises(CheckpointIntegrityError) as info:
        load(directory)
    message = str(info.value)
    assert f"{directory / 'special_tokens_map.json'} is not listed in {root / 'SHA256SUMS'}" in (
        message
    ), message
    (directory / "special_tokens_map.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    assert load(directory, verify=False).tokenizer is None  # what it did unchecked
    with pytest.raises(CheckpointIntegrityError) as info:
        load(directory)
    message = str(info.value)
    assert f"{directory / 'tokenizer.json'} is listed in {root / 'SHA256SUMS'}" in message
    assert "but missing" in message and "tokenizer_config.json" in message, message


@pytest.mark.parametrize("line", ["5205ac90\n", "not-a-digest  attnres_seed0/model/x\n"])
def test_a_manifest_line_that_is_no_digest_and_file_is_refused_by_number(tmp_path, line):
    root = shipped_copy(tmp_path, (ATTNRES,))
    sums = root / "SHA256SUMS"
    sums.write_text(sums.read_text() + line)
    number = len(sums.read_text().splitlines())
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(root / ATTNRES / "model")
    assert f"line {number} of {sums} is no '{{sha256}}  {{file}}' pair ({line.strip()!r})" in str(
        info.value
    ), info.value


def test_a_study_run_from_a_copy_of_the_shipped_tree_is_checked(tmp_path):
    """``load_condition(..., checkpoints=copy)`` of a copy of the shipped tree: the copy's
    manifest applies (before, only a folder under the installed package was compared)."""
    from hooked_attnres.study import load_condition

    root = shipped_copy(tmp_path, (ATTNRES,))
    shutil.copy2(SHIPPED / ATTNRES / "metrics.json", root / ATTNRES / "metrics.json")
    load_condition("attnres", 0, root)
    flip_weight_byte(root / ATTNRES / "model" / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError) as info:
        load_condition("attnres", 0, root)
    message = str(info.value)
    assert "model.safetensors has SHA-256" in message, message
    assert "verify=False" not in message and "train the run again" in message, message


def own_runs(tmp_path: Path) -> Path:
    """``tmp_path/runs`` holding ``x_seed0/model`` and ``x_seed1/model``: a user's runs
    without completion markers (saved before markers, or copied with ``cp model/*``,
    which leaves the hidden marker behind), files as the shipped ``attnres_seed0``."""
    runs = tmp_path / "runs"
    for run in ("x_seed0", "x_seed1"):
        shutil.copytree(SHIPPED / ATTNRES / "model", runs / run / "model")
    return runs


def test_a_users_manifest_of_the_weights_alone_checks_them_and_no_other_file(tmp_path):
    """Review 213: ``cd runs && sha256sum */model/model.safetensors > SHA256SUMS`` (the
    "recreate bit for bit" check of docs/training.md, kept in a file) lists each run's
    weights as ``x_seed0/model/model.safetensors``: the grandparent rule applies to
    ``runs/x_seed0/model``, and every other file of it (config, tokenizer) was refused as
    not listed, so the user's own runs no longer loaded. A manifest that does not list the
    folder's ``config.json`` lists some files of it, not the folder: those are checked."""
    runs = own_runs(tmp_path)
    weights = {run: runs / run / "model" / "model.safetensors" for run in ("x_seed0", "x_seed1")}
    (runs / "SHA256SUMS").write_text(
        "".join(f"{sha256(path)}  {run}/model/model.safetensors\n" for run, path in weights.items())
    )
    directory = runs / "x_seed0" / "model"
    (directory / "notes.txt").write_text("mine")  # unlisted, as config and tokenizer
    found = HookedAttnRes.from_pretrained(directory).state_dict()
    shipped = HookedAttnRes.from_pretrained(SHIPPED / ATTNRES / "model").state_dict()
    assert found.keys() == shipped.keys()
    assert all(torch.equal(found[key], shipped[key]) for key in found)
    listed_digest = sha256(weights["x_seed0"])
    flip_weight_byte(weights["x_seed0"])  # what the manifest lists is still checked
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(directory)
    message = str(info.value)
    path = weights["x_seed0"]
    assert f"{path} has SHA-256 {sha256(path)}, not the {listed_digest}" in message, message
    assert "not listed" not in message, message
    weights["x_seed0"].unlink()  # and a listed file missing
    with pytest.raises(CheckpointIntegrityError, match="safetensors is listed in .* but missing"):
        HookedAttnRes.from_pretrained(directory)


def test_a_users_manifest_that_lists_the_config_lists_the_folder_whole(tmp_path):
    """``sha256sum */model/* > SHA256SUMS``: the folder's ``config.json`` is listed, so the
    manifest is taken to list the folder whole (as the shipped one): a file added later,
    which a loader may read, is refused as not listed."""
    runs = own_runs(tmp_path)
    directory = runs / "x_seed0" / "model"
    (runs / "SHA256SUMS").write_text(
        "".join(f"{sha256(p)}  x_seed0/model/{p.name}\n" for p in sorted(directory.iterdir()))
    )
    HookedAttnRes.from_pretrained(directory)
    (directory / "special_tokens_map.json").write_text("{}")
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(directory)
    assert f"{directory / 'special_tokens_map.json'} is not listed in" in str(info.value)


# files a user adds to a folder, which no loader reads (notes, a README, a notebook, a plot)
NOTES = ("notes.txt", "README.md", "analysis.ipynb", "logits.png")
# files of the kinds a load reads: this library's (config, weights, a shard index) and the
# tokenizer's (transformers' AutoTokenizer: special tokens, a template, vocabularies)
READ = (
    "generation_config.json",
    "special_tokens_map.json",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "chat_template.jinja",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "Tokenizer.JSON",  # any case: tokenizer.json to a case-insensitive file system
)


@pytest.mark.parametrize("run", [ATTNRES, VANILLA])
def test_a_whole_manifest_lets_a_file_no_loader_reads_be_added_and_refuses_others(tmp_path, run):
    """Audit 229: a manifest that lists a folder whole (``sha256sum */model/*``, or the
    shipped one) refused any file added to the folder later, so ``notes.txt`` or a README
    beside the weights made the folder unloadable though no loader reads them. A file of
    a kind a load reads is still refused when not listed (it could change the model)."""
    root = shipped_copy(tmp_path, (run,))
    directory = root / run / "model"
    as_listed = load(directory).state_dict()
    for name in NOTES:
        (directory / name).write_text("mine")
    found = load(directory).state_dict()  # loads, as the listed files
    assert found.keys() == as_listed.keys()
    assert all(torch.equal(found[key], as_listed[key]) for key in found)
    flip_weight_byte(directory / "model.safetensors")  # the listed files are still checked
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors has SHA-256"):
        load(directory)
    shutil.copy2(SHIPPED / run / "model" / "model.safetensors", directory / "model.safetensors")
    added = [name for name in READ if not (directory / name).exists()]  # vanilla has some
    assert len(added) >= len(READ) - 1, added
    for name in added:
        (directory / name).write_text("{}")
        with pytest.raises(CheckpointIntegrityError) as info:
            load(directory)
        message = str(info.value)
        assert f"{directory / name} is not listed in {root / 'SHA256SUMS'}" in message, message
        assert "notes.txt" not in message and "README.md" not in message, message
        (directory / name).unlink()
    load(directory)


def test_every_file_a_tokenizer_class_of_transformers_reads_is_of_a_kind_a_load_may_read():
    """Review 230: the files ``AutoTokenizer`` may read from a folder, taken from the
    installed transformers (each tokenizer class's ``vocab_files_names``), not copied from
    `may_be_read`'s lists: a whole manifest refuses each of them unlisted."""
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    from hooked_attnres.loading.io import may_be_read

    names = set()
    for classes in TOKENIZER_MAPPING_NAMES.values():
        for name in classes if isinstance(classes, (tuple, list)) else [classes]:
            if name is not None:
                # a composite (RagTokenizer) names none: its parts' classes are listed too
                found = getattr(tokenizer_class_from_name(name), "vocab_files_names", {})
                names |= set(found.values())
    assert {"tokenizer.json", "vocab.json", "merges.txt", "spiece.model"} <= names, names
    assert [name for name in sorted(names) if not may_be_read(name)] == []


TEMPLATES = "additional_chat_templates"  # transformers' subfolder of named chat templates
TEMPLATE = "{% for message in messages %}{{ message['content'] }} mine{% endfor %}"


@pytest.mark.parametrize("run", [ATTNRES, VANILLA])
def test_a_whole_manifest_checks_the_chat_templates_the_tokenizer_reads_from_its_subfolder(
    tmp_path, run
):
    """Review 230: ``AutoTokenizer`` reads every ``*.jinja`` of the folder's
    ``additional_chat_templates`` subfolder (a dotted one too) as a named chat template;
    subfolders were never compared, so a template added to (or edited in) a folder listed
    whole loaded silently as ``model.tokenizer.chat_template``. Such a template is refused
    unlisted and compared listed; notes in that subfolder are not."""
    from transformers.utils.hub import CHAT_TEMPLATE_DIR

    assert CHAT_TEMPLATE_DIR == TEMPLATES  # the subfolder transformers reads
    root = shipped_copy(tmp_path, (run,))
    directory = root / run / "model"
    assert load(directory).tokenizer.chat_template is None  # as shipped: no template
    (directory / TEMPLATES).mkdir()
    (directory / TEMPLATES / "README.md").write_text("mine")  # a note: read by no load
    load(directory)
    sums = (root / "SHA256SUMS").read_text()
    for name in ("mine.jinja", ".mine.jinja"):
        path = directory / TEMPLATES / name
        path.write_text(TEMPLATE)
        # what a load reads from it, unchecked
        assert load(directory, verify=False).tokenizer.chat_template == {
            name.removesuffix(".jinja"): TEMPLATE
        }
        with pytest.raises(CheckpointIntegrityError) as info:
            load(directory)
        message = str(info.value)
        assert f"{path} is not listed in {root / 'SHA256SUMS'}" in message, message
        assert "README.md" not in message, message
        # listed (``sha256sum */model/* */model/additional_chat_templates/*``): compared
        line = f"{sha256(path)}  {run}/model/{TEMPLATES}/{name}\n"
        (root / "SHA256SUMS").write_text(sums + line)
        assert load(directory).tokenizer.chat_template == {name.removesuffix(".jinja"): TEMPLATE}
        path.write_text(TEMPLATE.replace("mine", "yours"))
        with pytest.raises(CheckpointIntegrityError) as info:
            load(directory)
        assert f"{path} has SHA-256 {sha256(path)}, not the {line[:64]}" in str(info.value)
        path.unlink()  # and listed, missing
        with pytest.raises(CheckpointIntegrityError) as info:
            load(directory)
        assert f"{path} is listed in {root / 'SHA256SUMS'} but missing" in str(info.value)
        (root / "SHA256SUMS").write_text(sums)
    load(directory)


def test_a_manifest_that_is_a_symbolic_link_is_read_where_the_link_is(tmp_path):
    """Review 213: ``runs/SHA256SUMS`` a link to a manifest kept elsewhere: its paths are
    relative to ``runs`` (where ``sha256sum -c`` would read them); before, the load failed
    with Python's bare "is not in the subpath" ``ValueError``."""
    runs = own_runs(tmp_path)
    path = runs / "x_seed0" / "model" / "model.safetensors"
    kept = tmp_path / "manifests"
    kept.mkdir()
    listed_digest = sha256(path)
    (kept / "SHA256SUMS").write_text(f"{listed_digest}  x_seed0/model/model.safetensors\n")
    (runs / "SHA256SUMS").symlink_to(kept / "SHA256SUMS")
    HookedAttnRes.from_pretrained(path.parent)
    flip_weight_byte(path)
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(path.parent)
    assert f"{path} has SHA-256 {sha256(path)}, not the {listed_digest}" in str(info.value)


def test_a_binary_mode_line_lists_its_file(tmp_path):
    """Review 213: ``sha256sum -b`` (``shasum -b``, the default of some systems) prints
    ``{sha256} *{file}``: the ``*`` marks binary mode and is no part of the name. Such a
    manifest was not taken to list the folder (``*x_seed0/...``), so a flipped weight byte
    loaded silently though the manifest records the file's digest."""
    runs = own_runs(tmp_path)
    path = runs / "x_seed0" / "model" / "model.safetensors"
    listed_digest = sha256(path)
    (runs / "SHA256SUMS").write_text(f"{listed_digest} *x_seed0/model/model.safetensors\n")
    HookedAttnRes.from_pretrained(path.parent)
    flip_weight_byte(path)
    with pytest.raises(CheckpointIntegrityError) as info:
        HookedAttnRes.from_pretrained(path.parent)
    assert f"{path} has SHA-256 {sha256(path)}, not the {listed_digest}" in str(info.value)
