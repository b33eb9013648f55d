"""Where every kis_lens result lives on disk, and which saved results belong to a run: the one definition of both.

Every path is a small function of plain strings and numbers (a caller passes ``model_info(model).name``, never a
model), so readers and writers of a result agree by calling the same function. Under ``<output_dir>``:

- ``stats/<model>/<corpus>_stats/layer_<L>_mom2.safetensors``: covariance caches (``checkpoints/`` beside them);
  a cache of texts [start, stop) of a corpus only (`kis reproduce`'s quarters) names them in its folder,
  ``<corpus>_<part>_texts<start>-<stop>_stats``
- ``runs/<model>/<knowledge_type>_sample_size_<n>/<token_position>/results.safetensors``: a matrices run
  (``report.html`` and ``layer_summary.csv`` beside it)
- ``<matrix dir>/<model>/<knowledge_type>_sample_size_<n>/layer_<L>_<position>_<suffix>.npy``: the original
  scripts' per-layer tree
- ``knowledge/<model>/<facts>_split.json``: a model's known/unknown split of a fact set
- ``trace/<model>/causal_trace_<kind>_w<window>.json``: a causal trace
- ``edit_sim/<model>/layer_<L>_n<N>/edit_sim.json``: an edit simulation
- ``lifelong/<model>/layer_<L>/lifelong_<stem>.json``: lifelong runs

- ``reproduction/<model>/``: `kis reproduce`'s document, figures and numbers (``--docs_dir .``: the repository's
  ``docs/`` and ``benchmarks/results/``)

Every job run from the CLI also leaves a run file (every setting, for ``kis --config``; kis_lens.run_file) beside
what it wrote: ``run.yaml`` in a folder of one run (a matrices run, an edit simulation), ``<result stem>.yaml``
beside a result that shares its folder with others (a trace, a split, a reproduction's numbers), and
``<command>.yaml`` in a folder several runs write into (``cache-cov.yaml``, ``lifelong.yaml``).

Older kis_lens wrote traces and lifelong runs model-first (``<model>/trace/``, ``<model>/lifelong/layer_<L>/``).
Readers find them there too; a job about to write moves the older folder it writes into to the kind-first place
(``writable_trace_path``, ``writable_lifelong_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from kis_lens.errors import KisError

# ------------------------------------------------------------------------------------------- covariance caches

STATS_FOLDER = "stats"
CHECKPOINTS_FOLDER = "checkpoints"
STATS_GLOB = "layer_*_mom2.safetensors"


def path_component(name: str, what: str) -> str:
    """Return name if it is one safe folder name (no separator, not "." or ".."), else raise KisError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise KisError(f"{what} {name!r} cannot name a folder inside the output directory: use a plain name")
    return name


def stats_dir(output_dir: str | Path, model: str, corpus: str, root: str | Path | None = None) -> Path:
    """Return the folder of a model's caches for a corpus: {root or output_dir/stats}/{model}/{corpus}_stats."""
    return (
        (Path(output_dir) / STATS_FOLDER if root is None else Path(root))
        / path_component(model, "model name")
        / f"{path_component(corpus, 'corpus name')}_stats"
    )


def stats_path(output_dir: str | Path, model: str, corpus: str, layer: int, root: str | Path | None = None) -> Path:
    """Return where a layer's cache lives: stats_dir(output_dir, model, corpus, root)/layer_{L}_mom2.safetensors."""
    return stats_dir(output_dir, model, corpus, root) / f"layer_{layer}_mom2.safetensors"


def stats_files(folder: str | Path) -> list[Path]:
    """Return the layer caches (layer_*_mom2.safetensors) in a folder of caches, sorted by name."""
    return sorted(Path(folder).glob(STATS_GLOB))


def checkpoints_dir(stats_folder: str | Path) -> Path:
    """Return the folder of a cache job's checkpoints: <stats_dir>/checkpoints."""
    return Path(stats_folder) / CHECKPOINTS_FOLDER


