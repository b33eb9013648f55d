"""Figures, report sections and the generated docs/lifelong.md of real lifelong-editing runs (``kis lifelong``).

kis_lens.editing.lifelong writes one ``<stem>.json`` per run into ``<output_dir>/<model>/lifelong/layer_<L>/``
(kis_lens.layout.lifelong_dir), the stem naming the editor, seed, size, layer and a hash of the run's
identity; ``<stem>.partial.json`` beside it is a checkpoint of a run in progress, never a result. Runs of other
seeds or settings may share the folder: ``load_lifelong_results`` loads the runs it is given by stem, or the
newest set of runs sharing one identity. Files of an older kis (``lifelong_<editor>.json`` without an identity)
are legacy: they are re-keyed by what they really ran (LEGACY_EDITORS) and every verdict drawn from them is
marked superseded. Every number in the figures, the report tables and the Markdown comes from those files,
and every verdict is computed here by code. Editors are named, coloured and ordered by the registry
(kis_lens.editing.registry.EDITORS).

>>> results = load_lifelong_results("results/smollm2-135m/lifelong/layer_4")
>>> write_lifelong_doc("results/smollm2-135m/lifelong/layer_4", "docs/lifelong.md")
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.errors import KisError
from kis_lens.io import atomic_write, load_json_object
from kis_lens.layout import LIFELONG_FILE_PREFIX, lifelong_result_files
from kis_lens.plots import write_html_figures
from kis_lens.report import ReportSection, html_table

# What the editors of an older kis's lifelong_<editor>.json really were. Its "rome" was p-ROME (the plain key for
# direction and scale) with a cut value search; its "memit" a one-layer exact fit with λ on I (now emmet); its
# "alphaedit" a relative null-space threshold and L2 on one layer, which no registered editor reproduces.
LEGACY_EDITORS: dict[str, str] = {"rome": "p-rome", "memit": "emmet", "alphaedit": "alphaedit-legacy", "none": "none"}
LEGACY_SUFFIX = "-legacy"
# Config fields of a legacy run that do not change what it computed: left out when grouping legacy files.
LEGACY_PRESENTATION_FIELDS: tuple[str, ...] = ("editors", "progress", "resume", "device", "output_dir")
# Names the registry does not hold (a legacy editor, or one of a newer or older kis).
FALLBACK_LABELS: dict[str, str] = {"alphaedit-legacy": "AlphaEdit-legacy"}  # its settings: legacy_banner
FALLBACK_COLOURS: dict[str, str] = {"alphaedit-legacy": "#98df8a"}
FALLBACK_COLOUR = "#bcbd22"
FIGURE_NAMES: tuple[str, ...] = ("lifelong_metrics", "lifelong_interference")
# (step key, panel title, log y) of the metrics figure, row by row, two panels a row.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("score", "score (harmonic mean of efficacy, paraphrase, neighborhood)", False),
    ("efficacy", "efficacy: rewrite success on all edits so far", False),
    ("paraphrase", "paraphrase success", False),
    ("neighborhood", "neighborhood success", False),
    (
        "argmax_efficacy",
        "argmax efficacy (teacher-forced: every new-target token the argmax; nothing generated)",
        False,
    ),
    ("fluency", "fluency (n-gram entropy of greedy text: not ROME's sampled protocol)", False),
    ("perplexity", "held-out perplexity", True),
    ("weight_change_norm", "‖W_t − W_0‖_F", False),
    ("condition_number", "condition number of W_t", True),
    ("unedited_nll_drift", "unedited facts: mean |ΔNLL(true)|", False),
)
UNIT_METRICS = ("score", "efficacy", "paraphrase", "neighborhood", "argmax_efficacy")
# Step keys renamed since a run was written: old → new (the metric is the same number).
RENAMED_STEP_KEYS: dict[str, str] = {"generation_efficacy": "argmax_efficacy"}
MAX_SCATTER_POINTS = 5_000  # pairs drawn per editor in the interference scatter (seeded subsample)
SCATTER_SEED = 0
# Verdict rules, stated in the document next to the verdicts.
ROME_VARIANTS: tuple[str, ...] = ("rome", "r-rome", "p-rome")  # each is judged by name, never as "ROME"
ALPHAEDIT_VARIANTS: tuple[str, ...] = ("alphaedit", "alphaedit-legacy")
# Projected updates (or none): their correlations are listed, not judged; every other editor's update is not
# projected, which is what the prediction from P assumes.
NOT_PREDICTED: tuple[str, ...] = (*ALPHAEDIT_VARIANTS, "none")
# Rank one along C⁻¹k with the plain key k: k_u ΔW_i = P[i,u] r_i exactly, so its output correlation is an identity.
IDENTITY_EDITORS: tuple[str, ...] = ("p-rome",)
PREDICTION_SPEARMAN = 0.5  # Spearman ρ of predicted vs measured at or above this counts as "P predicts"
REPRODUCED, NOT_REPRODUCED, PARTLY, NOT_MEASURED = "reproduced", "not reproduced", "partly", "not measured"
SUPERSEDED = "superseded"
# The runs that replace the legacy ones: kis_lens.editing.lifelong.DEFAULT_EDITORS (a level above this module,
# so not imported; tests/test_lifelong_plots.py checks the two agree).
REPLACING_EDITORS: tuple[str, ...] = ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none")


def editor_label(editor: str, result: Mapping[str, Any] | None = None) -> str:
    """Return an editor's display name: the registry's, a legacy run's real name, a fallback, else its key."""
    if result is not None and result.get("_legacy"):
        config = _config(result)
        if editor == "emmet":  # its λ on I was the config's covariance_weight
            return f"EMMET-like fit λ={_number(config.get('covariance_weight'))}"
    if editor in REGISTRY:
        return REGISTRY[editor].label
    return FALLBACK_LABELS.get(editor, editor)


def editor_colour(editor: str) -> str:
    """Return an editor's colour: the registry's, else a fallback."""
    return REGISTRY[editor].colour if editor in REGISTRY else FALLBACK_COLOURS.get(editor, FALLBACK_COLOUR)


