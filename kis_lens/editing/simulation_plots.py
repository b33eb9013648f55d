"""Plotly figures of the lifelong-editing simulation (kis_lens.editing.simulation), from its JSON-ready result dict,
and the report sections that show saved simulations (kis_lens.editing.results finds a matrices run's own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kis_lens.figure_files import write_html_figures
from kis_lens.report import ReportSection

CONDITION_LABELS: dict[str, str] = {
    "rome": "p-ROME rank one (plain keys), real keys",
    "rome_orthogonal": "p-ROME rank one, whitened-orthogonal keys (control)",
    "alphaedit": "AlphaEdit-style null space (one layer, relative threshold)",
    "memit": "EMMET-like batch fit (one layer, λ), real keys",
}
CONDITION_COLORS: dict[str, str] = {
    "rome": "#d62728",
    "rome_orthogonal": "#2ca02c",
    "alphaedit": "#1f77b4",
    "memit": "#ff7f0e",
}


def retention_figure(result: dict[str, Any]) -> go.Figure:
    """Return efficacy, retention and unedited-fact drift against the number of edits, one line per condition."""
    figure = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "efficacy of the newest edit",
            "retention of earlier edits",
            "drift of unedited facts |Δ log p(true)|",
        ),
    )
    for name, curve in result["curves"].items():
        label, color = CONDITION_LABELS.get(name, name), CONDITION_COLORS.get(name)
        for column, metric in enumerate(("efficacy", "retention", "unedited_logprob_drift"), start=1):
            figure.add_trace(
                go.Scatter(
                    x=curve["n_edits"],
                    y=curve[metric],
                    mode="lines+markers",
                    name=label,
                    legendgroup=name,
                    showlegend=column == 1,
                    line={"color": color},
                    marker={"size": 4},
                ),
                row=1,
                col=column,
            )
    for column in (1, 2, 3):
        figure.update_xaxes(title_text="number of edits", row=1, col=column)
    figure.update_yaxes(range=[-0.05, 1.05], row=1, col=1)
    figure.update_yaxes(range=[-0.05, 1.05], row=1, col=2)
    model = result.get("settings", {}).get("model", {}).get("name", "")
    layer = result.get("settings", {}).get("config", {}).get("layer", "")
    figure.update_layout(
        title=f"Lifelong editing of {model}, layer {layer}", height=420, legend={"orientation": "h", "y": -0.25}
    )
    return figure


def interference_figure(result: dict[str, Any]) -> go.Figure:
    """Return the scatter of the drift predicted from P against the measured drift (ROME, real keys)."""
    scatter = result.get("scatter") or {}
    summary = result.get("summary", {}).get("rome", {})
    output_r = (summary.get("predicted_vs_measured_output_drift") or {}).get("pearson")
    logprob_r = (summary.get("predicted_vs_measured_logprob_drift") or {}).get("spearman")
    figure = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            f"MLP output at the subject (Pearson r = {output_r:.4f})"
            if output_r is not None
            else "MLP output at the subject",
            f"model's log p(true) (Spearman ρ = {logprob_r:.3f})" if logprob_r is not None else "model's log p(true)",
        ),
    )
    predicted = scatter.get("predicted", [])
    for column, key in enumerate(("measured_output", "measured_logprob"), start=1):
        figure.add_trace(
            go.Scatter(
                x=predicted,
                y=scatter.get(key, []),
                mode="markers",
                marker={"size": 4, "opacity": 0.5, "color": "#d62728"},
                showlegend=False,
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="predicted ‖Σ P[i,u] r_i‖ / ‖m_u‖", row=1, col=column)
    figure.update_yaxes(title_text="measured ‖Δm_u‖ / ‖m_u‖", row=1, col=1)
    figure.update_yaxes(title_text="measured |Δ log p(true)|", row=1, col=2)
    model = result.get("settings", {}).get("model", {}).get("name", "")
    title = "Interference predicted from P vs measured, unedited facts after every edit"
    figure.update_layout(title=f"{model}: {title}" if model else title, height=420)
    return figure


def editing_figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    """Return {name: figure} for the report: "edit_retention" and "edit_interference"."""
    figures = {"edit_retention": retention_figure(result)}
    if result.get("scatter"):
        figures["edit_interference"] = interference_figure(result)
    return figures


def write_editing_figures(result: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write each figure as a standalone HTML file (atomically) into folder; return {name: path}."""
    return write_html_figures(editing_figures(result), folder)


def edit_simulation_sections(simulations: Iterable[tuple[Path, dict[str, Any]]]) -> list[ReportSection]:
    """Return a report section per saved `kis edit-sim` result, given as (edit_sim.json path, its contents)."""
    sections = []
    for path, saved in simulations:
        sections.append(
            ReportSection(
                f"Lifelong editing: {path.parent.name}",
                figures=list(editing_figures(saved).values()),
                intro=f"From {path}: sequential edits with real keys, whitened-orthogonal keys (control), "
                "a null-space projected editor and MEMIT batches; predicted (from P) vs measured interference.",
            )
        )
    return sections
