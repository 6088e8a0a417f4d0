"""The docs match the code: the hook table of docs/hooks.md (both directions) and the
reference forward quoted in docs/architecture.md."""

from __future__ import annotations

import ast
import inspect
import os
import re
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import tiny_config, tiny_model

from hooked_attnres.interventions.selection import depth_bands
from hooked_attnres.model.depth import ROUTER_HOOKS

DOC = Path(__file__).parents[1] / "docs" / "hooks.md"


def documented_patterns() -> dict[str, tuple[str, int, str]]:
    """``{name regex: (shape, pos axis, dtype)}`` of the hook table."""
    text = DOC.read_text()
    table = text.split("<!-- hook-table -->")[1].split("<!-- /hook-table -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, shape, dtype, pos_axis = cells[0].strip("`"), cells[1], cells[2], int(cells[3])
        pattern = re.escape(name).replace(r"\{l\}", r"\d+").replace(r"\{r\}", "(attn_res|mlp_res)")
        rows[f"^{pattern}$"] = (shape, pos_axis, dtype)
    return rows


def documented_shape(model, name: str, shape: str, batch: int, pos: int) -> tuple[int, ...]:
    """The table's shape of hook ``name`` with the axis names of docs/hooks.md filled in."""
    cfg = model.cfg
    dims = dict(batch=batch, pos=pos, query_pos=pos, key_pos=pos, d_model=cfg.d_model)
    dims |= dict(n_heads=cfg.n_heads, n_kv=cfg.n_key_value_heads, d_head=cfg.d_head)
    dims |= dict(d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, **{"1": 1})
    router = re.match(r"^(?:blocks\.(\d+)\.(attn_res|mlp_res)|final_res)\.", name)
    if router:  # "n_sources (depends on the layer, router and layout ...)"
        layer = None if router.group(1) is None else int(router.group(1))
        site = model.site(layer, router.group(2) or "final_res")
        dims["n_sources"] = len(model.routing_layout.labels(site))
    return tuple(dims[axis.strip()] for axis in shape.strip("`[]").split(","))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
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
def test_every_hook_is_documented_with_its_shape_dtype_and_position_axis(
    layout, mode, dtype, tokens
):
    patterns = documented_patterns()
    model = tiny_model(attnres_layout=layout, attnres_mode=mode).to(dtype)
    # TransformerLens's optional hooks too (split q/k/v inputs exist in layout none only)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    if layout == "none":
        model.set_use_split_qkv_input(True)
    _, cache = model.run_with_cache(tokens)
    # '"float32" ... means float32 in float32, bfloat16 and float16 models, and float64 in a
    # float64 model'
    dtypes = {"model": dtype, "float32": torch.float64 if dtype == torch.float64 else torch.float32}
    for name, hook in model.hook_dict.items():
        matches = [p for p in patterns if re.match(p, name)]
        assert len(matches) == 1, f"{name} is documented {len(matches)} times"
        shape, pos_axis, documented_dtype = patterns[matches[0]]
        assert cache[name].shape == documented_shape(model, name, shape, *tokens.shape), name
        assert cache[name].dtype == dtypes[documented_dtype], name
        assert hook.pos_dim == pos_axis, name


@pytest.mark.parametrize("wrap", ["recency", "exact", "none"])
def test_every_hook_of_the_hf_wraps_is_documented_with_its_shape(wrap):
    """The hook table holds for the ``from_hf_qwen3`` wraps too (3 layers, 2 blocks: the
    blocks end unevenly), the optional hooks on."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes

    blocks = {} if wrap == "none" else {"num_blocks": 2}  # wrap "none" has no blocks
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap=wrap, **blocks)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    if wrap == "none":
        model.set_use_split_qkv_input(True)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5))
    _, cache = model.run_with_cache(tokens)
    patterns = documented_patterns()
    for name, hook in model.hook_dict.items():
        matches = [p for p in patterns if re.match(p, name)]
        assert len(matches) == 1, f"{name} is documented {len(matches)} times"
        shape, pos_axis, _ = patterns[matches[0]]
        assert cache[name].shape == documented_shape(model, name, shape, 2, 5), name
        assert hook.pos_dim == pos_axis, name


def test_every_documented_hook_exists_in_some_layout():
    names = set()
    for layout, mode in [("cumulative", "full"), ("kimi", "block"), ("full", "block")]:
        names |= set(tiny_model(attnres_layout=layout, attnres_mode=mode).hook_dict)
    flags = dict(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    names |= set(tiny_model(attnres_layout="none", **flags).hook_dict)
    for pattern in documented_patterns():
        assert any(re.match(pattern, name) for name in names), pattern


def _at_a_glance(page: Path) -> str:
    """The "At a glance" section of ``page`` (up to the next ``## `` heading)."""
    return page.read_text().split("## At a glance\n")[1].split("\n## ")[0]


ROUTED = [("cumulative", "block"), ("cumulative", "full"), ("kimi", "block"), ("full", "block")]


@pytest.mark.parametrize("layout,mode", [*ROUTED, ("none", "block")])
def test_the_at_a_glance_router_hooks_are_every_routers_hooks_with_the_tables_shapes(layout, mode):
    """docs/hooks.md's "At a glance": "Each router has five hooks" under its prefix, the
    rows of its table, with the shapes of the hook table; and its `names_filter` "keeps
    the five hooks of every router, no other" (the optional hooks on)."""
    glance = _at_a_glance(DOC)
    rows = re.findall(r"^\| `\{prefix\}\.([\w.]+)` \| (`\[[^`]+\]`) \|", glance, flags=re.M)
    assert len(rows) == 5
    patterns = documented_patterns()
    for prefix in ("blocks.{l}.{r}", "final_res"):
        for hook, shape in rows:
            name = f"{prefix}.{hook}".format(l=0, r="mlp_res")
            (match,) = [p for p in patterns if re.match(p, name)]
            assert patterns[match][0] == shape, (prefix, hook)
    model = tiny_model(attnres_layout=layout, attnres_mode=mode, use_attn_result=True)
    model.set_use_hook_mlp_in(True)
    if layout == "none":
        model.set_use_split_qkv_input(True)
    router_hooks = set()
    for site in model.sites() if layout != "none" else []:
        hooks = {n for n in model.hook_dict if n.startswith(site.prefix + ".")}
        assert hooks == {f"{site.prefix}.{hook}" for hook, _ in rows}, site
        router_hooks |= hooks
    (span,) = re.findall(r"`names_filter=(lambda name: [^`]+)`", glance)
    keep = eval(span)  # noqa: S307 (the docs' own filter)
    assert {name for name in model.hook_dict if keep(name)} == router_hooks


def test_the_hooks_at_a_glance_snippet_states_what_it_prints():
    glance_block = _python_block("docs/hooks.md", 'names_filter=lambda name: "_res." in name')
    namespace: dict = {}
    exec(glance_block, namespace)
    model, cache, tokens = namespace["model"], namespace["cache"], namespace["batch"].tokens
    # "shipped: cumulative, 8 layers, 4 blocks"
    assert (model.cfg.attnres_layout, model.cfg.n_layers) == ("cumulative", 8)
    assert model.cfg.attnres_num_blocks == 4
    dims = {"batch": tokens.shape[0], "pos": tokens.shape[1], "n_sources": 4}
    assert check_stated_outputs(glance_block, namespace, dims) == 2
    hooks = ("hook_sources", "key_norm.hook_scale", "hook_logits", "hook_weights", "hook_out")
    assert set(cache.keys()) == {f"{s.prefix}.{h}" for s in model.sites() for h in hooks}


def test_the_hook_counts_stated_for_a_28_layer_model_are_the_real_ones():
    """ "a 28-layer model's 964 hook names (`len(model.hook_dict)`, no `set_use_*` hook on:
    964 in the `kimi` layout with 4 blocks, ...)": each count of the sentence."""
    text = " ".join(DOC.read_text().split())
    stated = text.split("28-layer model's ")[1].split("), review")[0]
    counts = re.findall(r"(\d+) in (?:the )?`(\w+)`(?: layout)?(?: with (\d+) blocks)?", stated)
    assert len(counts) == 4 and stated.startswith(f"{counts[0][0]} hook names")
    for count, layout, blocks in counts:
        overrides = {"attnres_num_blocks": int(blocks)} if blocks else {}
        model = tiny_model(n_layers=28, attnres_layout=layout, **overrides)
        assert len(model.hook_dict) == int(count), (layout, blocks)
    # "8 blocks, the default config"
    default = tiny_config(n_layers=28, attnres_num_blocks=None)  # every AttnRes field default
    assert (default.attnres_layout, default.attnres_mode, default.attnres_num_blocks) == (
        "cumulative",
        "block",
        8,
    )


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


def _python_block(page: str, containing: str) -> str:
    """The one ```python block of ``page`` (relative to the repository) that contains
    ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def _readme_python_block(containing: str) -> str:
    return _python_block("README.md", containing)


def _stated(block: str) -> list[tuple[str, str]]:
    """``(expression, comment)`` of every line ``expression  # comment`` of a snippet."""
    pairs = []
    for line in block.splitlines():
        code, sep, comment = line.partition("  # ")
        if not sep or not code.strip() or code.startswith((" ", ")")):
            continue
        try:
            ast.parse(code.strip(), mode="eval")
        except SyntaxError:  # an assignment, or a statement that goes on
            continue
        pairs.append((code.strip(), comment))
    return pairs


def _leading_literal(comment: str) -> tuple[bool, object]:
    """The longest start of ``comment`` that is a Python literal (``(False, None)`` if none)."""
    for end in range(len(comment), 0, -1):
        try:
            return True, ast.literal_eval(comment[:end])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return False, None


def check_stated_outputs(block: str, namespace: dict, dims: dict) -> int:
    """Evaluate each commented expression of an executed snippet and compare it with what
    its comment states: a leading literal (``# ["embedding", "current"]``) must equal the
    value, and a leading shape (``# [batch, pos, n_sources]``, entries evaluated in
    ``dims``) must be the tensor's shape. Returns how many statements were checked."""
    checked = 0
    for code, comment in _stated(block):
        shape = re.match(r"\[([\w ,+*-]+)\]", comment)
        if shape and any(c.isalpha() for c in shape.group(1)):
            value = eval(code, namespace)  # noqa: S307 (the docs' own snippet)
            if isinstance(value, torch.Tensor):
                expected = tuple(eval(d, {}, dims) for d in shape.group(1).split(","))
                assert tuple(value.shape) == expected, (code, comment, tuple(value.shape))
                checked += 1
            continue
        found, literal = _leading_literal(comment)
        if found:
            assert eval(code, namespace) == literal, (code, comment)  # noqa: S307
            checked += 1
    return checked


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


# ---- every Python snippet of README.md and docs/*.md runs as written and prints what it
# states (those that need the shipped study or a training run are only checked to call the
# public functions with their real argument names: `check_calls_bind`)


def check_calls_bind(block: str, names: dict) -> int:
    """Every call in ``block`` of a function in ``names`` (or imported by the block) binds
    to that function's signature (argument names and count); ``...`` and undefined names
    stand for any value. Returns how many calls were checked."""
    namespace = dict(names)
    tree = ast.parse(block)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "<doc>", "exec"), namespace)  # noqa: S102
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            function = namespace.get(node.func.id)
            if callable(function):
                signature = inspect.signature(function)
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
                checked += 1
    return checked


