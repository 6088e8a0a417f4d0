"""The package's architecture rules, checked on its source.

* no import cycles between modules (module-level imports; ``TYPE_CHECKING`` blocks and
  imports inside functions are not edges);
* the library (everything but ``hooked_attnres.study``, the CLI and the deprecated shims)
  never imports the study application, not even inside a function;
* TransformerLens is imported only by ``hooked_attnres/_tl.py``;
* router hook names are formatted only by the layout (``RouterSite.hook``);
* every hook name the layout derives exists in the model;
* a package that imports its names on first use does so with the one loader
  (``hooked_attnres._lazy``), naming for mypy the modules it loads them from.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAYOUTS, tiny_model

PACKAGE = Path(__file__).resolve().parent.parent / "hooked_attnres"
# modules allowed to reach the study application: the app itself, the command line, and
# the deprecated re-exports kept for one release
STUDY_USERS = {
    "hooked_attnres.cli",
    "hooked_attnres.training",
    "hooked_attnres.training.study",
    "hooked_attnres.data",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules imported by a file (``from a.b import c`` counts ``a.b.c`` when it is a module)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes, top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in MODULES
                )
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif not top_level_only or isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(ast.iter_child_nodes(node), top)

    visit(tree.body, True)
    return found


def test_no_import_cycles():
    graph = {
        name: {m for m in imports(path, top_level_only=True) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    for name in graph:
        graph[name] = {
            m
            for m in graph[name]
            if not m.startswith(name + ".")
            or name not in {n for n, p in MODULES.items() if p.name == "__init__.py"}
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_the_study_application():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("hooked_attnres.study") or name in STUDY_USERS:
            continue
        used = {
            m for m in imports(path, top_level_only=False) if m.startswith("hooked_attnres.study")
        }
        if used:
            offenders.append(f"{name} imports {sorted(used)}")
    assert not offenders, offenders


# the packages whose names are imported on first use (a ``_LAZY`` table of name -> module)
LAZY_PACKAGES = sorted(
    name for name, path in MODULES.items() if re.search(r"^_LAZY = ", path.read_text(), re.M)
)


def test_the_lazy_packages_are_found():
    assert LAZY_PACKAGES == ["hooked_attnres", "hooked_attnres.study"]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_a_lazy_package_loads_each_name_with_the_one_loader(package):
    """Review 203: ``hooked_attnres.study`` (lazy since audit 198) had its own copy of the
    package's ``__getattr__`` and ``__dir__``; both are now `hooked_attnres._lazy`'s. The
    ``TYPE_CHECKING`` imports (what mypy sees) name the module of each name the table
    loads it from, ``__all__`` names them all, and each loads the object of its module."""
    module = importlib.import_module(package)
    assert module.__getattr__.__module__ == "hooked_attnres._lazy"
    assert module.__dir__.__module__ == "hooked_attnres._lazy"
    typed = {
        alias.asname or alias.name: node.module
        for block in ast.parse(MODULES[package].read_text()).body
        if isinstance(block, ast.If) and _is_type_checking(block)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == module._LAZY
    assert set(module.__all__) - {"__version__"} == set(module._LAZY)
    for name, where in module._LAZY.items():
        assert getattr(module, name) is getattr(importlib.import_module(where), name)
    with pytest.raises(AttributeError, match=f"^module '{package}' has no attribute 'nope'$"):
        module.nope  # noqa: B018


def test_a_lazy_package_lists_its_names_before_loading_them():
    """``dir()`` (tab completion) of every lazy package lists every name of its
    ``__all__`` without importing torch; ``from package import *`` then loads them (one
    child for all packages: each child pays about 5 s of imports)."""
    code = (
        "import sys, importlib\n"
        f"packages = {list(LAZY_PACKAGES)!r}\n"
        "modules = [importlib.import_module(p) for p in packages]\n"
        "for m in modules:\n"
        "    print(sorted(set(m.__all__) - set(dir(m))), 'torch' in sys.modules)\n"
        "for p, m in zip(packages, modules):\n"
        "    scope = {}\n"
        "    exec(f'from {p} import *', scope)\n"
        "    print(all(name in scope for name in m.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n = len(LAZY_PACKAGES)
    assert n >= 2 and out.stdout.split() == ["[]", "False"] * n + ["True"] * n, out.stdout


def test_transformer_lens_is_imported_only_through_tl():
    offenders = [
        name
        for name, path in MODULES.items()
        if name != "hooked_attnres._tl"
        and any(m.split(".")[0] == "transformer_lens" for m in imports(path, top_level_only=False))
    ]
    assert not offenders, offenders


def test_router_hook_names_are_formatted_only_by_the_layout():
    offenders = []
    for name, path in MODULES.items():
        # the layout formats hook names; hf_keys holds parameter-key templates of checkpoint
        # formats (``blocks.{i}.attn_res.query``), which are not hook names
        if name in ("hooked_attnres.model.depth", "hooked_attnres.loading.hf_keys"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if re.search(r"\.hook_(?!dict)|_res\.|^blocks\.", text):
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"hook names formatted outside RouterSite / the layout: {offenders}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_derived_hook_name_exists(layout):
    model = tiny_model(attnres_layout=layout)
    derived = [
        site.hook(h)
        for site in model.sites()
        for h in ("sources", "scale", "logits", "weights", "out")
    ]
    derived += list(model.routing_layout.commit_hooks().values())
    assert derived or layout == "none"
    for name in derived:
        model.check_hook_name(name)
    assert [model.router(site) for site in model.sites()] == [
        model.mod_dict[site.prefix] for site in model.sites()
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_norm_at_each_sublayer_is_the_one_its_hooks_name(layout):
    """`norm_at` (one rule for the cache's analyses, the interventions and attribution):
    sublayer ``2 l`` is ``blocks.l.ln1``, ``2 l + 1`` ``blocks.l.ln2``, ``2 n_layers``
    ``ln_final``; `norm_after` of each router is the norm of the sublayer it feeds.
    Indices outside ``[0, 2 n_layers]`` are refused."""
    model = tiny_model(attnres_layout=layout)
    n_layers = model.cfg.n_layers
    expected = [f"blocks.{i // 2}.ln{1 + i % 2}.hook_scale" for i in range(2 * n_layers)]
    expected.append("ln_final.hook_scale")
    assert [model.norm_at(i).hook_scale.name for i in range(2 * n_layers + 1)] == expected
    for site in model.sites():
        assert model.norm_after(site) is model.norm_at(site.sublayer)
    with pytest.raises(ValueError, match=r"sublayer must be in \[0, 8\], got 9"):
        model.norm_at(2 * n_layers + 1)
    with pytest.raises(ValueError, match="sublayer must be an integer >= 0, got -1"):
        model.norm_at(-1)
