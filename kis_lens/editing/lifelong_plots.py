"""Figures of lifelong-editing runs: one set of runs (metrics, interference from P) and a study (runs × orders).

Every number drawn comes from the run files (kis_lens.editing.lifelong_files); the report section that shows the
figures is kis_lens.editing.lifelong_report's, the documents kis_lens.docs.lifelong's.

>>> write_lifelong_figures(load_lifelong_results("results/lifelong/smollm2-135m/layer_4"), "figures/")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kis_lens.editing.lifelong_files import (
    any_legacy,
    collapse_step,
    editor_colour,
    editor_label,
    editor_labels,
    format_r,
    metric_points,
    model_name,
    run_config,
    run_correlation,
    run_names,
    runs_title,
    shared_text,
)
from kis_lens.errors import KisError
from kis_lens.figure_files import write_html_figures

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
MAX_SCATTER_POINTS = 5_000  # pairs drawn per editor in the interference scatter (seeded subsample)
SCATTER_SEED = 0
# (step key, panel title, log y) of the study figure: what collapses, and what might predict it.
STUDY_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("efficacy", "efficacy on all edits so far", False),
    ("retention_oldest_quarter", "retention of the oldest quarter of edits", False),
    ("perplexity", "held-out perplexity", True),
    ("weight_change_norm", "‖W_t − W_0‖_F (edit layer)", False),
    ("accumulated_p2", "ΣP² over the edits so far", True),
    ("condition_number", "κ(W_t)", True),
)
STUDY_UNIT_METRICS = ("efficacy", "retention_oldest_quarter")
ORDER_DASHES: tuple[str, ...] = ("solid", "dash", "dot", "dashdot", "longdash")
RUNS_PER_LINE = 2  # run names per subtitle line of a figure


def _figure_title(results: Mapping[str, Mapping[str, Any]], what: str) -> tuple[dict[str, Any], int]:
    """Return (layout title, its height in lines): the title, then which runs the figure shows as a subtitle."""
    names = run_names(results)
    lines = [", ".join(names[i : i + RUNS_PER_LINE]) for i in range(0, len(names), RUNS_PER_LINE)]
    kind = "legacy runs of an older kis, superseded" if any_legacy(results) else "runs"
    subtitle = "<br>".join([f"{kind}: {lines[0]}", *lines[1:]]) if lines else ""
    return {"text": f"{runs_title(results, what)}<br><sup>{subtitle}</sup>"}, 1 + len(lines)


# --------------------------------------------------------------------------------- one grid of metric panels


@dataclass(frozen=True)
class PanelLine:
    """One run drawn in every panel of a metric grid: its line's style, what it is, and its collapse marker."""

    run: Mapping[str, Any]
    style: dict[str, Any]  # go.Scatter settings of its line in every panel (mode, name, legendgroup, line, ...)
    meta: dict[str, Any]  # what the line is (editor, order, ...); each panel adds its metric
    collapse: dict[str, Any]  # go.Scatter settings of the marker at its collapse step; "{step}" in its name is it