def test_the_snippet_checkers_catch_a_wrong_statement():
    namespace = {"x": torch.zeros(2, 3), "labels": ["embedding", "current"]}
    assert (
        check_stated_outputs(
            'x  # [a, b + 1]\nlabels  # ["embedding", "current"]', namespace, {"a": 2, "b": 2}
        )
        == 2
    )
    with pytest.raises(AssertionError, match="current"):
        check_stated_outputs('labels  # ["embedding", "block_1", "current"]', namespace, {})
    with pytest.raises(AssertionError, match=r"\(2, 3\)"):
        check_stated_outputs("x  # [a, b] zeros", namespace, {"a": 2, "b": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        check_calls_bind("f(1, colour=2)", {"f": lambda a, color=0: a})


def test_the_readme_first_snippet_states_what_it_prints():
    namespace: dict = {}
    block = _readme_python_block("mask_embedding")
    exec(block, namespace)
    model = namespace["model"]
    dims = {"batch": 4, "pos": 12, "n_sources": len(model.source_labels(4, "attn_res"))}
    assert check_stated_outputs(block, namespace, dims) == 2  # the shape and the labels
    # "# {'embedding': [0], 'older': [1], ...}" (a dict the checker cannot read: "...";
    # audit 87: read from the README, its entries the first of the real dict, in order)
    (comment,) = [c for code, c in _stated(block) if code.startswith("model.source_families(")]
    stated = ast.literal_eval(re.sub(r",\s*\.\.\.\s*}$", "}", comment.strip()))
    families = model.source_families(4, "attn_res")
    assert stated and list(families.items())[: len(stated)] == list(stated.items()), comment


def test_the_package_docstring_quick_start_states_what_it_prints(tokens):
    import hooked_attnres

    quick_start = hooked_attnres.__doc__.split("Quick start::")[1].split("\nThe names below")[0]
    block = textwrap.dedent(quick_start)
    namespace: dict = {"tokens": tokens}
    exec(block, namespace)
    dims = {"batch": tokens.shape[0], "pos": tokens.shape[1], "n_sources": 3}
    assert check_stated_outputs(block, namespace, dims) == 2


def test_the_readme_study_snippet_runs_on_fewer_prompts():
    """As written but with 16 probe prompts instead of 256 (5.6 s -> 1.7 s)."""
    block = _readme_python_block("dissociation_report(summary, effects)")
    assert "n_prompts=256" in block
    namespace: dict = {}
    exec(block.replace("n_prompts=256", "n_prompts=16"), namespace)
    model = namespace["model"]
    # "the paper's layout, 8 layers, 4 blocks"
    assert (model.cfg.attnres_layout, model.cfg.n_layers) == ("cumulative", 8)
    assert model.cfg.attnres_num_blocks == 4
    report = namespace["dissociation_report"](namespace["summary"], namespace["effects"])
    assert sorted(report["router"]) == ["attn_res", "mlp_res"]  # "per router type"


def test_the_readme_transformerlens_snippet_runs_on_a_shipped_model():
    from hooked_attnres.study import load_condition

    model = load_condition("hard_cumulative_L8", seed=0)
    namespace: dict = {"model": model, "tokenizer": model.tokenizer, "torch": torch}
    exec(_readme_python_block("generate("), namespace)
    # "padding masked: exact at real tokens": each prompt alone, unpadded
    logits = namespace["logits"]
    for row, text in enumerate(["a b c", "d"]):
        alone = model(text)[0]
        torch.testing.assert_close(logits[row, -alone.shape[0] :], alone)
    # "adds blocks.{l}.attn.hook_result [batch, pos, head, d_model]"
    _, cache = model.run_with_cache(["a b", "c"], padding_side="left")
    cfg = model.cfg
    assert cache["blocks.0.attn.hook_result"].shape == (2, 2, cfg.n_heads, cfg.d_model)


def _routed(layout: str, dtype=torch.float32):
    from helpers import randomize_routing

    return randomize_routing(tiny_model(attnres_layout=layout)).to(dtype).eval()


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full"])
def test_the_interventions_snippet_masks_what_it_says(layout, tokens):
    model = _routed(layout)
    namespace: dict = {"model": model, "tokens": tokens}
    exec(_python_block("docs/analysis.md", "ablated_logits"), namespace)
    with model.hooks(fwd_hooks=namespace["hooks"]):
        logits, masked = model.run_with_cache(tokens)
    torch.testing.assert_close(namespace["ablated_logits"], logits)
    early = depth_bands(model.cfg.n_layers)["early"]
    for layer in range(model.cfg.n_layers):
        weights = masked[f"blocks.{layer}.mlp_res.hook_weights"][..., 0]  # source 0: embedding
        assert weights.eq(0).all() == (layer in early), layer


def _metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def _clean_and_corrupted(tokens):
    corrupted = tokens.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 50
    return tokens, corrupted


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_the_depth_state_patching_snippet_runs(layout, tokens):
    model = _routed(layout) if layout != "none" else tiny_model(attnres_layout="none").eval()
    clean, corrupted = _clean_and_corrupted(tokens)
    namespace = {"model": model, "clean_tokens": clean, "corrupted_tokens": corrupted}
    namespace["metric"] = _metric
    exec(_python_block("docs/analysis.md", "get_act_patch_depth_state_by_pos("), namespace)
    result = namespace["result"]
    assert result.shape == (model.cfg.n_layers, tokens.shape[1])  # result[l, p]
    # position 2 (the corrupted one) clean in every source entering layer 0: the clean run
    torch.testing.assert_close(result[0, 2], _metric(model(clean)))


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full"])
def test_the_generic_activation_patch_snippet_equals_what_it_says(layout, tokens):
    from hooked_attnres.patching import get_act_patch_routing_weights_by_pos

    model = _routed(layout)
    clean, corrupted = _clean_and_corrupted(tokens)
    _, clean_cache = model.run_with_cache(clean)
    namespace = {"model": model, "corrupted": corrupted, "clean_cache": clean_cache}
    namespace["metric"] = _metric
    exec(_python_block("docs/analysis.md", "generic_activation_patch("), namespace)
    # "equals get_act_patch_routing_weights_by_pos(model, corrupted, clean_cache, metric)[1]"
    expected = get_act_patch_routing_weights_by_pos(model, corrupted, clean_cache, _metric)[1]
    torch.testing.assert_close(namespace["result"], expected)


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_the_direct_logit_attribution_snippet_sums_to_the_logit_difference(layout, tokens):
    model = (
        _routed(layout, torch.float64)
        if layout != "none"
        else tiny_model(attnres_layout="none").to(torch.float64)
    )
    logits, cache = model.run_with_cache(tokens)
    answer, contrast = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    namespace = {"cache": cache, "answer_ids": answer, "contrast_ids": contrast}
    exec(_python_block("docs/analysis.md", "cache.logit_attrs("), namespace)
    # "attrs.sum(0) == logits[:, -1, answer] - logits[:, -1, contrast]"
    rows = torch.arange(3)
    expected = logits[rows, -1, answer] - logits[rows, -1, contrast]
    torch.testing.assert_close(namespace["attrs"].sum(0), expected)
    assert len(namespace["labels"]) == namespace["stack"].shape[0]


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_the_routing_lens_snippet_states_what_it_prints(layout, tokens):
    model = _routed(layout) if layout != "none" else tiny_model(attnres_layout="none").eval()
    _, cache = model.run_with_cache(tokens)
    namespace = {"model": model, "tokens": tokens, "cache": cache}
    block = _python_block("docs/analysis.md", "routing_lens(model, tokens)")
    exec(block, namespace)
    lens, cfg = namespace["lens"], model.cfg
    dims = dict(n_layers=cfg.n_layers, batch=3, pos=9, d_vocab=cfg.d_vocab)
    dims["n_routers"] = len(lens.sites)
    assert check_stated_outputs(block, namespace, dims) == 2
    assert (lens.labels[0], lens.labels[-1]) == ("0_pre", "final_post")
    torch.testing.assert_close(lens.logits[-1], model(tokens))  # "== model(tokens)"
    last = eval(block.splitlines()[-1].split("  #")[0], namespace)  # noqa: S307
    assert last.logits.shape == (2 * cfg.n_layers + 1, 3, cfg.d_vocab)  # + "{l}_mid"
    assert [label for label in last.labels if label.endswith("_mid")] == [
        f"{layer}_mid" for layer in range(cfg.n_layers)
    ]


def test_the_attribution_snippet_runs_and_gives_the_stated_columns():
    from hooked_attnres.analysis import ablation_effects
    from hooked_attnres.tasks.base import TaskBatch

    model = _routed("kimi")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (4, 7), generator=generator)
    batch = TaskBatch(
        tokens=tokens,
        answer_pos=torch.full((4,), 6),
        answer=torch.tensor([1, 2, 3, 4]),
        contrast=torch.tensor([5, 6, 7, 8]),
        corrupted_tokens=torch.randint(0, 50, (4, 7), generator=generator),
        targets=torch.full((4, 7), -100),
    )
    namespace = {"model": model, "batch": batch}
    exec(_python_block("docs/analysis.md", "attribute_routing(model, batch"), namespace)
    result = namespace["result"]
    effects = ablation_effects(model, batch, metrics="logit_diff", groups="layers")
    # "the ablation_effects columns + estimate, method"
    assert list(result.table.columns) == [*effects.columns, "estimate", "method"]
    top = result.verify_top(10)
    assert len(top) == 10 and set(top["method"]) == {"exact"}
    assert {"estimate", "error", "estimate_method", "verified_because"} <= set(top.columns)


def test_the_router_sites_snippet_states_what_it_prints():
    """The model of the package docstring's quick start (4 layers, 2 blocks, cumulative)."""
    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2)
    namespace: dict = {"model": model}
    block = _python_block("docs/architecture.md", "site.sublayer")
    exec(block, namespace)
    assert check_stated_outputs(block, namespace, {}) == 6
    assert namespace["model"].sites()[-1] == model.site(3, "mlp_res")  # no final router here


