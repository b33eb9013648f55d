"""Execute the tutorials in place and store their outputs, so GitHub shows each notebook with its results.

    python tutorials/execute.py              # every notebook, each on its model in MODELS
    python tutorials/execute.py 01 03        # the notebooks whose names start so
    python tutorials/execute.py --check      # change nothing; exit 1, naming them, if stored outputs are stale

Each notebook runs top to bottom in a fresh kernel (nbclient) with figures as PNG images (GitHub runs no
Plotly JavaScript), in an empty working directory and with TMPDIR pointing at an empty folder: a notebook
that leaves anything in either fails here. Its metadata["kis_lens"] records the kis_lens version, the model
(the kernel's ``MODEL``), the device, the run's seconds and the sha256 of every code cell's source, so
tests/system/test_tutorials.py fails when a cell is edited without re-executing the notebook, or when the
version moves on. Needs the dev extras (nbclient, nbformat, ipykernel, kaleido with a Chrome it can drive).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
METADATA_KEY = "kis_lens"
NO_OUTPUT_TAG = "no-output"  # a code cell that legitimately prints and shows nothing
PLOTLY_JSON = "application/vnd.plotly.v1+json"  # an interactive figure: its data, which GitHub does not draw
# The model each stored notebook runs on: SmolLM2-135M where its numbers are the point, the tiny random
# GPT-2 where the mechanism is (04 builds its own float64 tiny model) or SmolLM2 would take too long on a CPU
# (05: over 20 minutes on a 2-core CPU).
MODELS = {
    "01_superposition_in_5_minutes": "smollm2-135m",
    "02_hook_utilities": "smollm2-135m",
    "03_reproducing_the_paper": "smollm2-135m",
    "04_why_lifelong_editing_fails": "tiny-gpt2",
    "05_watching_lifelong_editing_collapse": "tiny-gpt2",
}
# Run before the first cell, never stored: kaleido's Chrome driver (choreographer) logs a recoverable wire error
# with its traceback now and then while exporting a PNG; the figure is exported all the same (checked below).
_SETUP = "import logging as _logging\n_logging.getLogger('choreographer').setLevel(_logging.CRITICAL)"
# Run after the last cell, never stored: what the notebook really used.
_QUERY = (
    "import json as _json, torch as _torch\n"
    "print(_json.dumps({'model': str(globals().get('MODEL')), 'device': str(globals().get('DEVICE', 'cpu')),"
    " 'torch': _torch.__version__}))"
)


# Where a kernel's temporary files go: TMPDIR, and torch's compile cache (torchinductor_<user>, which torch
# puts in the temp folder on import and keeps there as a cache shared by every run) beside it.
SCRATCH_VARIABLES = ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")


def scratch_environment(tmpdir: Path, caches: Path) -> dict[str, str]:
    """Return the variables that send a kernel's temporary files to tmpdir and torch's caches to caches."""
    return {"TMPDIR": str(tmpdir), "TORCHINDUCTOR_CACHE_DIR": str(caches / "torchinductor")}


def source_hash(cell: dict[str, Any]) -> str:
    """Return the sha256 (hex) of a cell's source text."""
    source = cell.get("source", "")
    text = "".join(source) if isinstance(source, list) else source
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_cells(notebook: dict[str, Any]) -> list[dict[str, Any]]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def recorded(notebook: dict[str, Any]) -> dict[str, Any]:
    """Return what execute() recorded in the notebook's metadata ({} if it never ran)."""
    return notebook.get("metadata", {}).get(METADATA_KEY, {})


def stale_cells(notebook: dict[str, Any], version: str) -> list[str]:
    """Return why the stored outputs are older than the code they show ([] when they are not).

    Each code cell's source must hash to what was recorded when the notebook was executed, no code cell may be
    added or removed since, and the recorded kis_lens version must be ``version``."""
    record = recorded(notebook)
    if not record:
        return [f"never executed by tutorials/execute.py (no metadata[{METADATA_KEY!r}])"]
    problems = []
    if record.get("version") != version:
        problems.append(f"executed with kis_lens {record.get('version')}, the package is {version}")
    hashes = record.get("cells", {})
    cells = code_cells(notebook)
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        wanted = hashes.get(cell.get("id"))
        if wanted is None:
            problems.append(f"cell {index} (id {cell.get('id')}) is new since the notebook was executed")
        elif wanted != source_hash(cell):
            problems.append(f"cell {index} (id {cell.get('id')}) was edited since the notebook was executed")
    removed = set(hashes) - {cell.get("id") for cell in cells}
    if removed:
        problems.append(f"code cells {sorted(removed)} were removed since the notebook was executed")
    return problems


def cells_without_outputs(notebook: dict[str, Any]) -> list[str]:
    """Return the code cells that store no output although not tagged no-output (or tagged but with outputs)."""
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        tagged = NO_OUTPUT_TAG in cell.get("metadata", {}).get("tags", [])
        if not cell.get("outputs") and not tagged:
            problems.append(
                f"cell {index} (id {cell.get('id')}) stores no output: execute it or tag it {NO_OUTPUT_TAG}"
            )
        elif cell.get("outputs") and tagged:
            problems.append(f"cell {index} (id {cell.get('id')}) is tagged {NO_OUTPUT_TAG!r} but has outputs")
    return problems


def noisy_outputs(notebook: dict[str, Any]) -> list[str]:
    """Return the code cells whose stored output shows a traceback or a path of a machine (the checkout, home, an
    installed package's)."""
    machine = [str(ROOT), str(Path.home()), "site-packages"]
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            if "Traceback (most recent call last)" in text:
                problems.append(f"cell {index} (id {cell.get('id')}) stores a traceback")
            elif any(path in text for path in machine):
                problems.append(f"cell {index} (id {cell.get('id')}) stores a machine path")
    return problems


