"""Plotly figures of how a run's off-diagonal values are distributed: per layer (histograms on shared bins, Gaussian
KDEs) and as statistics across layers (kurtosis and mean |value|, mean |cos| against random directions, and any
per-layer statistic with its interval band). Styling and titles come from kis_lens.plots.

>>> fig = histogram_figure(result, "p_matrix")   # one panel per layer, shared bins
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from kis_lens.analysis import (
    DEFAULT_THRESHOLD,
    off_diagonal_values,
    orthogonality_comparison,
    require_matrices,
    summary_arrays,
)
from kis_lens.errors import KisError
from kis_lens.plots import layer_colors, layer_heatmaps, matrix_style, result_model_name, titled
from kis_lens.results import RunResult

# The KDE is exact (O(values × grid)); above this many values it uses a seeded subsample.
MAX_KDE_POINTS = 20_000
# Beyond this many layers a histogram grid shows evenly spaced layers (first and last included), not all of them.
MAX_HISTOGRAM_PANELS = 12
HISTOGRAM_COLUMNS = 4


def _values_by_layer(result: RunResult, name: str) -> dict[int, np.ndarray]:
    require_matrices(result, [name])
    return {layer: off_diagonal_values(result.layer(name, layer)).cpu().numpy() for layer in result.layers}


def evenly_spaced_layers(layers: Sequence[int], count: int) -> list[int]:
    """Return at most count of the layers, evenly spaced, first and last included (all of them when few)."""
    if count < 1:
        raise KisError(f"need at least one layer to show, got {count}")
    if len(layers) <= count:
        return list(layers)
    return [layers[i] for i in sorted({round(i) for i in np.linspace(0, len(layers) - 1, count)})]


def histogram_figure(
    result: RunResult, name: str = "p_matrix", bins: int = 60, layers: Sequence[int] | None = None
) -> go.Figure:
    """Return density histograms of a matrix's off-diagonal values, one panel per layer on shared bins and x axis
    (layers: which ones; default all, or MAX_HISTOGRAM_PANELS evenly spaced ones when there are more)."""
    if bins < 1:
        raise KisError(f"bins must be at least 1, got {bins}")
    style = matrix_style(name)
    values = _values_by_layer(result, name)
    shown = evenly_spaced_layers(result.layers, MAX_HISTOGRAM_PANELS) if layers is None else list(layers)
    missing = [layer for layer in shown if layer not in values]
    if missing or not shown:
        raise KisError(f"layers {missing or shown} not in these results: they hold layers {result.layers}")
    everything = np.concatenate([values[layer] for layer in shown])
    edges = np.histogram_bin_edges(everything[np.isfinite(everything)], bins=bins)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    columns = min(HISTOGRAM_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig = make_subplots(
        rows=rows,
        cols=columns,
        shared_xaxes="all",
        subplot_titles=[f"layer {layer}" for layer in shown],
        horizontal_spacing=0.06,
        vertical_spacing=min(0.12, 0.5 / rows),
    )
    for index, (layer, colour) in enumerate(zip(shown, layer_colors(len(shown)))):
        density, _ = np.histogram(values[layer], bins=edges, density=True)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=density,
                width=widths,
                name=f"layer {layer}",
                marker_color=colour,
                showlegend=False,
                hovertemplate=f"layer {layer}<br>{style.symbol} ≈ %{{x:.3g}}<br>density %{{y:.3g}}<extra></extra>",
            ),
            row=index // columns + 1,
            col=index % columns + 1,
        )
    which = "" if len(shown) == len(result.layers) else f" ({len(shown)} of {len(result.layers)} layers)"
    fig.update_layout(
        title_text=titled(f"{style.title}: off-diagonal values by layer{which}", result_model_name(result)),
        bargap=0,
        height=190 * rows + 150,
    )
    # One axis title for the grid: on the bottom-left panel, as the panels share their x axis.
    fig.update_xaxes(title_text=style.axis_label, row=rows, col=1)
    fig.update_yaxes(title_text="density", col=1)
    return fig


def scott_bandwidth(values: np.ndarray) -> float:
    """Return Scott's rule kernel width n^(−1/5)·std(ddof=1), the one scipy.stats.gaussian_kde uses in 1-D."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        raise KisError("a KDE needs at least two values")
    return float(values.size ** (-1 / 5) * values.std(ddof=1))