def part_cache_name(corpus: str, part: str, start: int, stop: int) -> str:
    """Return the corpus name that folders a cache of texts [start, stop) alone: <corpus>_<part>_texts<start>-<stop>."""
    return f"{corpus}_{path_component(part, 'text range name')}_texts{start}-{stop}"


# ---------------------------------------------------------------------------------------------- matrices runs

RUNS_FOLDER = "runs"
RESULTS_FILE = "results.safetensors"
REPORT_NAME = "report.html"
SUMMARY_CSV_NAME = "layer_summary.csv"


def run_dir(output_dir: str | Path, model: str, knowledge_type: str, n_facts: int, token_position: str) -> Path:
    """Return a run's folder: <output_dir>/runs/<model>/<knowledge_type>_sample_size_<n_facts>/<token_position>."""
    return Path(output_dir) / RUNS_FOLDER / model / f"{knowledge_type}_sample_size_{n_facts}" / token_position


def run_of_results_file(path: str | Path) -> tuple[Path, str, str, str] | None:
    """Return (output_dir, model, <knowledge_type>_sample_size_<n>, token_position) of a results file, else None."""
    parts = Path(path).parts
    if len(parts) < 5 or parts[-5] != RUNS_FOLDER:
        return None
    return (Path(*parts[:-5]) if len(parts) > 5 else Path("."), parts[-4], parts[-3], parts[-2])


def latest_results(output_dir: str | Path) -> Path:
    """Return the most recently written results.safetensors under <output_dir>/runs; KisError when there is none."""
    found = list(Path(output_dir).glob(f"{RUNS_FOLDER}/**/{RESULTS_FILE}"))
    if not found:
        raise KisError(f"no run under {output_dir}/{RUNS_FOLDER}: run `kis all` first, or pass --results <run folder>")
    return max(found, key=lambda path: (path.stat().st_mtime_ns, str(path)))


def find_results(path: str | Path) -> Path:
    """Return the results.safetensors of a run folder, a results file, or an output dir holding exactly one run."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / RESULTS_FILE).is_file():
        return path / RESULTS_FILE
    found = sorted(path.glob(f"{RUNS_FOLDER}/**/{RESULTS_FILE}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise KisError(f"no {RESULTS_FILE} in or under {path}: run `kis all` first, or give the run folder")
    listing = "\n  ".join(str(item.parent) for item in found)
    raise KisError(f"{path} holds {len(found)} runs; pick one with --results:\n  {listing}")


def report_path(results_file: str | Path) -> Path:
    """Return where a run's report goes by default: report.html beside its results file."""
    return Path(results_file).parent / REPORT_NAME


def summary_csv_path(report: str | Path) -> Path:
    """Return where a report's per-layer table goes: layer_summary.csv beside the report."""
    return Path(report).parent / SUMMARY_CSV_NAME


# ------------------------------------------------------------------------------- the original scripts' .npy tree

# The original scripts' directory name for each matrix.
LEGACY_DIRS: dict[str, str] = {
    "p_matrix": "p_matrix",
    "q_matrix": "q_matrix",
    "whitening_cos": "whitening_cos_matrix",
    "activation_cos": "activation_cos_matrix",
}
# How the original scripts end each matrix's file name: both cosines end in _cos_matrix.npy.
LEGACY_SUFFIXES: dict[str, str] = {
    "p_matrix": "p_matrix",
    "q_matrix": "q_matrix",
    "whitening_cos": "cos_matrix",
    "activation_cos": "cos_matrix",
}
# The file name the original scripts write whatever --fact_token was.
ORIGINAL_POSITION = "subject_last"


def legacy_npy_path(
    output_dir: str | Path, name: str, model_folder: str, knowledge_type: str, n_facts: int, layer: int, position: str
) -> Path:
    """Return the per-layer .npy path of a matrix in the original scripts' tree, under a given model folder."""
    folder = Path(output_dir) / LEGACY_DIRS[name] / model_folder / f"{knowledge_type}_sample_size_{n_facts}"
    return folder / f"layer_{layer}_{position}_{LEGACY_SUFFIXES[name]}.npy"