def metric_grid(
    metrics: Sequence[tuple[str, str, bool]],
    lines: Sequence[PanelLine],
    *,
    unit_metrics: Sequence[str],
    vertical_spacing: float,
    collapse_panel: int,
    collapse_lines: bool,
) -> go.Figure:
    """Return metrics against the number of edits, two panels a row, one line per run, each collapse marked in
    panel collapse_panel (and dotted across every panel with collapse_lines); shares axes, not titles or sizes."""
    figure = make_subplots(
        rows=(len(metrics) + 1) // 2,
        cols=2,
        subplot_titles=[title for _, title, _ in metrics],
        vertical_spacing=vertical_spacing,
    )
    panels = [(index // 2 + 1, index % 2 + 1) for index in range(len(metrics))]
    for line in lines:
        for (metric, _, _), (row, col) in zip(metrics, panels):
            x, y = metric_points(line.run, metric)
            trace = go.Scatter(
                x=x, y=y, showlegend=metric == metrics[0][0], meta={**line.meta, "metric": metric}, **line.style
            )
            figure.add_trace(trace, row=row, col=col)
        step = collapse_step(line.run)
        if step is None:
            continue
        if collapse_lines:
            for row, col in panels:
                dotted = {"color": line.style["line"]["color"], "dash": "dot", "width": 1.5}
                figure.add_vline(x=step, line=dotted, name=f"collapse {line.meta['editor']}", row=row, col=col)
        row, col = panels[collapse_panel]
        name = line.collapse["name"].replace("{step}", str(step))
        figure.add_trace(go.Scatter(x=[step], mode="markers", **{**line.collapse, "name": name}), row=row, col=col)
    for (metric, _, log), (row, col) in zip(metrics, panels):
        figure.update_xaxes(title_text="number of edits", row=row, col=col)
        if log:
            figure.update_yaxes(type="log", row=row, col=col)
        elif metric in unit_metrics:
            figure.update_yaxes(range=[-0.05, 1.05], row=row, col=col)
    return figure


# ---------------------------------------------------------------------------------------------- one set of runs


def metrics_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Return every step metric against the number of edits, one line per editor, collapse steps dotted."""
    labels, lines = editor_labels(results), []
    for editor, result in results.items():
        label, color = labels[editor], editor_colour(editor)

        style = {"mode": "lines+markers", "name": label, "legendgroup": editor, "line": {"color": color}}
        collapse = {
            "y": [1.0],
            "name": f"{label} collapses at {{step}} edits",
            "legendgroup": editor,
            "marker": {"color": color, "symbol": "x", "size": 10},
            "meta": {"editor": editor, "metric": "collapse"},
        }
        lines.append(PanelLine(result, {**style, "marker": {"size": 4}}, {"editor": editor}, collapse))
    figure = metric_grid(
        METRICS, lines, unit_metrics=UNIT_METRICS, vertical_spacing=0.06, collapse_panel=1, collapse_lines=True
    )
    title, title_lines = _figure_title(results, "Lifelong editing, one edit after another")
    figure.update_layout(
        title=title,
        height=300 * ((len(METRICS) + 1) // 2) + 20 * title_lines,
        margin={"t": 60 + 20 * title_lines},
        legend={"orientation": "h", "y": -0.05},
    )
    return figure


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
    labels = editor_labels(results)
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
            numbers = run_correlation(result, correlation)
            measured = np.asarray(pairs.get(key) or [], dtype=np.float64)
            figure.add_trace(
                go.Scatter(
                    x=predicted[keep].tolist(),
                    y=measured[keep].tolist() if len(measured) == len(predicted) else [],
                    mode="markers",
                    name=f"{label}: Pearson r = {format_r(numbers.get('pearson'))}, Spearman ρ = "
                    f"{format_r(numbers.get('spearman'))} (n = {numbers.get('n', len(predicted)):,}{shown})",
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


# ------------------------------------------------------------------------------------------------------ a study


def _run_name(run: Mapping[str, Any]) -> str:
    """Return a study run's legend name: editor · order · layer."""
    config = run_config(run)
    return f"{editor_label(run['editor'])} · order {config.get('seed')} · layer {config.get('layer')}"


def study_figure(runs: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Return the study's metrics against the number of edits: one line per run (colour: editor, dash: order)."""
    if not runs:
        raise KisError("no runs to draw: pass the runs of a study (kis_lens.editing.lifelong_study.load_study)")
    seeds = sorted({int(run_config(run).get("seed", 0)) for run in runs})
    layers = sorted({int(run_config(run).get("layer", 0)) for run in runs})
    lines = []
    for run in runs:
        editor, config, name = run["editor"], run_config(run), _run_name(run)
        colour = editor_colour(editor)
        dash = ORDER_DASHES[seeds.index(int(config.get("seed", 0))) % len(ORDER_DASHES)]
        width = 2.0 if int(config.get("layer", 0)) == layers[0] else 1.0  # a second layer: thinner lines

        style = {"mode": "lines", "name": name, "legendgroup": name}
        collapse = {
            "y": [0.0],
            "name": f"{name}: collapse at {{step}}",
            "legendgroup": name,
            "showlegend": False,
            "marker": {"color": colour, "symbol": "x", "size": 9},
            "meta": {"editor": editor, "seed": config.get("seed"), "metric": "collapse"},
        }
        meta = {"editor": editor, "seed": config.get("seed"), "layer": config.get("layer")}
        lines.append(PanelLine(run, {**style, "line": {"color": colour, "dash": dash, "width": width}}, meta, collapse))
    figure = metric_grid(
        STUDY_METRICS,
        lines,
        unit_metrics=STUDY_UNIT_METRICS,
        vertical_spacing=0.09,
        collapse_panel=0,
        collapse_lines=False,
    )
    model = shared_text({str(i): run for i, run in enumerate(runs)}, model_name)
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
    seeds = sorted({int(run_config(run).get("seed", 0)) for run in runs})
    for run in runs:
        edits = run.get("edits") or []
        seen: dict[int, tuple[int, float]] = {}
        for index, edit in enumerate(edits):
            if edit.get("update_delta_norm") is not None:
                seen[int(edit.get("update", index))] = (index + 1, float(edit["update_delta_norm"]))
        if not seen or not any(norm > 0 for _, norm in seen.values()):
            continue
        x, y = zip(*sorted(seen.values()))
        dash = ORDER_DASHES[seeds.index(int(run_config(run).get("seed", 0))) % len(ORDER_DASHES)]
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
    model = shared_text({str(i): run for i, run in enumerate(runs)}, model_name) if runs else "model"
    figure.update_layout(
        title=f"{model}: ‖ΔW‖_F of each update (edit layer); circles: disabling edits (‖ΔW‖ > 10× running median, "
        "then a perplexity jump)",
        xaxis_title="edit",
        yaxis_title="‖ΔW‖_F",
        yaxis_type="log",
        template="plotly_white",
        height=500,
    )
    return figure
