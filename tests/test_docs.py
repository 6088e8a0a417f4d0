"""The docs match the code: the hook table of docs/hooks.md (both directions) and the
reference forward quoted in docs/architecture.md."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

DOC = Path(__file__).parents[1] / "docs" / "hooks.md"


def documented_patterns() -> dict[str, tuple[str, int]]:
    text = DOC.read_text()
    table = text.split("<!-- hook-table -->")[1].split("<!-- /hook-table -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, shape, pos_axis = cells[0].strip("`"), cells[1], int(cells[3])
        pattern = re.escape(name).replace(r"\{l\}", r"\d+").replace(r"\{r\}", "(attn_res|mlp_res)")
        rows[f"^{pattern}$"] = (shape, pos_axis)
    return rows


@pytest.mark.parametrize(
    "layout,mode",
    [
        ("cumulative", "block"),
        ("cumulative", "full"),
        ("kimi", "block"),
        ("full", "block"),
        ("none", "block"),
    ],
)
def test_every_hook_is_documented_with_its_rank_and_position_axis(layout, mode, tokens):
    patterns = documented_patterns()
    model = tiny_model(attnres_layout=layout, attnres_mode=mode)
    # TransformerLens's optional hooks too (split q/k/v inputs exist in layout none only)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    if layout == "none":
        model.set_use_split_qkv_input(True)
    _, cache = model.run_with_cache(tokens)
    for name, hook in model.hook_dict.items():
        matches = [p for p in patterns if re.match(p, name)]
        assert len(matches) == 1, f"{name} is documented {len(matches)} times"
        shape, pos_axis = patterns[matches[0]]
        assert cache[name].ndim == shape.count(",") + 1, name
        assert hook.pos_dim == pos_axis, name


def test_every_documented_hook_exists_in_some_layout():
    names = set()
    for layout, mode in [("cumulative", "full"), ("kimi", "block"), ("full", "block")]:
        names |= set(tiny_model(attnres_layout=layout, attnres_mode=mode).hook_dict)
    flags = dict(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    names |= set(tiny_model(attnres_layout="none", **flags).hook_dict)
    for pattern in documented_patterns():
        assert any(re.match(pattern, name) for name in names), pattern


def test_architecture_doc_quotes_the_reference_forward_verbatim():
    doc = (DOC.parent / "architecture.md").read_text()
    quoted = doc.split("<!-- reference-forward -->")[1].split("<!-- /reference-forward -->")[0]
    quoted = quoted.strip().removeprefix("```python").removesuffix("```").strip("\n")
    source = (Path(__file__).parent / "reference_attnres.py").read_text()
    body = source[source.index('    if layout == "cumulative":') :]
    body = body[: body.index("weights\n") + len("weights")]
    assert quoted == textwrap.dedent(body).strip("\n")


REPO = Path(__file__).parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings in code
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Training throughput (`benchmarks/bench_training.py`)") == (
        "training-throughput-benchmarksbench_trainingpy"
    )
    assert github_anchor("Pre-registered criteria (written 2026-11-28, before)") == (
        "pre-registered-criteria-written-2026-11-28-before"
    )


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {os.path.relpath(file, REPO)})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{page.name}: broken links: {broken}"


def _readme_python_block(containing: str) -> str:
    """The README's one ```python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_the_readme_loading_snippet_runs_as_written(tmp_path, monkeypatch):
    """It used to load placeholder paths ("path/to/dir"); now it loads a shipped checkpoint,
    saves it, and wraps a Qwen3 folder it writes itself."""
    from hooked_attnres import HookedAttnRes

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_python_block("from_hf_qwen3("), namespace)
    assert isinstance(namespace["wrapped"], HookedAttnRes)
    assert namespace["wrapped"].cfg.n_layers == 4
    assert namespace["wrapped"].cfg.attnres_layout == "cumulative"  # the recency wrap
    saved = HookedAttnRes.from_pretrained(tmp_path / "out" / "model")
    tokens = torch.randint(0, saved.cfg.d_vocab, (1, 6))
    assert torch.equal(saved(tokens), namespace["model"](tokens))


def test_the_readme_first_snippet_runs_as_written():
    namespace: dict = {}
    exec(_readme_python_block("mask_embedding"), namespace)
    assert namespace["model"].source_labels(4, "attn_res") == [
        "embedding",
        "block_1",
        "block_2",
        "current",
    ]
