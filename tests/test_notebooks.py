"""Notebooks are executed top to bottom (small settings): a notebook that does not run is a bug."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: one CPU device, like a laptop
    monkeypatch.setenv("T5K_NOTEBOOK_STEPS", "20")
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
