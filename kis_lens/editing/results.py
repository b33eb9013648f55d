"""Where edit simulations are saved and which of them belong to a matrices run: the one definition of that layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kis_lens.io import load_json_object

# Where a simulation's results go, the only definition of that layout: <output_dir>/edit_sim/<model>/layer_L_nT/.
EDIT_SIM_FOLDER = "edit_sim"
EDIT_SIM_FILE = "edit_sim.json"
_RUN_FOLDER = "layer_{layer}_n{n_edits}"
# What ties a simulation to a matrices run besides the model: the same facts source and corpus, as both configs
# record them.
RUN_IDENTITY_FIELDS: tuple[str, ...] = ("facts", "corpus")


def edit_sim_dir(output_dir: str | Path, model: str, layer: int, n_edits: int) -> Path:
    """Return a simulation's folder (edit_sim.json, figures): <output_dir>/edit_sim/<model>/layer_<layer>_n<n_edits>."""
    return Path(output_dir) / EDIT_SIM_FOLDER / model / _RUN_FOLDER.format(layer=layer, n_edits=n_edits)


def find_edit_sims(output_dir: str | Path, model: str) -> list[Path]:
    """Return the edit_sim.json of every simulation of the model saved under output_dir, sorted by path."""
    pattern = f"{_RUN_FOLDER.format(layer='*', n_edits='*')}/{EDIT_SIM_FILE}"
    return sorted((Path(output_dir) / EDIT_SIM_FOLDER / model).glob(pattern))


def belongs_to_run(simulation_settings: dict[str, Any], run_settings: dict[str, Any]) -> bool:
    """Return whether a saved simulation ran on a run's model, facts source and corpus (no if a field is missing)."""
    model = (simulation_settings.get("model") or {}).get("name")
    if model is None or model != (run_settings.get("model") or {}).get("name"):
        return False
    simulation_config, run_config = simulation_settings.get("config") or {}, run_settings.get("config") or {}
    return all(
        simulation_config.get(name) is not None and simulation_config.get(name) == run_config.get(name)
        for name in RUN_IDENTITY_FIELDS
    )


def edit_sims_of_run(run_settings: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Return (path, saved edit_sim.json) of every simulation under a run's output dir that belongs to the run."""
    model = (run_settings.get("model") or {}).get("name")
    if not model:
        return []
    output_dir = (run_settings.get("config") or {}).get("output_dir", "")
    found = []
    for path in find_edit_sims(output_dir, model):
        saved = load_json_object(path, "rerun `kis edit-sim` with the settings that wrote it, or delete it")
        if belongs_to_run(saved.get("settings") or {}, run_settings):
            found.append((path, saved))
    return found


# Where a real lifelong-editing run (`kis lifelong`) saves its results, the only definition of that layout:
# <output_dir>/<model>/lifelong/layer_L/<stem>.json, one file per run, the stem "lifelong_<editor>_seed<S>_n<N>_
# layer<L>_<hash8>" (kis_lens.editing.runs.run_stem); <stem>.partial.json + <stem>.partial.safetensors beside it
# while the run is in progress (a checkpoint, never a result). Runs of other seeds or settings share the folder.
# An older kis wrote lifelong_<editor>.json (legacy: no identity in its settings).
LIFELONG_FOLDER = "lifelong"
LIFELONG_LAYER_PREFIX = "layer_"
LIFELONG_FILE_PREFIX = "lifelong_"
LIFELONG_PARTIAL_MARK = ".partial."  # in the name of every checkpoint file (runs.STATE_SUFFIX, TENSORS_SUFFIX)


def lifelong_dir(output_dir: str | Path, model: str, layer: int) -> Path:
    """Return a lifelong run's folder: <output_dir>/<model>/lifelong/layer_<layer> (one <stem>.json per run)."""
    return Path(output_dir) / model / LIFELONG_FOLDER / f"{LIFELONG_LAYER_PREFIX}{layer}"


def lifelong_file(folder: str | Path, name: str, suffix: str = ".json") -> Path:
    """Return folder/lifelong_<name><suffix>: a legacy file by editor ("rome"), or a run by its stem's tail."""
    name = name.removeprefix(LIFELONG_FILE_PREFIX)
    return Path(folder) / f"{LIFELONG_FILE_PREFIX}{name}{suffix}"


def is_lifelong_result(path: str | Path) -> bool:
    """Return whether a file name is a finished lifelong result: lifelong_*.json, not a *.partial.json checkpoint."""
    name = Path(path).name
    return name.startswith(LIFELONG_FILE_PREFIX) and name.endswith(".json") and LIFELONG_PARTIAL_MARK not in name


def lifelong_result_files(folder: str | Path) -> list[Path]:
    """Return every finished lifelong result in folder (checkpoints left out), sorted by name."""
    folder = Path(folder)
    return sorted(path for path in folder.glob(f"{LIFELONG_FILE_PREFIX}*.json") if is_lifelong_result(path))


def find_lifelong_folders(output_dir: str | Path, model: str) -> list[Path]:
    """Return every <output_dir>/<model>/lifelong/layer_*/ folder holding a finished run, sorted by layer."""
    base = Path(output_dir) / model / LIFELONG_FOLDER
    folders = {
        path.parent
        for path in base.glob(f"{LIFELONG_LAYER_PREFIX}*/{LIFELONG_FILE_PREFIX}*.json")
        if is_lifelong_result(path)
    }

    def layer(folder: Path) -> tuple[int, str]:
        number = folder.name.removeprefix(LIFELONG_LAYER_PREFIX)
        return (int(number), "") if number.isdigit() else (10**9, folder.name)

    return sorted(folders, key=layer)