def _sync_cells():
    spec = importlib.util.spec_from_file_location("kis_tutorials_sync_cells", TUTORIALS / "sync_cells.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _version() -> str:
    sys.path.insert(0, str(ROOT))
    from kis_lens import __version__

    return __version__


def run_notebook(
    notebook: Any, model: str, workdir: Path, tmpdir: Path, caches: Path, timeout: int = 1800, log: bool = False
) -> dict[str, Any]:
    """Execute an nbformat notebook in memory (its outputs replaced) in a fresh kernel; return what it used.

    The kernel runs in workdir with TMPDIR=tmpdir (torch's compile cache under caches) and figures as PNG images;
    nothing is written to disk here. Returns {"model", "device", "torch", "seconds"}: the kernel's MODEL and
    DEVICE after the last cell. Raises nbclient's CellExecutionError on the first cell that fails."""
    import nbclient
    import nbformat

    for cell in code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    setup, query = nbformat.v4.new_code_cell(_SETUP), nbformat.v4.new_code_cell(_QUERY)
    notebook.cells.insert(0, setup)
    notebook.cells.append(query)
    environment = {
        **os.environ,
        "KIS_TUTORIAL_MODEL": model,
        "KIS_TUTORIAL_INTERACTIVE": "0",  # figures as PNG images: what GitHub can show
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore:IProgress not found",
        **scratch_environment(tmpdir, caches),
    }
    started: dict[int, float] = {}

    def cell_started(cell: Any, cell_index: int, **_: Any) -> None:
        started[cell_index] = time.perf_counter()

    def cell_done(cell: Any, cell_index: int, **_: Any) -> None:
        if log and cell is not query and cell is not setup:  # the notebook's own index: setup went first
            seconds = time.perf_counter() - started[cell_index]
            print(f"  cell {cell_index - 1:2d} ({cell.id}): {seconds:6.1f} s", flush=True)

    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
        on_cell_start=cell_started,
        on_cell_executed=cell_done,
    )
    began = time.perf_counter()
    try:
        client.execute(env=environment)
    finally:
        notebook.cells.remove(setup)
        notebook.cells.remove(query)
    facts = json.loads("".join(output.get("text", "") for output in query.outputs if output.get("name") == "stdout"))
    return {**facts, "seconds": round(time.perf_counter() - began)}


def execute(path: Path, model: str, timeout: int = 1800) -> dict[str, Any]:
    """Execute the notebook at path on model, store its outputs and metadata in place; return the record.

    Stores nothing when the notebook leaves files in its working directory or temp folder, when a code cell
    not tagged no-output shows nothing, or when a figure is not a PNG image."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    # a short path: under a long TMPDIR Chrome (kaleido's PNG export) cannot open its socket and fails to start
    with tempfile.TemporaryDirectory(prefix="kis_execute_") as scratch:
        workdir, tmpdir, caches = Path(scratch, "cwd"), Path(scratch, "tmp"), Path(scratch, "caches")
        workdir.mkdir(), tmpdir.mkdir()
        facts = run_notebook(notebook, model, workdir, tmpdir, caches, timeout=timeout, log=True)
        left = sorted(str(p.relative_to(scratch)) for p in [*workdir.iterdir(), *tmpdir.iterdir()])
    if left:
        raise SystemExit(f"{path.name} left {left} behind: remove them in the notebook (nothing stored)")
    record = {
        "executed_by": "tutorials/execute.py",
        "version": _version(),
        **facts,
        "cells": {cell.id: source_hash(cell) for cell in code_cells(notebook)},
    }
    notebook.metadata[METADATA_KEY] = record
    stored = json.loads(nbformat.writes(notebook))
    problems = cells_without_outputs(stored) + noisy_outputs(stored)
    if any(PLOTLY_JSON in output.get("data", {}) for cell in code_cells(stored) for output in cell["outputs"]):
        problems.append("figures were not exported as PNG (GitHub would show none): pip install kaleido")
    if problems:
        raise SystemExit(f"{path.name} (nothing stored): " + "; ".join(problems))
    path.write_text(_sync_cells().notebook_text(stored), encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Execute (or with --check only inspect) the named tutorials, or all; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks whose file names start with one of these (default: all)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stored outputs are stale")
    parser.add_argument("--model", help="run every named notebook on this model instead of MODELS' choice")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    args = parser.parse_args(argv)
    paths = [
        path
        for path in sorted(TUTORIALS.glob("*.ipynb"))
        if not args.names or any(path.name.startswith(name) for name in args.names)
    ]
    if not paths:
        parser.error(f"no tutorial matches {args.names}")
    if args.check:
        version, status = _version(), 0
        for path in paths:
            notebook = json.loads(path.read_text(encoding="utf-8"))
            for problem in stale_cells(notebook, version) + cells_without_outputs(notebook):
                print(f"{path.relative_to(ROOT)}: {problem}")
                status = 1
        if status:
            print("run `python tutorials/execute.py` to re-execute them")
        return status
    stale = _sync_cells().sync(paths, check=True)
    if stale:
        raise SystemExit(f"run `python tutorials/sync_cells.py` first: {[p.name for p in stale]}")
    for path in paths:
        model = args.model or MODELS.get(path.stem, "tiny-gpt2")
        print(f"{path.name}: executing on {model} ...", flush=True)
        record = execute(path, model, timeout=args.timeout)
        size = path.stat().st_size / 1e6
        print(f"{path.name}: {record['model']} on {record['device']}, {record['seconds']} s, {size:.2f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
