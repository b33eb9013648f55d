"""Execute every notebook in tutorials/ top to bottom on the small offline configuration; any cell error fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install nbformat nbclient ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install nbformat nbclient ipykernel)")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# The random tiny GPT-2 keeps CI fast; the notebooks default to SmolLM2-135M when it is installed.
CI_MODEL = os.environ.get("KIS_TUTORIAL_MODEL", "tiny-gpt2")


def test_the_tutorials_exist():
    assert {"01_superposition_in_5_minutes", "02_hook_utilities", "03_reproducing_the_paper"} <= {
        path.stem for path in NOTEBOOKS
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_runs_without_errors(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0].source
    assert "colab.research.google.com/assets/colab-badge.svg" in first and f"tutorials/{path.name}" in first
    assert "IN_COLAB" in notebook.cells[1].source  # the install cell, which pip-installs only on Colab
    monkeypatch.setenv("KIS_TUTORIAL_MODEL", CI_MODEL)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert errors == []
    figures = sum(
        "application/vnd.plotly.v1+json" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    assert figures >= 1  # each tutorial shows at least one interactive figure
