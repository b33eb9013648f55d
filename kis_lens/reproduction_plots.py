"""The reproduction's figures: intervals per layer against the null model, convergence, and the run's own plots.

>>> figures = write_figures(result, report, Path("docs/figures/reproduction"))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go

from kis_lens.docs.reproduction import BUDGET_FRACTIONS, Reproduction, interval
from kis_lens.figure_files import write_figure_files
from kis_lens.plot_distributions import Band, band_figure, histogram_figure, layer_trends_figure, orthogonality_figure
from kis_lens.plots import result_model_name
from kis_lens.results import RunResult


def _band(name: str, rows: Sequence[Mapping[str, Any]], matrix: str, statistic: str, dash: str | None = None) -> Band:
    """Return one statistic's values and interval bounds over the layers as a band."""
    bounds = [interval(row, matrix, statistic) for row in rows]
    return Band(name, [b["value"] for b in bounds], [b["low"] for b in bounds], [b["high"] for b in bounds], dash)


def reproduction_figures(result: RunResult, report: Reproduction) -> dict[str, go.Figure]:
    """Return the reproduction's figures by file stem, each titled with the model."""
    rows = report.layers
    layers = [row["layer"] for row in rows]
    null = {row["layer"]: row for row in report.null_model.get("layers", [])}
    null_rows = [null[layer] for layer in layers] if null else []

    def with_null(matrix: str, statistic: str) -> list[Band]:
        model = [_band("model", rows, matrix, statistic)]
        return model + ([_band("random init", null_rows, matrix, statistic, "dot")] if null else [])

    panels = {
        "std of off-diagonal P": with_null("p", "std"),
        "excess kurtosis of P (Fisher, 0 = Gaussian)": with_null("p", "excess_kurtosis"),
        "mean |cos|, whitened keys": with_null("whitening", "mean_abs")
        + [Band("random directions", [row["random_mean_abs_cos"] for row in rows], dash="dash")],
    }
    convergence = {
        "relative RMS of P vs P from all tokens": [
            Band(
                f"C from {fraction} of the tokens",
                [row["convergence"][fraction]["p_vs_all"]["relative_rms"] for row in rows],
            )
            for fraction in BUDGET_FRACTIONS
            if fraction != "all"
        ]
        + [Band("two disjoint halves, each other", [row["halves"]["relative_rms"] for row in rows], dash="dash")],
        "std of off-diagonal P": [
            Band(f"{fraction} of the tokens", [row["convergence"][fraction]["p_std"] for row in rows])
            for fraction in BUDGET_FRACTIONS
        ],
        "condition number of C (log10)": [Band("cond(C)", [math.log10(row["condition"]) for row in rows])],
    }
    model = result_model_name(result)
    figures = {
        "error_bars": band_figure(
            layers, panels, "layer", "Per-layer statistics with 95% bootstrap intervals over facts", model
        ),
        "convergence": band_figure(
            layers, convergence, "layer", "Does the token budget suffice? P at ¼, ½ and all tokens", model
        ),
        "layer_trends": layer_trends_figure(result, ["p_matrix", "whitening_cos", "activation_cos"]),
        "orthogonality": orthogonality_figure(result),
        "p_histogram": histogram_figure(result, "p_matrix"),
    }
    return figures


def write_figures(result: RunResult, report: Reproduction, folder: Path) -> list[dict[str, str | None]]:
    """Write the reproduction's figures (HTML, plus PNG when possible); return their paths."""
    return [
        write_figure_files(figure, folder / f"{name}.html")
        for name, figure in reproduction_figures(result, report).items()
    ]