def gaussian_kde(values: np.ndarray, grid: np.ndarray, bandwidth: float | None = None, chunk: int = 4096) -> np.ndarray:
    """Return the Gaussian kernel density of values at each grid point (bandwidth default: Scott's rule)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    grid = np.asarray(grid, dtype=np.float64).ravel()
    width = scott_bandwidth(values) if bandwidth is None else float(bandwidth)
    if not width > 0 or not math.isfinite(width):
        raise KisError(f"KDE bandwidth must be a positive number, got {width} (are all values equal?)")
    density = np.zeros_like(grid)
    # Chunks keep the grid × values block small for matrices of thousands of facts.
    for start in range(0, values.size, chunk):
        block = (grid[:, None] - values[None, start : start + chunk]) / width
        density += np.exp(-0.5 * block**2).sum(axis=1)
    return density / (values.size * width * math.sqrt(2 * math.pi))


def kde_figure(
    result: RunResult, name: str = "p_matrix", grid_points: int = 256, max_points: int = MAX_KDE_POINTS, seed: int = 0
) -> go.Figure:
    """Return Gaussian KDE curves (Scott's bandwidth) of a matrix's off-diagonal values, one line per layer."""
    style = matrix_style(name)
    values = _values_by_layer(result, name)
    generator = np.random.default_rng(seed)
    samples = {
        layer: generator.choice(v, max_points, replace=False) if v.size > max_points else v
        for layer, v in values.items()
    }
    widths = {layer: scott_bandwidth(v) for layer, v in samples.items()}
    low = min(v.min() - 3 * widths[layer] for layer, v in samples.items())
    high = max(v.max() + 3 * widths[layer] for layer, v in samples.items())
    grid = np.linspace(low, high, grid_points)
    fig = go.Figure()
    for (layer, sample), colour in zip(samples.items(), layer_colors(len(samples))):
        if not widths[layer] > 0:
            continue  # every value equal: no density to draw
        # float32 halves what a page stores per curve; a density needs no more than 7 digits.
        fig.add_trace(
            go.Scatter(
                x=grid.astype(np.float32),
                y=gaussian_kde(sample, grid, widths[layer]).astype(np.float32),
                mode="lines",
                name=f"layer {layer}",
                line={"color": colour},
                hovertemplate=f"layer {layer}<br>{style.symbol} = %{{x:.3f}}<br>density %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title_text=titled(
            f"{style.title}: kernel density of off-diagonal values (Gaussian, Scott's bandwidth)",
            result_model_name(result),
        ),
        xaxis_title=style.axis_label,
        yaxis_title="probability density (1 / value unit)",
        legend_title_text="click to hide/show",
    )
    return fig


def layer_trends_figure(
    result: RunResult, names: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD
) -> go.Figure:
    """Return two panels by layer, a line per matrix: Fisher kurtosis and mean |value| (log scale) of off-diagonals."""
    arrays = summary_arrays(result, names, threshold)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("excess (Fisher) kurtosis of off-diagonal values", "mean |off-diagonal value| (log scale)"),
        horizontal_spacing=0.12,
    )
    for name, columns in arrays.items():
        style = matrix_style(name)
        for column_index, column in enumerate(("kurtosis", "mean_abs"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=columns["layer"],
                    y=columns[column],
                    mode="lines+markers",
                    name=style.title,
                    legendgroup=name,
                    showlegend=column_index == 1,
                    line={"color": style.color},
                    hovertemplate=f"{style.symbol}, layer %{{x}}<br>{column} = %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=column_index,
            )
    fig.update_xaxes(title_text="layer", dtick=1 if len(result.layers) <= 16 else None)
    fig.update_yaxes(title_text="excess kurtosis (0 = Gaussian, dimensionless)", row=1, col=1)
    fig.update_yaxes(title_text="mean |value| (Q in activation², others dimensionless)", type="log", row=1, col=2)
    fig.update_layout(
        title_text=titled(
            "Superposition by layer: heavy tails and magnitude of off-diagonal values", result_model_name(result)
        ),
        height=480,
    )
    return fig


def orthogonality_figure(result: RunResult, threshold: float = DEFAULT_THRESHOLD) -> go.Figure:
    """Return mean |cos| by layer in whitening and activation space, against random directions in d_mlp dims."""
    rows = orthogonality_comparison(result, threshold)
    layers = [row.layer for row in rows]
    fig = go.Figure()
    for key, name in (("whitening_mean_abs", "whitening_cos"), ("activation_mean_abs", "activation_cos")):
        style = matrix_style(name)
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[getattr(row, key) for row in rows],
                mode="lines+markers",
                name=style.title,
                line={"color": style.color},
                hovertemplate=f"{style.title}, layer %{{x}}<br>mean |cos| = %{{y:.4f}}<extra></extra>",
            )
        )
    if rows and rows[0].random_mean_abs is not None:
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[row.random_mean_abs for row in rows],
                mode="lines",
                name="random directions in d_mlp dims (orthogonal baseline)",
                line={"color": "black", "dash": "dash"},
                hovertemplate="random baseline<br>mean |cos| = %{y:.4f}<extra></extra>",
            )
        )
    fig.update_layout(
        title_text=titled(
            "Does whitening make knowledge orthogonal? Mean |cos| of off-diagonal fact pairs", result_model_name(result)
        ),
        xaxis_title="layer",
        yaxis_title="mean |cosine| (dimensionless)",
        yaxis_rangemode="tozero",
    )
    fig.update_xaxes(dtick=1 if len(layers) <= 16 else None)
    return fig


def matrix_figures(result: RunResult, name: str) -> list[go.Figure]:
    """Return the standard figures of one matrix: layer-slider heatmap, histogram and KDE."""
    return [layer_heatmaps(result, name), histogram_figure(result, name), kde_figure(result, name)]


@dataclass(frozen=True)
class Band:
    """One line of a band figure: a value per x with an interval around it (low/high None: a plain line)."""

    name: str
    values: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    dash: str | None = None
    color: str | None = None  # None: band_figure gives each distinct name its own colour


def band_colors(panels: Mapping[str, Sequence[Band]]) -> dict[str, str]:
    """Return {band name: colour}: a band's own colour, else the next unused one of a qualitative palette, so every
    series differs from every other and a name repeated across panels keeps one colour (and one legend entry)."""
    names = list(dict.fromkeys(band.name for bands in panels.values() for band in bands))
    given = {band.name: band.color for bands in panels.values() for band in bands if band.color}
    palette = [c for c in (qualitative.D3 if len(names) <= 10 else qualitative.Dark24) if c not in given.values()]
    free = iter(palette * (len(names) // max(len(palette), 1) + 1))
    return {name: given.get(name) or next(free) for name in names}


def band_figure(
    x: Sequence[float],
    panels: dict[str, Sequence[Band]],
    x_title: str,
    title: str,
    model_name: str | None = None,
) -> go.Figure:
    """Return one panel per entry of `panels` (key: y-axis title), each line drawn with its shaded interval."""
    if not panels:
        raise KisError("band_figure needs at least one panel")
    figure = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06)
    colors, in_legend = band_colors(panels), set()
    for row, (y_title, bands) in enumerate(panels.items(), start=1):
        for band in bands:
            color = colors[band.name]
            if band.low is not None and band.high is not None:
                figure.add_trace(
                    go.Scatter(
                        x=[*x, *reversed(list(x))],
                        y=[*band.high, *reversed(list(band.low))],
                        fill="toself",
                        mode="lines",
                        fillcolor=color,
                        opacity=0.18,
                        line={"width": 0, "color": color},
                        hoverinfo="skip",
                        showlegend=False,
                        legendgroup=band.name,
                    ),
                    row=row,
                    col=1,
                )
            figure.add_trace(
                go.Scatter(
                    x=list(x),
                    y=list(band.values),
                    mode="lines+markers",
                    name=band.name,
                    legendgroup=band.name,
                    showlegend=band.name not in in_legend,  # once per series, in whichever panel it first appears
                    line={"color": color, "dash": band.dash},
                    marker={"size": 4, "color": color},
                ),
                row=row,
                col=1,
            )
            in_legend.add(band.name)
        figure.update_yaxes(title_text=y_title, row=row, col=1)
    figure.update_xaxes(title_text=x_title, row=len(panels), col=1)
    figure.update_layout(title=titled(title, model_name), height=260 * len(panels) + 120, template="plotly_white")
    return figure