def test_the_worked_example_of_the_layouts_gives_the_real_source_labels():
    """docs/architecture.md's worked example (4 layers, 2 blocks): each cell is
    ``model.source_labels(l, r)`` of its layout; ``-`` is no such router, ``...`` elides
    the middle of a list whose length the cell gives in parentheses."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    table = doc.split("Worked example, 4 layers, 2 blocks")[1].split("\n\n")[1]
    lines = table.strip().splitlines()
    layouts = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    models = {layout: tiny_model(attnres_layout=layout) for layout in layouts}
    checked = 0
    for line in lines[2:]:
        router, *cells = [c.strip() for c in line.strip("|").split("|")]
        if router == "final":
            layer, kind = None, "final_res"
        else:
            layer = int(router.split()[1])
            kind = {"attention": "attn_res", "MLP": "mlp_res"}[router.split()[2]]
        for layout, cell in zip(layouts, cells, strict=True):
            model = models[layout]
            if cell == "-":
                with pytest.raises(ValueError, match="no final router"):
                    model.site(layer, kind)
                continue
            labels = model.source_labels(model.site(layer, kind))
            count = re.search(r"\((\d+)( sources)?\)$", cell)
            stated = [s.strip() for s in re.sub(r"\(.*?\)", "", cell).split(",")]
            if "..." in stated:
                assert count and len(labels) == int(count.group(1)), (router, layout)
                head = stated[: stated.index("...")]
                tail = stated[stated.index("...") + 1 :]
                assert labels[: len(head)] == head and labels[len(labels) - len(tail) :] == tail
            else:
                assert labels == stated, (router, layout, labels)
            checked += 1
    assert checked == 17


def test_the_from_hf_qwen3_signature_in_loading_md_is_the_real_one():
    from hooked_attnres.loading.hf_qwen3 import from_hf_qwen3

    call = ast.parse(_python_block("docs/loading.md", "from_hf_qwen3(")).body[0].value
    documented = {k.arg: eval(ast.unparse(k.value), {"torch": torch}) for k in call.keywords}  # noqa: S307
    parameters = dict(inspect.signature(from_hf_qwen3).parameters)
    del parameters["model_class"]  # internal: HookedAttnRes.from_hf_qwen3 passes its own
    assert [a.id for a in call.args] + list(documented) == list(parameters)
    assert documented == {name: parameters[name].default for name in documented}


@pytest.mark.parametrize(
    "page,containing,expected",
    [
        ("docs/training.md", "train_condition(", 7),
        ("docs/analysis.md", "run_study(", 2),
    ],
)
def test_snippets_not_run_here_call_functions_by_their_real_arguments(page, containing, expected):
    """The snippets that need a training run or the whole study at least call every
    function with arguments it takes."""
    assert check_calls_bind(_python_block(page, containing), {}) == expected


def test_the_depth_state_snippet_names_the_real_fields():
    from hooked_attnres import DepthState

    block = _python_block("docs/architecture.md", "DepthState(")
    assert check_calls_bind(block, {"DepthState": DepthState}) == 1


# ---- shapes that public docstrings and docs/analysis.md state, in every layout


def annotated_axes(function) -> list[str]:
    """The axis names of a function's jaxtyping return annotation (``Float[Tensor, "a b"]``)."""
    annotation = inspect.signature(function).return_annotation
    return re.search(r"Tensor, [\"']\s*([^\"']*)[\"']", annotation).group(1).split()


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_patching_sweeps_return_their_annotated_shapes(layout, tokens):
    from hooked_attnres import patching
    from hooked_attnres.analysis import attribution_patch_routing_weights

    model = _routed(layout) if layout != "none" else tiny_model(attnres_layout="none").eval()
    clean, corrupted = _clean_and_corrupted(tokens)
    _, clean_cache = model.run_with_cache(clean)
    axes = {"router": 2, "layer": model.cfg.n_layers, "pos": tokens.shape[1]}  # 2: the default
    routing = [
        patching.get_act_patch_routing_weights,
        patching.get_act_patch_routing_weights_by_pos,
        patching.get_act_patch_committed_blocks_by_pos,
    ]
    depth = [patching.get_act_patch_depth_state, patching.get_act_patch_depth_state_by_pos]
    for sweep in routing + depth:
        if layout == "none" and sweep in routing:  # "any routing call on layout none raises"
            with pytest.raises(ValueError, match="no routers"):
                sweep(model, corrupted, clean_cache, _metric)
            continue
        result = sweep(model, corrupted, clean_cache, _metric)
        assert result.shape == tuple(axes[a] for a in annotated_axes(sweep)), sweep.__name__
        assert result.dtype == torch.float32, sweep.__name__
        if sweep in routing[:2]:  # "same layout" as the exact sweep it estimates
            estimate = attribution_patch_routing_weights(
                model, corrupted, clean_cache, _metric, by_pos=sweep is routing[1]
            )
            assert estimate.shape == result.shape and estimate.dtype == torch.float32
    if layout in ("kimi", "full"):  # "a final_res row fills column 0, the rest NaN"
        routers = ("attn_res", "mlp_res", "final_res")
        result = patching.get_act_patch_routing_weights(
            model, corrupted, clean_cache, _metric, routers=routers
        )
        assert result.shape == (3, model.cfg.n_layers)
        assert result[2, 0].isfinite() and result[2, 1:].isnan().all()
        assert result[:2].isfinite().all()


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_cache_routing_pieces_have_their_documented_shapes(layout, tokens):
    """``routed_coefficients(point)``: ``{component label: weights [batch, pos]}`` (1.0 where
    no router reads) whose weighted components sum to ``norm_input(point)``
    ``[batch, pos, d_model]``; ``stack_router_activation``: ``[n_layers, *hook shape]`` with
    the source axis grown to the largest ``n_sources`` and a ``[n_layers, max_sources]``
    mask."""
    model = (
        _routed(layout, torch.float64)
        if layout != "none"
        else tiny_model(attnres_layout="none").to(torch.float64)
    )
    _, cache = model.run_with_cache(tokens)
    cfg = model.cfg
    for point in range(2 * cfg.n_layers + 1):
        norm_input = cache.norm_input(point)
        assert norm_input.shape == (*tokens.shape, cfg.d_model)
        total = torch.zeros_like(norm_input)
        for label, weight in cache.routed_coefficients(point).items():
            if isinstance(weight, torch.Tensor):
                assert weight.shape == tokens.shape, (point, label)
            else:
                assert weight == 1.0 and model.routing_layout.reader(point) is None
            name = (
                "hook_embed"
                if label == "embed"
                else "blocks.{}.hook_{}_{}".format(*label.split("_"))
            )
            total = (
                total
                + (weight[..., None] if isinstance(weight, torch.Tensor) else weight)
                * (cache[name])
            )
        torch.testing.assert_close(total, norm_input)
    if layout == "none":
        return
    # docs/hooks.md's table of stack_router_activation's shapes, one row per hook
    table = DOC.read_text().split("`stack_router_activation(hook, router)` returns")[1]
    rows = re.findall(r"^  \| ((?:`\"\w+\"`(?:, )?)+) \| `\[([^\]]+)\]`", table, flags=re.M)
    shapes = {hook: shape for hooks, shape in rows for hook in re.findall(r"\"(\w+)\"", hooks)}
    assert sorted(shapes) == sorted(ROUTER_HOOKS)
    for router in ("attn_res", "mlp_res"):
        counts = [len(model.source_labels(site)) for site in model.sites(router)]
        dims = dict(n_layers=cfg.n_layers, batch=tokens.shape[0], pos=tokens.shape[1])
        dims |= dict(max_sources=max(counts), d_model=cfg.d_model, **{"1": 1})
        for hook, shape in shapes.items():
            stacked, mask = cache.stack_router_activation(hook, router)
            assert stacked.shape == tuple(dims[axis.strip()] for axis in shape.split(",")), hook
            assert mask.shape == (cfg.n_layers, max(counts))
            assert mask.sum(1).tolist() == counts


