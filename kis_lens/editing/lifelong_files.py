"""Lifelong run files: load finished runs of ``kis lifelong`` from their folder, name them, and read their numbers.

kis_lens.editing.lifelong writes one ``<stem>.json`` per run into ``<output_dir>/lifelong/<model>/layer_<L>/``
(kis_lens.layout.lifelong_dir), the stem naming the editor, seed, size, layer and a hash of the run's
identity; ``<stem>.partial.json`` beside it is a checkpoint of a run in progress, never a result. Runs of other
seeds or settings may share the folder: ``load_lifelong_results`` loads the runs it is given by stem, or the
newest set of runs sharing one identity. Files of an older kis (``lifelong_<editor>.json`` without an identity)
are legacy: they are re-keyed by what they really ran (LEGACY_EDITORS), and every verdict drawn from them is
marked superseded (kis_lens.docs.lifelong_verdicts). Editors are named, coloured and ordered by the registry
(kis_lens.editing.registry.EDITORS). The figures are kis_lens.editing.lifelong_plots', the documents
kis_lens.docs.lifelong's.

>>> results = load_lifelong_results("results/lifelong/smollm2-135m/layer_4")
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.errors import KisError
from kis_lens.io import load_json_object
from kis_lens.layout import LIFELONG_FILE_PREFIX, lifelong_result_files

# What the editors of an older kis's lifelong_<editor>.json really were. Its "rome" was p-ROME (the plain key for
# direction and scale) with a cut value search; its "memit" a one-layer exact fit with λ on I (now emmet); its
# "alphaedit" a relative null-space threshold and L2 on one layer, which no registered editor reproduces.
LEGACY_EDITORS: dict[str, str] = {"rome": "p-rome", "memit": "emmet", "alphaedit": "alphaedit-legacy", "none": "none"}
LEGACY_SUFFIX = "-legacy"
# Config fields of a legacy run that do not change what it computed: left out when grouping legacy files.
LEGACY_PRESENTATION_FIELDS: tuple[str, ...] = ("editors", "progress", "resume", "device", "output_dir")
# Names the registry does not hold (a legacy editor, or one of a newer or older kis).
FALLBACK_LABELS: dict[str, str] = {"alphaedit-legacy": "AlphaEdit-legacy"}  # its settings: docs.lifelong.legacy_banner
FALLBACK_COLOURS: dict[str, str] = {"alphaedit-legacy": "#98df8a"}
FALLBACK_COLOUR = "#bcbd22"
# Step keys renamed since a run was written: old → new (the metric is the same number).
RENAMED_STEP_KEYS: dict[str, str] = {"generation_efficacy": "argmax_efficacy"}
# The originals' value searches: ROME's compute_v over its 21 templates, MEMIT's compute_z over its 6, 20 steps
FULL_VALUE_SEARCH: dict[str, tuple[int, int]] = {"rome": (21, 20), "memit": (6, 20)}


def editor_label(editor: str, result: Mapping[str, Any] | None = None) -> str:
    """Return an editor's display name: the registry's, a legacy run's real name, a fallback, else its key."""
    if result is not None and result.get("_legacy"):
        config = run_config(result)
        if editor == "emmet":  # its λ on I was the config's covariance_weight
            return f"EMMET-like fit λ={number_text(config.get('covariance_weight'))}"
    if editor in REGISTRY:
        return REGISTRY[editor].label
    return FALLBACK_LABELS.get(editor, editor)


def editor_colour(editor: str) -> str:
    """Return an editor's colour: the registry's, else a fallback."""
    return REGISTRY[editor].colour if editor in REGISTRY else FALLBACK_COLOURS.get(editor, FALLBACK_COLOUR)