def _labels(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {editor: editor_label(editor, result) for editor, result in results.items()}


def _order_key(editor: str) -> tuple[int, int, str]:
    names = list(REGISTRY)
    if editor in REGISTRY:
        return names.index(editor), 0, editor
    base = editor.removesuffix(LEGACY_SUFFIX)
    if base != editor and base in REGISTRY:
        return names.index(base), 1, editor  # a legacy variant right after its namesake
    return len(names), 0, editor


def _editor_order(editors: Sequence[str]) -> list[str]:
    return sorted(editors, key=_order_key)


# -------------------------------------------------------------------------------------------------------- loading


def is_legacy(result: Mapping[str, Any]) -> bool:
    """Return whether a results dict was written by an older kis (no run identity in its settings)."""
    return not isinstance(_settings(result).get("identity"), Mapping)


def _read(path: Path) -> dict[str, Any]:
    return load_json_object(path, "rerun `kis lifelong` for that run or delete the file")


def _editor_of(result: Mapping[str, Any], path: Path) -> str:
    """Return the editor a result ran: the registry name, or for a legacy file what its editor really was."""
    if not is_legacy(result):
        return str(_settings(result)["identity"].get("editor") or result.get("editor"))
    name = str(result.get("editor") or path.stem.removeprefix(LIFELONG_FILE_PREFIX))
    return LEGACY_EDITORS.get(name, name)


def _group_key(result: Mapping[str, Any]) -> str:
    """Return what runs shown together share: the identity without the editor (legacy: the config's computing part)."""
    if not is_legacy(result):
        shared = {key: value for key, value in _settings(result)["identity"].items() if key != "editor"}
        return "identity " + json.dumps(shared, sort_keys=True, default=str)
    config = {key: value for key, value in _config(result).items() if key not in LEGACY_PRESENTATION_FIELDS}
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
    return {editor: loaded[editor] for editor in _editor_order(list(loaded))}


def run_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return which runs the results are: their file names, else their recorded stems, else their editors."""
    return [
        str(result.get("_source") or _settings(result).get("run_stem") or editor) for editor, result in results.items()
    ]


def any_legacy(results: Mapping[str, Mapping[str, Any]]) -> bool:
    """Return whether any of the results was loaded from a legacy file (verdicts from it are superseded)."""
    return any(result.get("_legacy") for result in results.values())


def _runs_text(results: Mapping[str, Mapping[str, Any]], separator: str = ", ") -> str:
    kind = "legacy runs of an older kis, superseded" if any_legacy(results) else "runs"
    return f"{kind}: " + separator.join(run_names(results))


# ------------------------------------------------------------------------------------------------ reading results


def _steps(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(result.get("steps") or [])


def metric_points(result: Mapping[str, Any], metric: str) -> tuple[list[int], list[float]]:
    """Return (n_edits, values) of one step metric, skipping the steps where it is null (probes, step 0)."""
    points = [(step["n_edits"], step[metric]) for step in _steps(result) if step.get(metric) is not None]
    return [n for n, _ in points], [value for _, value in points]


def last_value(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> tuple[int, float] | None:
    """Return (n_edits, value) of the last non-null value of a step metric (at n_edits ≤ at_most), or None."""
    for step in reversed(_steps(result)):
        if step.get(metric) is not None and (at_most is None or step["n_edits"] <= at_most):
            return step["n_edits"], step[metric]
    return None


def final_n_edits(result: Mapping[str, Any]) -> int:
    """Return the number of edits at the run's last measurement (0 for a run without steps)."""
    steps = _steps(result)
    return int(steps[-1]["n_edits"]) if steps else 0


def collapse_step(result: Mapping[str, Any]) -> int | None:
    """Return the number of edits at which the run collapsed, or None when it did not within the run."""
    return ((result.get("summary") or {}).get("collapse") or {}).get("step")


def _n_planned(result: Mapping[str, Any]) -> int | str:
    """Return how many facts the run was set to edit: its recorded edit order, else the configured n_edits."""
    facts = _settings(result).get("facts")
    return len(facts) if isinstance(facts, list) else _config(result).get("n_edits", "—")


def _settings(result: Mapping[str, Any]) -> dict[str, Any]:
    return result.get("settings") or {}


def _config(result: Mapping[str, Any]) -> dict[str, Any]:
    return _settings(result).get("config") or {}


def _model_name(result: Mapping[str, Any]) -> str:
    return str((_settings(result).get("model") or {}).get("name") or _config(result).get("model_name") or "model")


def _correlation(result: Mapping[str, Any], name: str) -> dict[str, Any]:
    return ((result.get("summary") or {}).get("correlations") or {}).get(name) or {}


# ------------------------------------------------------------------------------------------------------- figures


def _shared_text(results: Mapping[str, Mapping[str, Any]], read: Callable[[Mapping[str, Any]], Any]) -> str:
    """Return one value when every editor has it, else 'editor value' for each."""
    values = {editor: read(result) for editor, result in results.items()}
    if len({json.dumps(value, sort_keys=True, default=str) for value in values.values()}) <= 1:
        return str(next(iter(values.values()), ""))
    labels = _labels(results)
    return ", ".join(f"{labels[editor]} {value}" for editor, value in values.items())


def _title(results: Mapping[str, Mapping[str, Any]], what: str) -> str:
    model = _shared_text(results, _model_name)
    layer = _shared_text(results, lambda result: _config(result).get("layer", "?"))
    return f"{what}: {model}, layer {layer}"


RUNS_PER_LINE = 2  # run names per subtitle line of a figure


def _figure_title(results: Mapping[str, Mapping[str, Any]], what: str) -> tuple[dict[str, Any], int]:
    """Return (layout title, its height in lines): the title, then which runs the figure shows as a subtitle."""
    names = run_names(results)
    lines = [", ".join(names[i : i + RUNS_PER_LINE]) for i in range(0, len(names), RUNS_PER_LINE)]
    kind = "legacy runs of an older kis, superseded" if any_legacy(results) else "runs"
    subtitle = "<br>".join([f"{kind}: {lines[0]}", *lines[1:]]) if lines else ""
    return {"text": f"{_title(results, what)}<br><sup>{subtitle}</sup>"}, 1 + len(lines)


def metrics_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Return every step metric against the number of edits, one line per editor, collapse steps dotted."""
    rows = (len(METRICS) + 1) // 2
    figure = make_subplots(rows=rows, cols=2, subplot_titles=[title for _, title, _ in METRICS], vertical_spacing=0.06)
    panels = [(index // 2 + 1, index % 2 + 1) for index in range(len(METRICS))]
    labels = _labels(results)
    for editor, result in results.items():
        label, color = labels[editor], editor_colour(editor)
        for (metric, _, _), (row, col) in zip(METRICS, panels):
            x, y = metric_points(result, metric)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=label,
                    legendgroup=editor,
                    showlegend=metric == METRICS[0][0],
                    line={"color": color},
                    marker={"size": 4},
                    meta={"editor": editor, "metric": metric},
                ),
                row=row,
                col=col,
            )
        step = collapse_step(result)
        if step is None:
            continue
        for row, col in panels:
            figure.add_vline(
                x=step,
                line={"color": color, "dash": "dot", "width": 1.5},
                name=f"collapse {editor}",
                row=row,
                col=col,
            )
        figure.add_trace(
            go.Scatter(
                x=[step],
                y=[1.0],
                mode="markers",
                name=f"{label} collapses at {step} edits",
                legendgroup=editor,
                marker={"color": color, "symbol": "x", "size": 10},
                meta={"editor": editor, "metric": "collapse"},
            ),
            row=panels[1][0],
            col=panels[1][1],
        )
    for (metric, _, log), (row, col) in zip(METRICS, panels):
        figure.update_xaxes(title_text="number of edits", row=row, col=col)
        if log:
            figure.update_yaxes(type="log", row=row, col=col)
        elif metric in UNIT_METRICS:
            figure.update_yaxes(range=[-0.05, 1.05], row=row, col=col)
    title, lines = _figure_title(results, "Lifelong editing, one edit after another")
    figure.update_layout(
        title=title,
        height=300 * rows + 20 * lines,
        margin={"t": 60 + 20 * lines},
        legend={"orientation": "h", "y": -0.05},
    )
    return figure


def _format_r(value: float | None) -> str:
    """Return a correlation as the docs and figures print it: 3 decimals, '—' when undefined."""
    return "—" if value is None else f"{value:.3f}"


def _subsample(n: int, limit: int = MAX_SCATTER_POINTS, seed: int = SCATTER_SEED) -> np.ndarray:
    """Return sorted indices of at most limit of n points (all of them when n ≤ limit), seeded."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def interference_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Return predicted (from P) vs measured interference per edited pair and both averages against the edits."""
    figure = make_subplots(
        rows=2,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        subplot_titles=(
            "MLP output of earlier edits: predicted vs measured",
            "log p(new) of earlier edits: predicted vs measured",
            "mean interference on earlier edits: predicted (solid) and measured (dashed)",
        ),
        vertical_spacing=0.14,
    )
    labels = _labels(results)
    for editor, result in results.items():
        if editor == "none":
            continue
        label, color = labels[editor], editor_colour(editor)
        pairs = result.get("pairs") or {}
        predicted = np.asarray(pairs.get("predicted") or [], dtype=np.float64)
        keep = _subsample(len(predicted))
        shown = "" if len(keep) == len(predicted) else f", {len(keep):,} of {len(predicted):,} shown"
        for col, (key, correlation) in enumerate(
            (("measured_output", "predicted_vs_output"), ("measured_logprob", "predicted_vs_logprob")), start=1
        ):
            numbers = _correlation(result, correlation)
            measured = np.asarray(pairs.get(key) or [], dtype=np.float64)
            figure.add_trace(
                go.Scatter(
                    x=predicted[keep].tolist(),
                    y=measured[keep].tolist() if len(measured) == len(predicted) else [],
                    mode="markers",
                    name=f"{label}: Pearson r = {_format_r(numbers.get('pearson'))}, Spearman ρ = "
                    f"{_format_r(numbers.get('spearman'))} (n = {numbers.get('n', len(predicted)):,}{shown})",
                    legendgroup=editor,
                    marker={"size": 4, "opacity": 0.4, "color": color},
                    meta={"editor": editor, "measured": key},
                ),
                row=1,
                col=col,
            )
            figure.update_xaxes(title_text="predicted ‖Σ_{i>u} P[i,u] r_i‖", row=1, col=col)
        for key, dash, show in (("predicted_interference", None, True), ("measured_interference", "dash", False)):
            x, y = metric_points(result, key)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=f"{label} ({key.split('_')[0]})",
                    legendgroup=editor,
                    showlegend=show,
                    line={"color": color, "dash": dash},
                    marker={"size": 4},
                    meta={"editor": editor, "metric": key},
                ),
                row=2,
                col=1,
            )
    figure.update_yaxes(title_text="measured ‖k_u (W_t − W_u)‖", row=1, col=1)
    figure.update_yaxes(title_text="measured |Δ log p(new)|", row=1, col=2)
    figure.update_xaxes(title_text="number of edits", row=2, col=1)
    figure.update_yaxes(title_text="mean over earlier edits", row=2, col=1)
    title, lines = _figure_title(results, "Interference predicted from P vs measured")
    figure.update_layout(
        title=title,
        height=900 + 20 * lines,
        margin={"t": 60 + 20 * lines},
        legend={"orientation": "h", "y": -0.1},
    )
    return figure