def _random_batch():
    """4 prompts of 7 random tokens, answers read at the last position (seeded)."""
    from hooked_attnres.tasks.base import TaskBatch

    generator = torch.Generator().manual_seed(0)
    n, n_pos = 4, 7
    return TaskBatch(
        tokens=torch.randint(0, 50, (n, n_pos), generator=generator),
        answer_pos=torch.full((n,), n_pos - 1),
        answer=torch.tensor([1, 2, 3, 4]),
        contrast=torch.tensor([5, 6, 7, 8]),
        corrupted_tokens=torch.randint(0, 50, (n, n_pos), generator=generator),
        targets=torch.full((n, n_pos), -100),
    )


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_routing_analyses_give_their_documented_tables_and_shapes(layout):
    from hooked_attnres.analysis import ablation_effects, attribute_routing, routing_mass

    model = _routed(layout) if layout != "none" else tiny_model(attnres_layout="none").eval()
    batch = _random_batch()
    n, n_pos = batch.tokens.shape
    if layout == "none":
        for analysis in (routing_mass, ablation_effects, attribute_routing):
            with pytest.raises(ValueError, match="no routers"):
                analysis(model, batch)
        return
    # "tidy per-prompt table prompt, router, layer, band, family, n_sources, mass"
    mass = routing_mass(model, batch)
    assert list(mass.columns) == [
        *"prompt router layer band family n_sources mass".split(),
    ]
    effects = ablation_effects(model, batch, metrics="logit_diff", groups="layers")
    assert list(effects.columns) == [
        *"router group layers family metric clean ablated effect ci_low ci_high".split(),
        *"n_masked_routers skipped n_prompts confidence".split(),
    ]
    result = attribute_routing(
        model, batch, groups="layers", method=["linear", "norm"], by_position=True
    )
    n_cells = len(effects)
    assert list(result.table.columns) == [*effects.columns, "estimate", "method"]
    assert len(result.table) == 2 * n_cells  # "one block of rows per method"
    for method in ("linear", "norm"):
        assert result.per_prompt[(method, "logit_diff")].shape == (n_cells, n)
        assert result.by_position[(method, "logit_diff")].shape == (n_cells, n, n_pos)
    assert result.masked_mass.shape == (n_cells,)


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full", "none"])
def test_depth_states_and_partial_passes_have_their_documented_shapes(layout, tokens):
    """``depth_states``: ``n_layers + 1`` states (``2L + 1`` with ``sublayers=True``), every
    source ``[batch, pos, d_model]``; ``forward_from`` / ``logit_positions``: logits
    ``[batch, pos, d_vocab]`` or ``[batch, 1, d_vocab]``."""
    model = _routed(layout) if layout != "none" else tiny_model(attnres_layout="none").eval()
    cfg, (batch, pos) = model.cfg, tokens.shape
    states = model.depth_states(tokens)
    by_sublayer = model.depth_states(tokens, sublayers=True)
    assert (len(states), len(by_sublayer)) == (cfg.n_layers + 1, 2 * cfg.n_layers + 1)
    for state in [*states, *by_sublayer]:
        assert all(s.shape == (batch, pos, cfg.d_model) for s in state.sources)
    assert model.forward_from(by_sublayer[3], 3).shape == (batch, pos, cfg.d_vocab)
    positions = torch.tensor([pos - 1, 2, 5])
    at = model(tokens, logit_positions=positions)
    assert at.shape == (batch, 1, cfg.d_vocab)
    torch.testing.assert_close(at[:, 0], model(tokens)[torch.arange(batch), positions])
    assert model.forward_from(by_sublayer[3], 3, logit_positions=positions).shape == at.shape