def original_npy_path(
    output_dir: str | Path, name: str, model_folder: str, knowledge_type: str, n_facts: int, layer: int
) -> Path:
    """Return the exact path the original scripts write a matrix of a layer to (model_folder: their --model_name)."""
    return legacy_npy_path(output_dir, name, model_folder, knowledge_type, n_facts, layer, ORIGINAL_POSITION)


# ------------------------------------------------------------------------------------ knowledge splits, traces

KNOWLEDGE_FOLDER = "knowledge"
TRACE_FOLDER = "trace"


def split_path(output_dir: str | Path, model: str, facts_source: str | Path) -> Path:
    """Return where a model's split of a fact set lives: {output_dir}/knowledge/{model}/{facts}_split.json."""
    return Path(output_dir) / KNOWLEDGE_FOLDER / model / f"{Path(str(facts_source)).stem}_split.json"


def trace_path(output_dir: str | Path, model: str, kind: str, window: int) -> Path:
    """Return the JSON path of a trace: <output_dir>/trace/<model>/causal_trace_<kind>_w<window>.json."""
    return trace_dir(output_dir, model) / f"causal_trace_{kind}_w{window}.json"


def trace_dir(output_dir: str | Path, model: str) -> Path:
    """Return the folder of a model's traces: <output_dir>/trace/<model> (trace_path's folder)."""
    return Path(output_dir) / TRACE_FOLDER / model


def legacy_trace_dir(output_dir: str | Path, model: str) -> Path:
    """Return where an older kis wrote a model's traces: <output_dir>/<model>/trace (model-first)."""
    return Path(output_dir) / model / TRACE_FOLDER


def writable_trace_path(output_dir: str | Path, model: str, kind: str, window: int) -> Path:
    """Return trace_path(...), first moving an older kis's <model>/trace/ folder there when it has none yet."""
    path = trace_path(output_dir, model, kind, window)
    adopt_legacy_folder(legacy_trace_dir(output_dir, model), path.parent)
    return path


def adopt_legacy_folder(old: Path, new: Path) -> None:
    """Move an older layout's folder old to new in one os.replace, saying so, when old exists and new does not.

    When both exist, old is left where it is and said so (find_lifelong_folders reads both). Parents emptied by the
    move are removed, so an output dir migrated in full keeps no empty <model>/ folder."""
    if old == new or not old.is_dir():
        return
    new.parent.mkdir(parents=True, exist_ok=True)
    moved = False
    try:
        if not new.exists():
            os.replace(old, new)  # one rename: a job reading old sees it whole, or not at all
            moved = True
    except FileNotFoundError:  # another job moved it first
        return
    except OSError:  # refused when new appeared meanwhile (another job): anything else is a real error
        if not new.exists():
            raise
    if not moved:  # merging two folders of runs is not ours to do
        print(f"kept {old} where it is (the older model-first layout): {new} exists already")
        return
    print(f"moved {old} to {new} (the kind-first layout of this kis)")
    for parent in old.parents:
        if parent in new.parents:  # the output dir, or above it: never ours to remove
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: it holds other results
            break


# ---------------------------------------------------------------------------------------------- reproductions

REPRODUCTION_PREFIX = "reproduction_"


REPRODUCTION_FOLDER = "reproduction"


def reproduction_paths(
    output_dir: str | Path,
    model: str,
    docs_dir: str | Path | None = None,
    doc_path: str | Path | None = None,
    figures_dir: str | Path | None = None,
    numbers_path: str | Path | None = None,
) -> tuple[Path, Path, Path]:
    """Return where `kis reproduce` writes (document, figures folder, numbers JSON).

    Under <output_dir>/reproduction/<model>/ by default, so a run in a clone never overwrites the committed docs;
    with docs_dir (a repository root, e.g. "."), where the repository keeps them: docs/reproduction.md,
    docs/figures/reproduction/ and benchmarks/results/reproduction_<model>.json. An explicit path wins.
    """
    if docs_dir is None:
        base = Path(output_dir) / REPRODUCTION_FOLDER / path_component(model, "model name")
        defaults = (base / "reproduction.md", base / "figures", base / f"{REPRODUCTION_PREFIX}{model}.json")
    else:
        root = Path(docs_dir)
        defaults = (
            root / "docs" / "reproduction.md",
            root / "docs" / "figures" / "reproduction",
            root / "benchmarks" / "results" / f"{REPRODUCTION_PREFIX}{model}.json",
        )
    chosen = (doc_path, figures_dir, numbers_path)
    doc, figures, numbers = (Path(given) if given else default for given, default in zip(chosen, defaults))
    return doc, figures, numbers