def lifelong_figures(results: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Return {name: figure}: "lifelong_metrics", and "lifelong_interference" when an editor other than none ran."""
    makers = {"lifelong_metrics": metrics_figure, "lifelong_interference": interference_figure}
    return {name: makers[name](results) for name in lifelong_figure_names(results)}


def lifelong_figure_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return the names of the figures made for these results (the interference one needs an edited run)."""
    return [name for name in FIGURE_NAMES if name != "lifelong_interference" or any(e != "none" for e in results)]


def write_lifelong_figures(results: Mapping[str, Mapping[str, Any]], folder: str | Path) -> dict[str, Path]:
    """Write each figure as standalone HTML (Plotly from its CDN) atomically into folder; return {name: path}."""
    return write_html_figures(lifelong_figures(results), folder)


# ------------------------------------------------------------------------------------------------ report section


# The originals' value searches: ROME's compute_v over its 21 templates, MEMIT's compute_z over its 6, 20 steps
FULL_VALUE_SEARCH: dict[str, tuple[int, int]] = {"rome": (21, 20), "memit": (6, 20)}


def value_search_text(result: Mapping[str, Any]) -> str:
    """Return "<prompts> prompts × <steps> steps" of a run's value search, marked "(cut)" below the originals'."""
    settings, editor = _settings(result), _settings(result).get("editor") or {}
    if (editor.get("name") or result.get("editor")) == "none":
        return "—"
    if not editor:  # legacy files: the rewrite prompt plus n_prefixes sampled prefixes
        config = _config(result)
        prompts, steps, full = 1 + int(config.get("n_prefixes") or 0), config.get("value_steps"), (21, 20)
    else:
        multi = editor.get("name") in ("memit", "alphaedit")
        search = editor.get("memit_search" if multi else "rome_search") or {}
        templates = (settings.get("templates") or {}).get("memit") or []
        prompts = sum(len(group) for group in templates) if multi else editor.get("value_prompts_used")
        steps, full = search.get("steps"), FULL_VALUE_SEARCH["memit" if multi else "rome"]
    cut = prompts is None or steps is None or int(prompts) < full[0] or int(steps) < full[1]
    return f"{prompts} prompts × {steps} steps" + (" (cut)" if cut else "")


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per editor of the report table: collapse, final metrics, correlations and timing."""
    rows, labels = [], _labels(results)
    for editor, result in results.items():
        summary = result.get("summary") or {}
        row: dict[str, Any] = {"editor": labels[editor], "edits": final_n_edits(result)}
        row["collapse step"] = collapse_step(result)
        for metric in ("score", "efficacy", "paraphrase", "neighborhood", "perplexity"):
            found = last_value(result, metric)
            row[metric] = None if found is None else found[1]
        for name, short in (("predicted_vs_output", "output"), ("predicted_vs_logprob", "log p")):
            numbers = _correlation(result, name)
            row[f"Pearson, {short}"] = numbers.get("pearson")
            row[f"Spearman, {short}"] = numbers.get("spearman")
            row[f"pairs, {short}"] = numbers.get("n")
        row["value search"] = value_search_text(result)
        row["wall s"] = summary.get("wall_seconds")
        row["s per edit"] = summary.get("seconds_per_edit")
        rows.append(row)
    return rows


def lifelong_sections(
    results: Mapping[str, Mapping[str, Any]], source: str | Path | None = None
) -> list[ReportSection]:
    """Return the report section of one set of lifelong runs: both figures and the per-editor summary table."""
    where = f"From {source}: " if source is not None else ""
    superseded = (
        " Legacy runs of an older kis: their editors are named by what they really ran, and they are superseded."
        if any_legacy(results)
        else ""
    )
    return [
        ReportSection(
            _title(results, "Lifelong editing (kis lifelong)"),
            figures=list(lifelong_figures(results).values()),
            intro=f"{where}real edits of W_out, one CounterFact fact (or batch) after another, per editor. Final "
            "values are each metric's last measurement (paraphrase, neighborhood and score only at full evaluations); "
            "correlations are of the interference predicted from P vs measured on earlier edits. "
            f"Shown: {_runs_text(results)}.{superseded}",
            html=html_table(summary_rows(results)),
        )
    ]


# ------------------------------------------------------------------------------------------------------ Markdown


def _number(value: Any) -> str:
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


def _seconds(value: Any) -> str:
    return "—" if value is None else f"{value:.3g} s"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _never(result: Mapping[str, Any]) -> str:
    return f"none within {final_n_edits(result):,} edits"


def _collapse_text(result: Mapping[str, Any]) -> str:
    step = collapse_step(result)
    return _never(result) if step is None else f"after {step:,} edits"


def _at(result: Mapping[str, Any], metric: str, at_most: int | None = None) -> str:
    """Return the metric's last value (at n_edits ≤ at_most) with '(at n)' when it is not the run's last step."""
    found = last_value(result, metric, at_most)
    if found is None:
        return "—"
    n, value = found
    end = final_n_edits(result) if at_most is None else at_most
    return _number(value) if n == end else f"{_number(value)} (at {n:,})"


def _ratio_to_none(results: Mapping[str, Mapping[str, Any]], editor: str, metric: str) -> str:
    if "none" not in results or editor == "none":
        return "—"
    mine, reference = last_value(results[editor], metric), last_value(results["none"], metric)
    if mine is None or reference is None or reference[1] == 0:
        return "—"
    return f"{mine[1] / reference[1]:.4g}"


def _superseded(verdict: dict[str, Any], results: Mapping[str, Mapping[str, Any]], editors: Sequence[str]) -> dict:
    """Mark a verdict superseded when any run it is drawn from was loaded from a legacy file."""
    legacy = [editor for editor in editors if editor in results and results[editor].get("_legacy")]
    verdict["superseded"] = bool(legacy)
    if legacy:
        verdict["verdict"] = f"{verdict['verdict']}, {SUPERSEDED}"
        verdict["evidence"] = f"Superseded (drawn from legacy runs of an older kis). {verdict['evidence']}"
    return verdict


def _first(results: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in results), None)


ANY_ROME = "ROME variant (rome, r-rome or p-rome)"
ANY_ALPHAEDIT = "AlphaEdit (alphaedit or alphaedit-legacy)"


def _missing(results: Mapping[str, Any], wanted: Sequence[tuple[str | None, str]]) -> str:
    """Return "no … run among these results." naming each wanted editor absent (its fallback text when None)."""
    absent = [fallback if name is None else f"{name} ({editor_label(name)})" for name, fallback in wanted]
    absent = [text for (name, _), text in zip(wanted, absent) if name is None or name not in results]
    return f"no {' or '.join(absent)} run among these results."


def judge_collapse(results: Mapping[str, Mapping[str, Any]], editor: str | None = None) -> dict[str, Any]:
    """Return the verdict on "<ROME variant> collapses": reproduced when that run's collapse step is not null.

    editor is one of ROME_VARIANTS (default: the first present); the claim names it, so that p-ROME's or r-ROME's
    collapse is never read as the original ROME's."""
    editor = editor or _first(results, ROME_VARIANTS)
    rule = {"rule": "collapse", "editors": [editor] if editor else []}
    if editor is None or editor not in results:
        name = "ROME" if editor is None else editor_label(editor)
        evidence = _missing(results, [(editor, ANY_ROME)])
        return {"claim": f"Sequential {name} edits collapse the model", "verdict": NOT_MEASURED, "evidence": evidence}
    run, label = results[editor], editor_label(editor, results[editor])
    claim = f"Sequential {label} edits collapse the model"
    collapse = (run.get("summary") or {}).get("collapse") or {}
    step = collapse.get("step")
    end = f"final efficacy {_at(run, 'efficacy')}, perplexity {_at(run, 'perplexity')}"
    if "none" in results:
        end += f" (no edit: {_at(results['none'], 'perplexity')})"
    if step is None:
        verdict = {
            "claim": claim,
            "verdict": NOT_REPRODUCED,
            "evidence": f"{label} did not collapse within {final_n_edits(run):,} edits (criterion: "
            f"{collapse.get('criterion', '?')}); {end}.",
        }
    else:
        at_collapse = last_value(run, "efficacy", step)
        efficacy = "" if at_collapse is None else f"; efficacy {_number(at_collapse[1])} at {at_collapse[0]:,} edits"
        verdict = {
            "claim": claim,
            "verdict": REPRODUCED,
            "evidence": f"{label} collapsed after {step:,} edits (criterion: {collapse.get('criterion', '?')})"
            f"{efficacy}; {end}.",
        }
    return _superseded({**verdict, **rule}, results, [editor, "none"])


def judge_alphaedit_holds(
    results: Mapping[str, Mapping[str, Any]], rome: str | None = None, alphaedit: str | None = None
) -> dict[str, Any]:
    """Return the verdict on "AlphaEdit holds longer than <ROME variant>", from both collapse steps (null = not
    within the run). rome and alphaedit default to the first of ROME_VARIANTS and ALPHAEDIT_VARIANTS present."""
    rome, alphaedit = rome or _first(results, ROME_VARIANTS), alphaedit or _first(results, ALPHAEDIT_VARIANTS)
    r_name = "ROME" if rome is None else editor_label(rome, results.get(rome))
    a_name = "AlphaEdit" if alphaedit is None else editor_label(alphaedit, results.get(alphaedit))
    claim = f"{a_name} holds longer than {r_name}"
    rule = {"rule": "holds", "editors": [name for name in (rome, alphaedit) if name]}
    if rome not in results or alphaedit not in results:
        evidence = _missing(results, [(rome, ANY_ROME), (alphaedit, ANY_ALPHAEDIT)])
        return {"claim": claim, "verdict": NOT_MEASURED, "evidence": evidence, **rule}
    r_run, a_run = results[rome], results[alphaedit]
    r_step, a_step = collapse_step(r_run), collapse_step(a_run)
    common = min(final_n_edits(r_run), final_n_edits(a_run))
    compared = (
        f"at {common:,} edits efficacy {_at(a_run, 'efficacy', common)} ({a_name}) vs "
        f"{_at(r_run, 'efficacy', common)} ({r_name}), score {_at(a_run, 'score', common)} vs "
        f"{_at(r_run, 'score', common)}"
    )
    steps = f"{r_name} collapsed {_collapse_text(r_run)}, {a_name} {_collapse_text(a_run)}"
    if r_step is not None and a_step is None and final_n_edits(a_run) <= r_step:
        verdict = NOT_MEASURED
        steps += f"; {a_name}'s run ({final_n_edits(a_run):,} edits) ends before {r_name}'s collapse"
    elif r_step is not None and (a_step is None or a_step > r_step):
        verdict = REPRODUCED
    elif r_step is None and a_step is None:
        a_eff, r_eff = last_value(a_run, "efficacy", common), last_value(r_run, "efficacy", common)
        ahead = a_eff is not None and r_eff is not None and a_eff[1] > r_eff[1]
        verdict = PARTLY if ahead else NOT_REPRODUCED
        steps += "; neither collapsed, so only their efficacy can be compared"
    else:  # AlphaEdit collapsed, and the ROME variant later or not at all
        verdict = NOT_REPRODUCED
    return _superseded(
        {"claim": claim, "verdict": verdict, "evidence": f"{steps}; {compared}.", **rule}, results, [rome, alphaedit]
    )


def prediction_editors(results: Mapping[str, Any]) -> list[str]:
    """Return the editors whose correlations the P verdict judges: every one whose update is not projected."""
    return [editor for editor in results if editor not in NOT_PREDICTED]


def judge_prediction(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return the verdict on "P predicts the drift": Spearman ρ ≥ PREDICTION_SPEARMAN for every unprojected editor's
    correlations (an IDENTITY_EDITORS output correlation is listed, not judged; so are AlphaEdit's)."""
    claim = "P predicts the interference on earlier edits"
    parts, checks, labels = [], [], _labels(results)
    judged = prediction_editors(results)
    for editor, result in results.items():
        if editor == "none":
            continue
        numbers = []
        for name, short in (("predicted_vs_output", "MLP output"), ("predicted_vs_logprob", "log p")):
            corr = _correlation(result, name)
            numbers.append(
                f"{short}: Pearson r = {_format_r(corr.get('pearson'))}, Spearman ρ = "
                f"{_format_r(corr.get('spearman'))}, n = {_number(corr.get('n'))}"
            )
            if editor in IDENTITY_EDITORS and name == "predicted_vs_output":
                numbers[-1] += " (an identity for rank-one edits along C⁻¹k, not judged)"
            elif editor in judged and corr.get("spearman") is not None:
                checks.append(corr["spearman"] >= PREDICTION_SPEARMAN)
        parts.append(f"{labels[editor]} ({'; '.join(numbers)})")
    if not checks:
        verdict = NOT_MEASURED
    elif all(checks):
        verdict = REPRODUCED
    elif any(checks):
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    names = " and ".join(labels[editor] for editor in judged) or "no unprojected editor"
    rule = f"{sum(checks)} of {len(checks)} correlations of {names} have Spearman ρ ≥ {PREDICTION_SPEARMAN:g}"
    verdict_dict = {
        "claim": claim,
        "verdict": verdict,
        "evidence": f"{rule}. " + "; ".join(parts) + ("." if parts else ""),
        "rule": "prediction",
        "editors": judged,
    }
    return _superseded(verdict_dict, results, [editor for editor in results if editor != "none"])


def accumulated_p2_text(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return ΣP² accumulated at each editor's collapse (or at its last step when it did not collapse)."""
    parts, labels = [], _labels(results)
    edited = [editor for editor in results if editor != "none"]
    for editor in edited:
        result = results[editor]
        collapse = (result.get("summary") or {}).get("collapse") or {}
        if collapse.get("step") is not None:
            parts.append(
                f"{labels[editor]}: ΣP² = {_number(collapse.get('accumulated_p2_at_collapse'))} at its collapse "
                f"after {collapse['step']:,} edits"
            )
        else:
            parts.append(
                f"{labels[editor]}: no collapse within {final_n_edits(result):,} edits, ΣP² = "
                f"{_at(result, 'accumulated_p2')} at the end"
            )
    verdict = {
        "claim": "Accumulated superposition ΣP² at collapse",
        "verdict": "measured" if parts else NOT_MEASURED,
        "evidence": "; ".join(parts)
        + ". Within one edit order ΣP² only grows with the number of edits, so one run cannot tell whether it "
        "predicts the collapse better than the count of edits does: that needs runs over several orders (--seed)."
        if parts
        else "no edited run among these results.",
        "rule": "p2",
        "editors": edited,
    }
    return _superseded(verdict, results, edited)


def lifelong_verdicts(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the claim-by-claim verdicts (claim, verdict, evidence; rule, editors, superseded) from the results.

    One collapse verdict and one AlphaEdit verdict per ROME variant present (one "not measured" each when none
    is), then the P prediction and ΣP²."""
    variants = [editor for editor in ROME_VARIANTS if editor in results] or [None]
    return [
        *(judge_collapse(results, editor) for editor in variants),
        *(judge_alphaedit_holds(results, editor) for editor in variants),
        judge_prediction(results),
        accumulated_p2_text(results),
    ]


def _editor_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    editors, labels = list(results), _labels(results)
    rows: list[tuple[str, Callable[[str, Mapping[str, Any]], str]]] = [
        ("run", lambda e, r: f"`{run_names({e: r})[0]}`"),
        ("edits made", lambda e, r: _number(len(r.get("edits") or []))),
        ("value search (prompts × steps)", lambda e, r: value_search_text(r)),
        ("last measurement at (edits)", lambda e, r: _number(final_n_edits(r))),
        ("collapse", lambda e, r: _collapse_text(r)),
        ("collapse criterion", lambda e, r: ((r.get("summary") or {}).get("collapse") or {}).get("criterion") or "—"),
        ("efficacy (all edits so far)", lambda e, r: _at(r, "efficacy")),
        ("argmax efficacy (teacher-forced)", lambda e, r: _at(r, "argmax_efficacy")),
        ("paraphrase", lambda e, r: _at(r, "paraphrase")),
        ("neighborhood", lambda e, r: _at(r, "neighborhood")),
        ("score", lambda e, r: _at(r, "score")),
        ("fluency", lambda e, r: _at(r, "fluency")),
        ("fluency ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "fluency")),
        ("held-out perplexity", lambda e, r: _at(r, "perplexity")),
        ("perplexity ÷ no edit's", lambda e, r: _ratio_to_none(results, e, "perplexity")),
        ("unedited facts mean abs ΔNLL(true)", lambda e, r: _at(r, "unedited_nll_drift")),
        ("‖W_t − W_0‖_F", lambda e, r: _at(r, "weight_change_norm")),
        ("σ_max(W_t)", lambda e, r: _at(r, "sigma_max")),
        ("cond(W_t)", lambda e, r: _at(r, "condition_number")),
        ("accumulated ΣP²", lambda e, r: _at(r, "accumulated_p2")),
        ("wall time", lambda e, r: _seconds((r.get("summary") or {}).get("wall_seconds"))),
        ("per edit", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_edit"))),
        ("per probe", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_probe"))),
        ("per full evaluation", lambda e, r: _seconds((r.get("summary") or {}).get("seconds_per_eval"))),
    ]
    lines = [
        "| | " + " | ".join(_cell(labels[editor]) for editor in editors) + " |",
        "|---|" + "---:|" * len(editors),
    ]
    for name, read in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(read(e, results[e])) for e in editors) + " |")
    return lines


# An absolute path at the start of a value or after a space, '=' or quote: a machine's path, never put in a doc.
_ABSOLUTE_PATH = re.compile(r"""(?<![^\s='"(])(?:/|~/|[A-Za-z]:\\)[^\s'"`|)]*""")


def _without_machine_paths(value: Any) -> Any:
    """Return value with every absolute path in its strings cut to .../<last part> (recursively through dicts/lists)."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: ".../" + re.split(r"[/\\]", match.group(0).rstrip("/\\"))[-1], value)
    if isinstance(value, Mapping):
        return {key: _without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_machine_paths(item) for item in value]
    return value


def _settings_shown(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's settings with the edit order shortened to its length and first case ids, and no machine paths."""
    shown = dict(_settings(result))
    facts = shown.get("facts")
    if isinstance(facts, list) and len(facts) > 10:
        shown["facts"] = f"{len(facts)} case ids in edit order, first {facts[:10]}"
    if isinstance(shown.get("identity"), Mapping):  # repeats config, hashes, templates and version shown beside it
        shown["identity"] = f"{len(shown['identity'])} fields, hashed into the run's stem"
    return _without_machine_paths(shown)


def legacy_banner(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Return the "Superseded" banner of a document drawn from legacy files (none when no result is legacy).

    Its numbers (value steps, prompts, λ, threshold, L2) are read from the legacy runs' own settings."""
    legacy = {editor: result for editor, result in results.items() if result.get("_legacy")}
    if not legacy:
        return []

    def read(editor: str, key: str) -> str:
        return _number(_config(legacy[editor]).get(key)) if editor in legacy else "?"

    some = next(iter(legacy.values()))
    prompts = len(_settings(some).get("prefixes") or []) + 1
    parts = [
        "> **Superseded.** These runs were made by an older kis and their verdicts do not stand for ROME, MEMIT or "
        "AlphaEdit. Its `rome` was p-ROME (the plain key k for both the direction and the scale, not the original "
        "ROME's template-averaged key for the direction) with a cut value search "
        f"({_number(_config(some).get('value_steps'))} steps, {prompts} prompts) and a KL term at the wrong token; "
        f"its `memit` was a one-layer exact fit with λ = {read('emmet', 'covariance_weight')} (what is now called "
        f"`emmet`, shown as {editor_label('emmet', legacy['emmet']) if 'emmet' in legacy else 'EMMET-like fit'}), "
        "not MEMIT on several layers; its `alphaedit` used a relative null-space threshold "
        f"{read('alphaedit-legacy', 'null_threshold')} and L2 = {read('alphaedit-legacy', 'null_l2')} on one layer "
        f"(shown as {editor_label('alphaedit-legacy')}), not the original's absolute threshold 2e-2 and L2 = 10 on "
        "MEMIT's layers. "
        "Every table and verdict below names the editors by what they really ran, and every verdict is marked "
        f"superseded. The runs of `kis lifelong --editors {','.join(REPLACING_EDITORS)}` replace them.",
    ]
    return [*parts, ""]


def render_lifelong_markdown(
    results: Mapping[str, Mapping[str, Any]],
    figure_paths: Mapping[str, str] | None = None,
    command: str | None = None,
    *,
    source: str | Path | None = None,
) -> str:
    """Return the text of docs/lifelong.md: settings, the per-editor table and the verdicts, all read from results."""
    if not results:
        raise KisError("no lifelong results to write a document from: run `kis lifelong` first")
    config = lambda key: _shared_text(results, lambda result: _config(result).get(key, "—"))  # noqa: E731
    setting = lambda key: _shared_text(results, lambda result: _settings(result).get(key, "—"))  # noqa: E731
    if command is None:
        recorded = {
            str(_settings(result).get("command")) for result in results.values() if _settings(result).get("command")
        }
        command = " && ".join(sorted(recorded)) or None
    command = None if command is None else _without_machine_paths(command)
    model = _shared_text(results, _model_name)
    labels = _labels(results)
    where = f"`{source}`" if source is not None else "the `lifelong_<editor>_….json` files of `kis lifelong`"
    superseded = " (superseded)" if any_legacy(results) else ""
    lines = [
        f"# Lifelong editing on {model}, layer {config('layer')}{superseded}",
        "",
        *legacy_banner(results),
        f"Generated from {where} by kis_lens.editing.lifelong_plots; do not edit by hand.",
        "",
        "Each editor edits the MLP output weight W_out for real "
        + ("(in these legacy runs: of one layer)" if superseded else "(MEMIT and AlphaEdit: of several layers)")
        + ", one CounterFact fact or batch after another, and the model is measured along the way (a probe: "
        "efficacy, perplexity and the weight statistics; a full evaluation: every metric). Efficacy is ROME's "
        "rewrite success on all edits made so far, so it is also the retention of earlier edits. `no edit` is the "
        "unedited model measured on the same schedule.",
        "",
        "## Setting",
        "",
        f"- **Runs shown**: {', '.join(f'`{name}`' for name in run_names(results))}"
        + (" (legacy files of an older kis, superseded)" if superseded else ""),
        f"- **Model**: `{model}`, layer {config('layer')}",
        f"- **Edits**: {_shared_text(results, _n_planned)} CounterFact facts from `{config('facts')}` in an order "
        f"drawn with seed {config('seed')}; batch size {config('batch_size')} for the batching editors",
        f"- **Watched**: {config('n_unedited')} never-edited facts from `{config('unedited_facts')}`; held-out "
        f"perplexity on {config('heldout_texts')} texts of {config('heldout_tokens')} tokens; C from "
        f"`{config('corpus')}` ({config('max_tokens')} tokens)",
        f"- **Cadence**: a probe every {config('probe_every')} edits, a full evaluation every {config('eval_every')}",
        f"- **Editors**: {', '.join(labels[editor] for editor in results)}",
        f"- **Device**: {setting('device')}, {setting('threads')} threads; kis_lens {setting('kis_lens_version')}",
        "- **Command**: " + (f"`{command}`" if command else "not recorded in the results"),
        "",
        "## Per editor",
        "",
        "Each metric's last measured value; `(at n)` marks a metric last measured before the final step (paraphrase, "
        "neighborhood, score and fluency are measured at full evaluations only). Ratios divide by the unedited "
        "model's value.",
        "",
        *_editor_table(results),
        "",
        "## Verdicts, claim by claim",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [
        f"| {_cell(v['claim'])} | **{v['verdict']}** | {_cell(v['evidence'])} |" for v in lifelong_verdicts(results)
    ]
    lines += [
        "",
        "Verdict rules: each ROME variant present (original ROME, r-ROME, p-ROME) is judged by its own name; it "
        "collapses when its run records a collapse step (the criterion above). AlphaEdit holds longer than a ROME "
        "variant when it collapses later or not at all within a run that goes past that variant's collapse; when "
        "neither collapses it is `partly` if AlphaEdit's efficacy at the last common number of edits is higher. "
        f"P predicts the interference when the Spearman ρ of predicted vs measured is at least {PREDICTION_SPEARMAN:g} "
        "for every correlation of the editors whose updates are not projected (all but AlphaEdit and no edit), which "
        "is what the prediction from P assumes; `partly` when some are. p-ROME's output correlation is an identity "
        "(k_u(W_t − W_u) = Σ_{i>u} P[i,u] r_i for rank-one edits along C⁻¹k with the plain key k) and is not judged; "
        "AlphaEdit's correlations are listed, not judged. A verdict drawn from a legacy run of an older kis is marked "
        "superseded.",
    ]
    if figure_paths:
        lines += ["", "## Figures", ""]
        for name, path in figure_paths.items():
            lines += [f"- [{name} (interactive HTML)]({path})"]
    lines += [
        "",
        "<details><summary>all settings</summary>",
        "",
        "```json",
        json.dumps({editor: _settings_shown(result) for editor, result in results.items()}, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


def write_lifelong_doc(
    folder: str | Path, doc_path: str | Path, command: str | None = None, stems: Sequence[str] | None = None
) -> Path:
    """Write the figures (when missing or older than the results) and the Markdown doc atomically; return its path.

    The runs are load_lifelong_results(folder, stems): the given stems, else the newest set."""
    folder, doc_path = Path(folder), Path(doc_path)
    results = load_lifelong_results(folder, stems)
    newest = max((folder / result["_source"]).stat().st_mtime for result in results.values())
    figures = {name: folder / f"{name}.html" for name in lifelong_figure_names(results)}
    if any(not path.exists() or path.stat().st_mtime < newest for path in figures.values()):
        figures = write_lifelong_figures(results, folder)
    links = {name: os.path.relpath(Path(path).resolve(), doc_path.resolve().parent) for name, path in figures.items()}
    text = render_lifelong_markdown(results, links, command, source=folder)
    return atomic_write(doc_path, lambda temp: temp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# A study: several editors × edit orders (× layers), one line per run
# ---------------------------------------------------------------------------------------------------------

# (step key, panel title, log y) of the study figure: what collapses, and what might predict it.
STUDY_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("efficacy", "efficacy on all edits so far", False),
    ("retention_oldest_quarter", "retention of the oldest quarter of edits", False),
    ("perplexity", "held-out perplexity", True),
    ("weight_change_norm", "‖W_t − W_0‖_F (edit layer)", False),
    ("accumulated_p2", "ΣP² over the edits so far", True),
    ("condition_number", "κ(W_t)", True),
)
ORDER_DASHES: tuple[str, ...] = ("solid", "dash", "dot", "dashdot", "longdash")


def _run_name(run: Mapping[str, Any]) -> str:
    config = _config(run)
    return f"{editor_label(run['editor'])} · order {config.get('seed')} · layer {config.get('layer')}"


def study_figure(runs: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Return the study's metrics against the number of edits: one line per run (colour: editor, dash: order)."""
    if not runs:
        raise KisError("no runs to draw: pass the runs of a study (kis_lens.editing.lifelong_study.load_study)")
    figure = make_subplots(
        rows=(len(STUDY_METRICS) + 1) // 2,
        cols=2,
        subplot_titles=[t for _, t, _ in STUDY_METRICS],
        vertical_spacing=0.09,
    )
    panels = [(index // 2 + 1, index % 2 + 1) for index in range(len(STUDY_METRICS))]
    seeds = sorted({int(_config(run).get("seed", 0)) for run in runs})
    layers = sorted({int(_config(run).get("layer", 0)) for run in runs})
    for run in runs:
        editor, config = run["editor"], _config(run)
        dash = ORDER_DASHES[seeds.index(int(config.get("seed", 0))) % len(ORDER_DASHES)]
        width = 2.0 if int(config.get("layer", 0)) == layers[0] else 1.0  # a second layer: thinner lines
        for (metric, _, _), (row, col) in zip(STUDY_METRICS, panels):
            x, y = metric_points(run, metric)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    name=_run_name(run),
                    legendgroup=_run_name(run),
                    showlegend=metric == STUDY_METRICS[0][0],
                    line={"color": editor_colour(editor), "dash": dash, "width": width},
                    meta={"editor": editor, "seed": config.get("seed"), "layer": config.get("layer"), "metric": metric},
                ),
                row=row,
                col=col,
            )
        step = collapse_step(run)
        if step is not None:
            figure.add_trace(
                go.Scatter(
                    x=[step],
                    y=[0.0],
                    mode="markers",
                    name=f"{_run_name(run)}: collapse at {step}",
                    legendgroup=_run_name(run),
                    showlegend=False,
                    marker={"color": editor_colour(editor), "symbol": "x", "size": 9},
                    meta={"editor": editor, "seed": config.get("seed"), "metric": "collapse"},
                ),
                row=1,
                col=1,
            )
    for (metric, _, log), (row, col) in zip(STUDY_METRICS, panels):
        figure.update_xaxes(title_text="number of edits", row=row, col=col)
        if log:
            figure.update_yaxes(type="log", row=row, col=col)
        elif metric in ("efficacy", "retention_oldest_quarter"):
            figure.update_yaxes(range=[-0.05, 1.05], row=row, col=col)
    model = _shared_text({str(i): run for i, run in enumerate(runs)}, _model_name)
    figure.update_layout(
        title=f"Lifelong editing on {model}: {len(runs)} runs (colour: editor; dash: edit order; × collapse)",
        height=320 * ((len(STUDY_METRICS) + 1) // 2) + 120,
        legend={"orientation": "h", "y": -0.08},
        template="plotly_white",
    )
    return figure


def update_norm_figure(runs: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Return ‖ΔW‖ of every update against the edit it ends at (log), disabling edits circled, one line per run."""
    figure = go.Figure()
    seeds = sorted({int(_config(run).get("seed", 0)) for run in runs})
    for run in runs:
        edits = run.get("edits") or []
        seen: dict[int, tuple[int, float]] = {}
        for index, edit in enumerate(edits):
            if edit.get("update_delta_norm") is not None:
                seen[int(edit.get("update", index))] = (index + 1, float(edit["update_delta_norm"]))
        if not seen or not any(norm > 0 for _, norm in seen.values()):
            continue
        x, y = zip(*sorted(seen.values()))
        dash = ORDER_DASHES[seeds.index(int(_config(run).get("seed", 0))) % len(ORDER_DASHES)]
        colour = editor_colour(run["editor"])
        figure.add_trace(
            go.Scatter(x=x, y=y, mode="lines", name=_run_name(run), line={"color": colour, "dash": dash, "width": 1})
        )
        disabling = [int(item["n_edits"]) for item in (run.get("summary") or {}).get("disabling_edits") or []]
        if disabling:
            at = dict(zip(x, y))
            figure.add_trace(
                go.Scatter(
                    x=disabling,
                    y=[at.get(n) for n in disabling],
                    mode="markers",
                    name=f"{_run_name(run)}: disabling edits",
                    marker={"color": colour, "symbol": "circle-open", "size": 12},
                )
            )
    figure.update_layout(
        title="‖ΔW‖_F of each update (edit layer); circles: disabling edits (‖ΔW‖ > 10× running median, then a "
        "perplexity jump)",
        xaxis_title="edit",
        yaxis_title="‖ΔW‖_F",
        yaxis_type="log",
        template="plotly_white",
        height=500,
    )
    return figure