def _documented_signatures(page: str) -> list[tuple[str, list[str]]]:
    """``(function name, argument texts)`` of every table row of ``page`` whose first cell is
    a call ``name(arguments)``."""
    rows = []
    for cell in re.findall(r"^\| `(\w+)\((.*?)\)`", (REPO / page).read_text(), flags=re.M):
        name, arguments = cell
        parts = re.split(r",\s*(?![^()]*\))", arguments) if arguments else []
        rows.append((name, [part.strip() for part in parts]))
    return rows


def check_glance_returns(rows: list[str], columns: dict, shapes: dict) -> int:
    """Each stated column list and shape of docs/analysis.md's "At a glance" table is the
    real one. In a row, a code span that is a call (`f(...)`, `.verify_top(k)`) or an
    attribute (`.sources`) names what the spans after it describe: a list `a, b, c` is
    ``columns[name]`` (after "+ ": its last columns; followed by "`, then": its first;
    after "rows ": ``columns[name + ".index"]``), a shape `[a, b]` is ``shapes[name]``.
    Returns how many were checked."""
    checked = 0
    for row in rows:
        name = None
        for match in re.finditer(r"`([^`]+)`", row):
            span, before = match.group(1), row[: match.start()]
            called = re.match(r"^(\w+)\(|^\.(\w+)", span)
            if called:
                name = called.group(1) or called.group(2)
            elif re.fullmatch(r"\[[\w, ]+\]", span):
                assert [a.strip() for a in span.strip("[]").split(",")] == shapes[name], span
                checked += 1
            elif re.fullmatch(r"[\w*]+(, [\w*]+)+", span):
                stated = span.split(", ")
                if before.endswith("rows "):
                    real = columns[name + ".index"]
                elif before.endswith("+ "):
                    real = columns[name][-len(stated) :]
                elif row[match.end() :].startswith(", then"):
                    real = columns[name][: len(stated)]
                else:
                    real = columns[name]
                assert stated == real, (name, stated, real)
                checked += 1
    return checked