def reproduction_files(folder: str | Path) -> list[Path]:
    """Return every reproduction_*.json in a folder (the model-size table's rows), sorted by name."""
    return sorted(Path(folder).glob(f"{REPRODUCTION_PREFIX}*.json"))


# --------------------------------------------------------------------------------------------- edit simulations

EDIT_SIM_FOLDER = "edit_sim"
EDIT_SIM_FILE = "edit_sim.json"
_EDIT_SIM_RUN_FOLDER = "layer_{layer}_n{n_edits}"


def edit_sim_dir(output_dir: str | Path, model: str, layer: int, n_edits: int) -> Path:
    """Return a simulation's folder (edit_sim.json, figures): <output_dir>/edit_sim/<model>/layer_<layer>_n<n_edits>."""
    return Path(output_dir) / EDIT_SIM_FOLDER / model / _EDIT_SIM_RUN_FOLDER.format(layer=layer, n_edits=n_edits)


def find_edit_sims(output_dir: str | Path, model: str) -> list[Path]:
    """Return the edit_sim.json of every simulation of the model saved under output_dir, sorted by path."""
    pattern = f"{_EDIT_SIM_RUN_FOLDER.format(layer='*', n_edits='*')}/{EDIT_SIM_FILE}"
    return sorted((Path(output_dir) / EDIT_SIM_FOLDER / model).glob(pattern))


# ------------------------------------------------------------------------------------------------ lifelong runs

# <output_dir>/lifelong/<model>/layer_L/<stem>.json, one file per run, the stem "lifelong_<editor>_seed<S>_n<N>_
# layer<L>_<hash8>" (kis_lens.editing.runs.run_stem); <stem>.partial.json + <stem>.partial.safetensors beside it
# while the run is in progress (a checkpoint, never a result). Runs of other seeds or settings share the folder.
# An older kis wrote lifelong_<editor>.json (legacy: no identity in its settings), and an older one still wrote
# every run model-first, <output_dir>/<model>/lifelong/layer_L/: readers look there too, and a job moves the one
# layer folder it is about to write into (its checkpoints resume from the new place).
LIFELONG_FOLDER = "lifelong"
LIFELONG_LAYER_PREFIX = "layer_"
LIFELONG_FILE_PREFIX = "lifelong_"
LIFELONG_PARTIAL_MARK = ".partial."  # in the name of every checkpoint file (runs.STATE_SUFFIX, TENSORS_SUFFIX)


STUDY_FILE = "study"  # <study folder>/study.md and study.json: what `kis study` writes beside a model's runs
STUDY_FIGURES_FOLDER = "study_figures"


def lifelong_study_dir(output_dir: str | Path, model: str) -> Path:
    """Return the folder of a model's lifelong runs, every layer: <output_dir>/lifelong/<model> (a study)."""
    return Path(output_dir) / LIFELONG_FOLDER / model


def lifelong_dir(output_dir: str | Path, model: str, layer: int) -> Path:
    """Return a lifelong run's folder: <output_dir>/lifelong/<model>/layer_<layer> (one <stem>.json per run)."""
    return lifelong_study_dir(output_dir, model) / f"{LIFELONG_LAYER_PREFIX}{layer}"


def legacy_lifelong_study_dir(output_dir: str | Path, model: str) -> Path:
    """Return where an older kis wrote a model's lifelong runs: <output_dir>/<model>/lifelong (model-first)."""
    return Path(output_dir) / model / LIFELONG_FOLDER