def editor_labels(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Return {editor: its display name} of a set of runs (legacy runs named by what they ran)."""
    return {editor: editor_label(editor, result) for editor, result in results.items()}


def _order_key(editor: str) -> tuple[int, int, str]:
    """Return an editor's sort key: its registry position, a legacy variant right after its namesake."""
    names = list(REGISTRY)
    if editor in REGISTRY:
        return names.index(editor), 0, editor
    base = editor.removesuffix(LEGACY_SUFFIX)
    if base != editor and base in REGISTRY:
        return names.index(base), 1, editor  # a legacy variant right after its namesake
    return len(names), 0, editor


def editor_order(editors: Sequence[str]) -> list[str]:
    """Return the editors in registry order, each legacy variant right after its namesake, unknown ones last."""
    return sorted(editors, key=_order_key)


# -------------------------------------------------------------------------------------------------------- loading


def is_legacy(result: Mapping[str, Any]) -> bool:
    """Return whether a results dict was written by an older kis (no run identity in its settings)."""
    return not isinstance(run_settings(result).get("identity"), Mapping)


def _read(path: Path) -> dict[str, Any]:
    return load_json_object(path, "rerun `kis lifelong` for that run or delete the file")


def _editor_of(result: Mapping[str, Any], path: Path) -> str:
    """Return the editor a result ran: the registry name, or for a legacy file what its editor really was."""
    if not is_legacy(result):
        return str(run_settings(result)["identity"].get("editor") or result.get("editor"))
    name = str(result.get("editor") or path.stem.removeprefix(LIFELONG_FILE_PREFIX))
    return LEGACY_EDITORS.get(name, name)


def _group_key(result: Mapping[str, Any]) -> str:
    """Return what runs shown together share: the identity without the editor (legacy: the config's computing part)."""
    if not is_legacy(result):
        shared = {key: value for key, value in run_settings(result)["identity"].items() if key != "editor"}
        return "identity " + json.dumps(shared, sort_keys=True, default=str)
    config = {key: value for key, value in run_config(result).items() if key not in LEGACY_PRESENTATION_FIELDS}
    return "legacy " + json.dumps(config, sort_keys=True, default=str)


def _no_results(folder: Path) -> KisError:
    return KisError(
        f"no lifelong results (lifelong_<editor>_….json) in {folder}: run `kis lifelong` for this model and layer "
        "first, or pass the layer_<L> folder it wrote (a run still in progress has only <stem>.partial.json)"
    )


def lifelong_run_groups(folder: str | Path) -> list[list[str]]:
    """Return the stems of the finished runs in folder, grouped by shared settings, the newest written group first."""
    folder = Path(folder)
    groups: dict[str, list[Path]] = {}
    for path in lifelong_result_files(folder):
        groups.setdefault(_group_key(_read(path)), []).append(path)

    def newest(item: tuple[str, list[Path]]) -> tuple[int, str]:
        return max(path.stat().st_mtime_ns for path in item[1]), item[0]

    return [[path.stem for path in paths] for _, paths in sorted(groups.items(), key=newest, reverse=True)]


def load_lifelong_results(folder: str | Path, stems: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Return finished lifelong runs of folder keyed by editor, in registry order.

    With stems, exactly those runs (<stem>.json each). Without, the newest written group of runs that share their
    settings (their identity but the editor), warning how many runs with other settings were left out. Partial
    checkpoints are never loaded. Each result gets "_source" (its file name) and "_legacy" (written by an older
    kis: then keyed by what it really ran, LEGACY_EDITORS). Two runs of one editor in the set is a KisError."""
    folder = Path(folder)
    if stems is None:
        groups = lifelong_run_groups(folder)
        if not groups:
            raise _no_results(folder)
        stems, others = groups[0], groups[1:]
        if others:
            left_out = [stem for group in others for stem in group]
            shown = ", ".join(left_out[:4]) + (", …" if len(left_out) > 4 else "")
            warnings.warn(
                f"{folder}: showing the newest {len(stems)} run(s) with one set of settings; left out "
                f"{len(left_out)} run(s) with other settings ({len(others)} other set(s): {shown}). Show them with "
                "load_lifelong_results(folder, stems=[...]) (stems: lifelong_run_groups(folder))",
                stacklevel=2,
            )
    if isinstance(stems, str) or not stems:
        raise KisError(f"pass stems as a non-empty list of run stems (file names without .json), got {stems!r}")
    paths: dict[str, Path] = {}
    loaded: dict[str, dict[str, Any]] = {}
    for stem in stems:
        stem = str(stem).removesuffix(".json")
        path = folder / f"{stem}.json"
        if stem.endswith(".partial") or not path.is_file():
            raise KisError(
                f"no finished run {stem}.json in {folder}: a run in progress has only <stem>.partial.json; "
                "choose from lifelong_run_groups(folder) or run `kis lifelong`"
            )
        result = _read(path)
        editor = _editor_of(result, path)
        if editor in loaded:
            raise KisError(
                f"two runs of {editor} in one set: {paths[editor].name} and {path.name}; pass stems=[...] naming "
                "one run per editor"
            )
        result["_source"], result["_legacy"] = path.name, is_legacy(result)
        for step in result.get("steps") or []:
            for old, new in RENAMED_STEP_KEYS.items():
                if old in step:
                    step.setdefault(new, step.pop(old))
        paths[editor], loaded[editor] = path, result
    return {editor: loaded[editor] for editor in editor_order(list(loaded))}


def run_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return which runs the results are: their file names, else their recorded stems, else their editors."""
    return [
        str(result.get("_source") or run_settings(result).get("run_stem") or editor)
        for editor, result in results.items()
    ]


def any_legacy(results: Mapping[str, Mapping[str, Any]]) -> bool:
    """Return whether any of the results was loaded from a legacy file (verdicts from it are superseded)."""
    return any(result.get("_legacy") for result in results.values())


def runs_text(results: Mapping[str, Mapping[str, Any]], separator: str = ", ") -> str:
    """Return "runs: <names>" (or "legacy runs …, superseded: <names>") of a set of runs."""
    kind = "legacy runs of an older kis, superseded" if any_legacy(results) else "runs"
    return f"{kind}: " + separator.join(run_names(results))


# ------------------------------------------------------------------------------------------------ reading results


def run_steps(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return a run's steps (its measurements in edit order), [] when it has none."""
    return list(result.get("steps") or [])


def metric_points(result: Mapping[str, Any], metric: str) -> tuple[list[int], list[float]]:
    """Return (n_edits, values) of one step metric, skipping the steps where it is null (probes, step 0)."""
    points = [(step["n_edits"], step[metric]) for step in run_steps(result) if step.get(metric) is not None]
    return [n for n, _ in points], [value for _, value in points]


def last_value(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> tuple[int, float] | None:
    """Return (n_edits, value) of the last non-null value of a step metric (at n_edits ≤ at_most), or None."""
    for step in reversed(run_steps(result)):
        if step.get(metric) is not None and (at_most is None or step["n_edits"] <= at_most):
            return step["n_edits"], step[metric]
    return None


def final_n_edits(result: Mapping[str, Any]) -> int:
    """Return the number of edits at the run's last measurement (0 for a run without steps)."""
    steps = run_steps(result)
    return int(steps[-1]["n_edits"]) if steps else 0


def collapse_step(result: Mapping[str, Any]) -> int | None:
    """Return the number of edits at which the run collapsed, or None when it did not within the run."""
    return ((result.get("summary") or {}).get("collapse") or {}).get("step")


def run_settings(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's recorded settings ({} when missing)."""
    return result.get("settings") or {}


def run_config(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's recorded config ({} when missing)."""
    return run_settings(result).get("config") or {}


def model_name(result: Mapping[str, Any]) -> str:
    """Return the model a run edited: its model record's name, else the config's model_name."""
    return str((run_settings(result).get("model") or {}).get("name") or run_config(result).get("model_name") or "model")


def run_correlation(result: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return one correlation of a run's summary (pearson, spearman, n), {} when it was not measured."""
    return ((result.get("summary") or {}).get("correlations") or {}).get(name) or {}


# ---------------------------------------------------------------------------------------------- reading a set of runs


def shared_text(results: Mapping[str, Mapping[str, Any]], read: Callable[[Mapping[str, Any]], Any]) -> str:
    """Return one value when every editor has it, else 'editor value' for each."""
    values = {editor: read(result) for editor, result in results.items()}
    if len({json.dumps(value, sort_keys=True, default=str) for value in values.values()}) <= 1:
        return str(next(iter(values.values()), ""))
    labels = editor_labels(results)
    return ", ".join(f"{labels[editor]} {value}" for editor, value in values.items())


def runs_title(results: Mapping[str, Mapping[str, Any]], what: str) -> str:
    """Return "<what>: <model>, layer <L>" of a set of runs (each editor's value where they differ)."""
    model = shared_text(results, model_name)
    layer = shared_text(results, lambda result: run_config(result).get("layer", "?"))
    return f"{what}: {model}, layer {layer}"


def value_search_text(result: Mapping[str, Any]) -> str:
    """Return "<prompts> prompts × <steps> steps" of a run's value search, marked "(cut)" below the originals'."""
    settings, editor = run_settings(result), run_settings(result).get("editor") or {}
    if (editor.get("name") or result.get("editor")) == "none":
        return "—"
    if not editor:  # legacy files: the rewrite prompt plus n_prefixes sampled prefixes
        config = run_config(result)
        prompts, steps, full = 1 + int(config.get("n_prefixes") or 0), config.get("value_steps"), (21, 20)
    else:
        multi = editor.get("name") in ("memit", "alphaedit")
        search = editor.get("memit_search" if multi else "rome_search") or {}
        templates = (settings.get("templates") or {}).get("memit") or []
        prompts = sum(len(group) for group in templates) if multi else editor.get("value_prompts_used")
        steps, full = search.get("steps"), FULL_VALUE_SEARCH["memit" if multi else "rome"]
    cut = prompts is None or steps is None or int(prompts) < full[0] or int(steps) < full[1]
    return f"{prompts} prompts × {steps} steps" + (" (cut)" if cut else "")


def number_text(value: Any) -> str:
    """Return a number as the document prints it: 4 significant digits, ints whole, '—' for null."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_r(value: float | None) -> str:
    """Return a correlation as the docs and figures print it: 3 decimals, '—' when undefined."""
    return "—" if value is None else f"{value:.3f}"