def test_the_analysis_at_a_glance_states_the_real_columns_and_shapes():
    """Every column list and shape of docs/analysis.md's "At a glance" table, from the
    functions run on tiny models (kimi; the schedule's on a cumulative one)."""
    import pandas as pd

    import hooked_attnres.analysis
    from hooked_attnres import patching
    from hooked_attnres.analysis import (
        ablation_effects,
        attribute_routing,
        dissociation_report,
        motif_report,
        motif_verdicts,
        recency_schedule,
        routing_mass,
        schedule_comparison,
        summarize_mass,
    )

    model = _routed("kimi")
    batch = _random_batch()
    n, n_layers = len(batch.tokens), model.cfg.n_layers
    mass = routing_mass(model, batch)
    summary = summarize_mass(mass)
    groups = {**depth_bands(n_layers), "all": range(n_layers)}
    effects = ablation_effects(
        model, batch, groups=groups, metrics=("logit_diff", "accuracy"), progress=False
    )
    attribution = attribute_routing(model, batch, groups="layers", progress=False)
    report = motif_report(summary, effects)
    schedule = recency_schedule(n_layers, model.cfg.attnres_num_blocks)
    cumulative = _routed("cumulative")
    columns = {
        "routing_mass": list(mass.columns),
        # "*by" of the default by=("router", "family")
        "summarize_mass": ["*by", *summary.columns[2:]],
        "ablation_effects": list(effects.columns),
        "table": list(attribution.table.columns),
        "verify_top": list(attribution.verify_top(2).columns),
        "sources": list(schedule.sources.columns),
        "families": list(schedule.families.columns),
        "family_means.index": list(schedule.family_means.index),
        "schedule_comparison": list(
            schedule_comparison(routing_mass(cumulative, batch), schedule).columns
        ),
        "dissociation_report": list(dissociation_report(summary, effects).columns),
        "motif_report": list(report.columns),
        "motif_verdicts": list(motif_verdicts(report).columns),
    }
    assert list(summary.columns[:2]) == ["router", "family"]
    # "`.table`: those columns + ...", "`.verify_top(k)` ...: those columns + ..."
    assert columns["table"][: len(effects.columns)] == list(effects.columns)
    assert columns["verify_top"][: len(effects.columns)] == list(effects.columns)
    # "`.family_means`: ... one column per family"
    assert list(schedule.family_means.columns) == list(hooked_attnres.FAMILIES)
    # "one row per claim of `CLAIMS` (and per `condition` / `seed` ...)", "one row per claim
    # (and `condition`)"
    assert report.claim.tolist() == list(hooked_attnres.analysis.CLAIMS)
    two = pd.concat([report.assign(condition="a"), report.assign(condition="b")])
    assert len(motif_verdicts(two)) == 2 * len(report)
    # "one row per prompt, router and family"
    assert len(mass) == n * len(model.sites()) * len(hooked_attnres.FAMILIES)
    sweeps = [name for name in patching.__all__ if name.startswith("get_act_patch_")]
    shapes = {name: annotated_axes(getattr(patching, name)) for name in sweeps}
    rows = re.findall(r"^\|.*\|$", _at_a_glance(REPO / "docs" / "analysis.md"), flags=re.M)
    assert check_glance_returns(rows[2:], columns, shapes) == 17


@pytest.mark.parametrize("page", ["docs/analysis.md", "docs/training.md"])
def test_documented_signatures_in_tables_are_the_real_ones(page):
    """A table row ``f(model, corrupted_tokens, ..., routers=("attn_res", "mlp_res"))``
    names ``f``'s parameters (positional ones in order) and gives its defaults
    (alternatives ``"a" / "b"`` start with the default)."""
    import hooked_attnres.analysis
    import hooked_attnres.interventions
    import hooked_attnres.patching
    import hooked_attnres.plotting
    import hooked_attnres.tasks
    from hooked_attnres import AttnResActivationCache

    modules = [hooked_attnres.interventions, hooked_attnres.patching, hooked_attnres.analysis]
    modules += [hooked_attnres.plotting, hooked_attnres.tasks]
    rows = _documented_signatures(page)
    assert rows
    for name, arguments in rows:
        if hasattr(AttnResActivationCache, name):  # a usage in the cache analyses' table
            continue
        (function,) = {getattr(m, name) for m in modules if hasattr(m, name)}
        parameters = inspect.signature(function).parameters
        for index, argument in enumerate(arguments):
            keyword = re.match(r"(\w+)=(.+)$", argument)
            if argument == "...":
                continue
            if keyword is None:  # positional: the parameter's name at that place
                assert list(parameters)[index] == argument, (name, index, argument)
                continue
            assert keyword.group(1) in parameters, (name, argument)
            default = keyword.group(2).split(" / ")[0]
            if default not in ("...", "{..}", "[..]"):
                expected = parameters[keyword.group(1)].default
                assert ast.literal_eval(default) == expected, (name, argument)


def _catalogue_counts() -> dict[int, int]:
    """``{part: test cases}`` of tests/test_catalogue.py: every parametrised case of the
    tests under its ``# --- part N`` comment (part 2 counts its bad-input ``CASES``)."""
    import test_catalogue

    source = (REPO / "tests" / "test_catalogue.py").read_text()
    starts = [source[: source.index(f"# --- part {n}")].count("\n") for n in (1, 2, 3)]
    counts = {1: 0, 2: len(test_catalogue.CASES), 3: 0}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        part = sum(node.lineno > start for start in starts)
        if part == 2:
            continue
        cases = 1
        for mark in getattr(getattr(test_catalogue, node.name), "pytestmark", []):
            if mark.name == "parametrize":
                cases *= len(mark.args[1])
        counts[part] += cases
    return counts


def test_the_reliability_catalogue_counts_are_the_tests():
    """docs/reliability.md's "Part N: ... (k scenarios / cases)" and the per-area counts of
    its bad-input table are the cases of tests/test_catalogue.py."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    stated = {int(n): int(k) for n, k in re.findall(r"^## Part (\d): .*\((\d+) \w+\)$", doc, re.M)}
    assert stated == _catalogue_counts()
    table = doc.split("## Part 2")[1].split("## Part 3")[0]
    areas = [int(k) for k in re.findall(r"^\| [\w ]+ \| (\d+) \|", table, re.M)]
    assert sum(areas) == stated[2]


def test_the_reliability_config_examples_are_refused():
    """Every ``field=value`` example of the "config fields" row of docs/reliability.md is
    refused by the config."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    row = re.search(r"^\| config fields \|.*$", doc, re.M).group(0)
    examples = re.findall(r"`(\w+)=([^`]+)`", row)
    assert examples
    for field, value in examples:
        with pytest.raises(ValueError):
            tiny_model(**{field: eval(value, {"inf": float("inf")})})  # noqa: S307