def legacy_lifelong_dir(output_dir: str | Path, model: str, layer: int) -> Path:
    """Return where an older kis wrote a lifelong run: <output_dir>/<model>/lifelong/layer_<layer> (model-first)."""
    return legacy_lifelong_study_dir(output_dir, model) / f"{LIFELONG_LAYER_PREFIX}{layer}"


def study_folders(output_dir: str | Path, model: str) -> tuple[Path, Path]:
    """Return (the folder of a model's lifelong runs, of its traces) that `kis study` reads by default: this kis's
    kind-first folders, or an older kis's model-first ones where only those exist."""
    runs, traces = lifelong_study_dir(output_dir, model), trace_dir(output_dir, model)
    if not runs.is_dir() and legacy_lifelong_study_dir(output_dir, model).is_dir():
        runs = legacy_lifelong_study_dir(output_dir, model)
    if not traces.is_dir() and legacy_trace_dir(output_dir, model).is_dir():
        traces = legacy_trace_dir(output_dir, model)
    return runs, traces


def writable_lifelong_dir(output_dir: str | Path, model: str, layer: int) -> Path:
    """Return lifelong_dir(...), first moving an older kis's model-first folder of that layer there if it has none."""
    folder = lifelong_dir(output_dir, model, layer)
    adopt_legacy_folder(legacy_lifelong_dir(output_dir, model, layer), folder)
    return folder


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
    """Return every lifelong/<model>/layer_*/ folder holding a finished run, and every one an older kis wrote at
    <model>/lifelong/layer_*/, sorted by layer (the kind-first one first)."""
    new, old = Path(output_dir) / LIFELONG_FOLDER / model, Path(output_dir) / model / LIFELONG_FOLDER
    folders = {
        path.parent
        for base in (new, old)
        for path in base.glob(f"{LIFELONG_LAYER_PREFIX}*/{LIFELONG_FILE_PREFIX}*.json")
        if is_lifelong_result(path)
    }

    def layer(folder: Path) -> tuple[int, str, bool]:
        number = folder.name.removeprefix(LIFELONG_LAYER_PREFIX)
        legacy = folder.parent != new
        return (int(number), "", legacy) if number.isdigit() else (10**9, folder.name, legacy)

    return sorted(folders, key=layer)


# ----------------------------------------------------------------------------------- which results are a run's

# What ties an edit simulation to a matrices run besides the model: the same facts source and corpus, as both
# configs record them. Lifelong runs edit their own facts with their own C: the model alone ties them.
EDIT_SIM_RUN_FIELDS: tuple[str, ...] = ("facts", "corpus")


def belongs_to_run(settings: Mapping[str, Any], run_settings: Mapping[str, Any], fields: Sequence[str] = ()) -> bool:
    """Return whether saved results ran on a run's model and its config's value of each field (no if one is missing)."""
    model = (settings.get("model") or {}).get("name")
    if model is None or model != (run_settings.get("model") or {}).get("name"):
        return False
    config, run_config = settings.get("config") or {}, run_settings.get("config") or {}
    return all(config.get(name) is not None and config.get(name) == run_config.get(name) for name in fields)


# ------------------------------------------------------------------------------------------------ run files

RUN_FILE = "run.yaml"
RUN_FILE_SUFFIX = ".yaml"


def run_file_in(folder: str | Path, command: str | None = None) -> Path:
    """Return a folder's run file: run.yaml for a folder of one run, <command>.yaml where several runs write."""
    return Path(folder) / (RUN_FILE if command is None else f"{path_component(command, 'command')}{RUN_FILE_SUFFIX}")


def run_file_beside(result_file: str | Path) -> Path:
    """Return the run file of one result among others in its folder: the result's name with .yaml."""
    result_file = Path(result_file)
    path = result_file.with_suffix(RUN_FILE_SUFFIX)
    # A result that is itself .yaml (a --numbers_path given so) keeps its name: the run file goes beside it.
    return path if path != result_file else result_file.with_name(f"{result_file.stem}.run{RUN_FILE_SUFFIX}")
