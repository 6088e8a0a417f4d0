"""Every demo runs offline: the notebooks (executed with nbclient) and the quickstart."""

from __future__ import annotations

import runpy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

DEMOS = Path(__file__).resolve().parents[1] / "demos"
NOTEBOOKS = sorted(DEMOS.glob("*.ipynb"))


def test_there_are_demo_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    # every code cell produced something to look at
    assert all(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def test_notebooks_are_built_from_the_builder():
    import nbformat as nbf

    namespace = runpy.run_path(str(DEMOS / "build_notebooks.py"))
    for name, cells in namespace["NOTEBOOKS"].items():
        stored = nbf.read(DEMOS / name, as_version=4)
        assert [c.source for c in stored.cells] == [c.source for c in cells], name