PACKAGES = [
    "hooked_attnres",
    *(f"hooked_attnres.{p.parent.name}" for p in sorted(REPO.glob("hooked_attnres/*/__init__.py"))),
    # public modules with an __all__ (hooked_attnres.patching): it was not checked
    *(
        f"hooked_attnres.{p.stem}"
        for p in sorted(REPO.glob("hooked_attnres/[!_]*.py"))
        if re.search(r"^__all__ = ", p.read_text(), re.M)
    ),
]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_documented(package):
    """Every name of a package's ``__all__`` (the package, its subpackages and the public
    modules that have one, e.g. ``hooked_attnres.patching``) is named in
    code (a code block or an inline code span) in README.md or docs/*.md (benchmarks.md, a
    log, does not count)."""
    import importlib

    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    text = "\n".join(p.read_text() for p in pages if p.name != "benchmarks.md")
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = "\n".join(blocks + spans)
    module = importlib.import_module(package)
    missing = [
        name
        for name in getattr(module, "__all__", [])
        if not re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", code)
    ]
    assert not missing, f"{package}: not in the docs: {missing}"


# ---- calls written in the prose (inline code spans such as `routing_mass(positions="all")`
# or `model.run_with_cache(..., pos_slice=...)`) name real functions and arguments


def _inline_spans() -> list[tuple[str, str]]:
    """``(page name, span)`` of every inline code span of README.md and docs/*.md
    (benchmarks.md, a log, left out) that holds a call; a span over several lines (a long
    signature) joined into one."""
    spans = []
    for page in MARKDOWN:
        if page.name == "benchmarks.md":
            continue
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for span in re.findall(r"`([^`]+)`", text):
            if re.search(r"\w\(", span):
                spans.append((page.name, " ".join(span.split())))
    return spans


def _span_expression(span: str):
    """The span as a Python expression, the prose's placeholders made Python: an argument
    left empty (``n_past=,``), ``[..]`` / ``{..}`` and a leading ``.method`` or ``with``;
    ``None`` if it is no expression (a formula, a message)."""
    text = re.sub(r"=\s*(?=[,)])", "=...", span.strip())
    text = text.replace("[..]", "...").replace("{..}", "...")
    text = re.sub(r"^(with |\w+ = )", "", text)
    text = re.sub(r"^\.(?=\w+\()", "_any.", text)
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError:
        return None


def _public_callables() -> dict[str, list]:
    """``{name: [functions and classes of that name]}`` of every module of the package
    (defined in the package; the deprecated shim, which warns when imported and only
    re-exports, is not imported here), and the TransformerLens tools the docs call by bare
    name. Every module, imported here: the modules found in ``sys.modules`` depended on the
    tests the process had run before (`hooked_attnres.cli` after a command-line test)."""
    import importlib
    import pkgutil

    import transformer_lens.tools.analysis as tl_tools

    import hooked_attnres

    names = [m.name for m in pkgutil.walk_packages(hooked_attnres.__path__, "hooked_attnres.")]
    shims = {"hooked_attnres.training.study"}
    modules = [hooked_attnres] + [importlib.import_module(n) for n in names if n not in shims]
    found: dict[str, list] = {}
    for module in modules:
        for name, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", "").startswith("hooked_attnres")
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and defined_here:
                if obj not in found.setdefault(name, []):
                    found[name].append(obj)
    for name in ("logit_lens", "logit_readout", "direct_logit_attribution"):
        found.setdefault(name, []).append(getattr(tl_tools, name))
    return found


def check_prose_calls(spans, candidates: dict[str, list], functions: dict[str, list]) -> int:
    """Every call of a span whose function is found binds to that function's signature
    (argument names, and the number of positional arguments unless ``...`` stands for
    some): ``base.method(...)`` with ``base`` a key of ``candidates`` (objects the docs
    call it on: any one that has the method and binds will do; none having it fails),
    ``Class.method`` of a package class, ``hooked_attnres...f`` / ``transformer_lens...f``
    by import, a bare name among ``functions``, else a method of the ``candidates``
    (a span such as `accumulated_resid(apply_ln=True)`). Returns how many calls were
    checked; raises ``AssertionError`` listing every call that does not bind."""
    import builtins
    import importlib

    def targets(func: ast.expr) -> Optional[list]:
        if isinstance(func, ast.Name):
            if func.id in dir(builtins):  # `float("inf")`, `len()`: not the model's methods
                return None
            if func.id in functions:
                return functions[func.id]
            found = [
                getattr(c, func.id) for cs in candidates.values() for c in cs if hasattr(c, func.id)
            ]
            return [f for f in found if callable(f)] or None
        if not isinstance(func, ast.Attribute):
            return None
        base = ast.unparse(func.value)
        if base in candidates:
            return [getattr(c, func.attr) for c in candidates[base] if hasattr(c, func.attr)]
        if base in functions and all(inspect.isclass(c) for c in functions[base]):
            return [getattr(c, func.attr) for c in functions[base] if hasattr(c, func.attr)]
        if base.split(".")[0] in ("hooked_attnres", "transformer_lens"):
            try:
                module = importlib.import_module(base)
            except ImportError:
                return None
            return [getattr(module, func.attr)] if hasattr(module, func.attr) else []
        return None

    wrong, checked = [], 0
    for page, span in spans:
        tree = _span_expression(span)
        for node in ast.walk(tree) if tree is not None else ():
            if not isinstance(node, ast.Call):
                continue
            found = targets(node.func)
            if found is None:
                continue
            elided = any(isinstance(a, ast.Starred) or ast.unparse(a) == "..." for a in node.args)
            positional = [] if elided else node.args
            keywords = {k.arg: None for k in node.keywords if k.arg}
            errors = []
            for function in found:
                try:
                    inspect.signature(function).bind_partial(*positional, **keywords)
                    break
                except TypeError as error:
                    errors.append(str(error))
                except ValueError:  # no signature (a builtin): nothing to check
                    break
            else:
                wrong.append(f"{page}: `{span}`: {errors or 'no such function'}")
            checked += 1
    assert not wrong, "calls in the docs that do not bind:\n" + "\n".join(wrong)
    return checked


def test_calls_written_in_the_prose_name_real_arguments(tokens):
    from hooked_attnres import KeyValueCache
    from hooked_attnres.analysis import RoutingAttribution
    from hooked_attnres.study import get_condition

    model = tiny_model(attnres_layout="kimi")
    _, cache = model.run_with_cache(tokens)
    candidates = {
        "model": [model],
        "cache": [cache, KeyValueCache.init_cache(model.cfg)],  # both are called `cache`
        "clean_cache": [cache],
        "site": [model.site(1, "attn_res")],
        "state": [model.embed_state(tokens)],
        # `.verify_top(k)` (an attribution result: an instance, for the binding),
        # `.build(seed, tokenizer)` (a study condition), `.bool()`
        "_any": [
            model,
            cache,
            RoutingAttribution.__new__(RoutingAttribution),
            get_condition("attnres"),
            tokens,
        ],
    }
    checked = check_prose_calls(_inline_spans(), candidates, _public_callables())
    # a floor near the count (529 in session 23): a drop of whole packages from
    # `_public_callables` (the lazy `study` package once took 44 calls out) fails here
    assert checked >= 500, checked


def test_the_public_callables_do_not_depend_on_the_tests_run_before(monkeypatch):
    """Audit 214: the prose checker took the package's modules then in ``sys.modules``, so
    `hooked_attnres.cli`'s functions were candidates only in a pytest worker that had run
    a command-line test before (725 names in a fresh process, 755 after every module was
    imported): which calls were checked depended on the order of the tests."""
    import sys

    import hooked_attnres

    before = _public_callables()
    monkeypatch.delitem(sys.modules, "hooked_attnres.cli", raising=False)
    monkeypatch.delattr(hooked_attnres, "cli", raising=False)  # as in a fresh process
    fresh = _public_callables()
    monkeypatch.undo()  # this process's cli module back
    assert fresh.keys() == before.keys() and "default_threads" in fresh


def test_the_prose_call_checker_catches_a_wrong_call():
    model = tiny_model()
    functions, candidates = _public_callables(), {"model": [model], "_any": [model]}
    right = ["routing_mass(model, prompts, positions=..., attention_mask=)", ".to(device)"]
    assert check_prose_calls([("p", s) for s in right], candidates, functions) == 2
    wrong = {
        "routing_mass(model, batch, mask=m)": "unexpected keyword argument 'mask'",
        "metric_name(metric, 2)": "too many positional arguments",
        "model.depth_states(tokens, sublayer=True)": "sublayer",
        "model.routing_mass(batch)": "no such function",
        ".verify_top(k)": "no such function",  # no candidate has it here
    }
    for span, message in wrong.items():
        with pytest.raises(AssertionError, match=re.escape(message)):
            check_prose_calls([("p", span)], candidates, functions)
    # not calls of the package: formulas, messages, Python's own functions
    other = ["sqrt(mean(s**2) + eps)", "float('inf')", "invalid literal for int()"]
    assert check_prose_calls([("p", s) for s in other], candidates, functions) == 0


def test_values_the_prose_states_are_the_real_ones():
    """A sentence "`f(...)` is `value`" (`claim_text("M1")` is `"embedding through early MLP
    routers"`) holds: the call, of the package's function of that name, gives the value."""
    functions = _public_callables()
    checked = 0
    for page in MARKDOWN:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for call, stated in re.findall(r"`(\w+\([^`]*\))` is `([^`]+)`", text):
            found, value = _leading_literal(stated)
            name = call.split("(")[0]
            if not found or name not in functions:
                continue
            (function,) = functions[name]
            assert eval(call, {name: function}) == value, (page.name, call)  # noqa: S307
            checked += 1
    assert checked >= 2


# ---- command lines written in the docs (`hooked-attnres study --checkpoints runs`, the
# bash blocks) name real commands and options, and parse as the command line reads them


def _documented_commands() -> list[tuple[str, str, bool]]:
    """``(page name, command, complete)`` of every ``hooked-attnres ...`` command of
    README.md and docs/*.md: each line of a bash block (up to a ``#`` comment), and each
    inline code span that starts with one (a span over several lines joined). A bash
    line is a complete command; a span is one unless it has a placeholder (``NAME``,
    ``...``, ``[--option ...]``) or stops at a command or option that needs a value (a
    mention of it: `hooked-attnres info`, `hooked-attnres study --out`)."""
    commands = []
    for page in MARKDOWN:
        text = page.read_text()
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                found = re.search(r"hooked-attnres [^#&|;]*", line)
                if found:
                    commands.append((page.name, found.group(0).strip(), True))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            if span.startswith("hooked-attnres "):
                command = re.split(r"[|;&]", span)[0].strip()
                commands.append((page.name, command, False))
    return commands


def check_commands(commands, parser) -> int:
    """Every command's subcommand is one of ``parser``'s (``COMMAND`` stands for any) and
    every ``--option`` one of that subcommand's (a placeholder or mention included); a
    complete command (see `_documented_commands`) and a span without placeholders
    (``NAME``, ``paperlike_...``, ``[--seeds ...]``) that is no mention parse. Returns how
    many commands were parsed; raises ``AssertionError`` listing every wrong one."""
    import argparse
    import contextlib
    import io
    import shlex

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    wrong, parsed = [], 0
    for page, command, complete in commands:
        words = shlex.split(command)[1:]
        if words and words[0].isupper():  # `hooked-attnres COMMAND --help`
            continue
        if not words or words[0] not in sub.choices:
            wrong.append(f"{page}: `{command}`: no command {words[:1]}")
            continue
        options = sub.choices[words[0]]._option_string_actions
        unknown = [w for w in words if w.startswith("--") and w.split("=")[0] not in options]
        if unknown:
            wrong.append(f"{page}: `{command}`: no option {unknown} of {words[0]}")
            continue
        placeholder = any(w.endswith("...") or w.startswith("[") or w.isupper() for w in words)
        last = sub.choices[words[0]]._option_string_actions.get(words[-1])
        mention = len(words) == 1 or (last is not None and last.nargs != 0)
        if complete or not (placeholder or mention):
            parsed += 1
            error = io.StringIO()
            try:
                with contextlib.redirect_stderr(error):
                    parser.parse_args(words)
            except SystemExit:
                wrong.append(f"{page}: `{command}`: {error.getvalue().strip().splitlines()[-1]}")
    assert not wrong, "command lines in the docs that the command line refuses:\n" + "\n".join(
        wrong
    )
    return parsed


def test_command_lines_in_the_docs_are_the_real_ones():
    """Audit 209: no test read the docs' command lines (45, 6 of them in bash blocks; 15
    parsed whole in session 23: the floor catches a checker that finds none)."""
    from hooked_attnres.cli import build_parser

    commands = _documented_commands()
    assert sum(complete for _, _, complete in commands) >= 5
    assert check_commands(commands, build_parser()) >= 12


def test_the_command_line_checker_catches_a_wrong_command():
    from hooked_attnres.cli import build_parser

    parser = build_parser()
    right = [("p", "hooked-attnres study --checkpoints runs --out x", False)]
    right += [("p", "hooked-attnres info", False), ("p", "hooked-attnres study --out", False)]
    right += [("p", "hooked-attnres train --condition NAME --seeds 0 1 2", False)]
    assert check_commands(right, parser) == 1  # the others are a mention and a placeholder
    wrong = {
        "hooked-attnres study --checkpoint runs": "no option ['--checkpoint'] of study",
        "hooked-attnres evaluate --out x": "no command ['evaluate']",
        "hooked-attnres list --seeds 0": "no option ['--seeds'] of list",
        "hooked-attnres study --prompts 1": "argument --prompts",
        "hooked-attnres train --condition nonsense": "NAME must be one of",
    }
    for command, message in wrong.items():
        with pytest.raises(AssertionError, match=re.escape(message)):
            check_commands([("p", command, True)], parser)
    # a bash line is a complete command: a mention there is refused
    with pytest.raises(AssertionError, match="required: checkpoint"):
        check_commands([("p", "hooked-attnres info", True)], parser)


def test_ci_runs_the_readmes_test_command_verbatim():
    """CI must run what the README tells a user to run: the README's test command is the
    last command of ``.ci/run``, character for character (both once said ``pytest -q``;
    the two could drift apart when one gains an option such as ``-n 2``)."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    after = readme.split("Run the tests", 1)[1]
    command = after.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command.startswith(".venv/bin/python -m pytest"), command
    ci = [
        line.strip()
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-1] == command, (ci[-1], command)
