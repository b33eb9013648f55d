"""Interactive Plotly figures of a run: heatmaps (one layer or a layer slider), histograms and KDEs of
off-diagonal values, kurtosis / mean |value| by layer, and whitening-vs-activation orthogonality.

Every function returns a ``plotly.graph_objects.Figure``; show it with ``fig.show()`` or save it with
``fig.write_html(path)``.

>>> fig = layer_heatmaps(result, "p_matrix")   # drag the slider through the layers
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import sample_colorscale
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots
from torch import Tensor

from kis_lens.analysis import (
    DEFAULT_THRESHOLD,
    off_diagonal_values,
    orthogonality_comparison,
    require_matrices,
    summary_arrays,
)
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.io import atomic_write
from kis_lens.results import RunResult

HEATMAP_COLORSCALE = "RdBu_r"  # diverging: blue negative, white 0, red positive
# Beyond this many facts the tick labels would overlap; hover still names both facts.
MAX_TICK_LABELS = 40
# The KDE is exact (O(values × grid)); above this many values it uses a seeded subsample.
MAX_KDE_POINTS = 20_000


@dataclass(frozen=True)
class MatrixStyle:
    """How a matrix is named, labelled and coloured in figures."""

    title: str
    symbol: str
    axis_label: str  # with unit
    bounded: bool  # values lie in [-1, 1] (cosines) or are read on that scale (P)
    color: str


MATRIX_STYLES: dict[str, MatrixStyle] = {
    "p_matrix": MatrixStyle(
        "P matrix (edit interference)", "P", "P[i, j] = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ (dimensionless)", True, "#d62728"
    ),
    "q_matrix": MatrixStyle("Q matrix (key dot products)", "Q", "Q[i, j] = kᵢ·kⱼ (activation²)", False, "#7f7f7f"),
    "whitening_cos": MatrixStyle(
        "Whitening-space cosine", "cos_w", "cosine of C^(-1/2)kᵢ and C^(-1/2)kⱼ (dimensionless)", True, "#1f77b4"
    ),
    "activation_cos": MatrixStyle(
        "Activation-space cosine", "cos_a", "cosine of kᵢ and kⱼ (dimensionless)", True, "#2ca02c"
    ),
}


def matrix_style(name: str) -> MatrixStyle:
    """Return the display style of a matrix name (a neutral one for unknown names)."""
    return MATRIX_STYLES.get(name, MatrixStyle(name, name, f"{name} value", False, "#9467bd"))


def fact_label(index: int, fact: Fact) -> str:
    """Return the unique hover label of a fact: "#index prompt-with-subject → answer"."""
    return f"#{index} {fact.text} → {fact.target_true}"


def fact_tick(index: int, fact: Fact, width: int = 24) -> str:
    """Return a short axis tick for a fact: "#index subject", truncated to width characters."""
    text = f"#{index} {fact.subject}"
    return text if len(text) <= width else text[: width - 1] + "…"


def layer_colors(n: int) -> list[str]:
    """Return n colours running along Viridis, early layers dark, late layers yellow."""
    return sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])


def _colour_range(name: str, matrices: Sequence[Tensor]) -> tuple[float, float]:
    if matrix_style(name).bounded:
        return -1.0, 1.0
    # Unbounded (Q): symmetric around 0 from the off-diagonal values, so the large diagonal saturates.
    limit = max(off_diagonal_values(matrix).abs().max().item() for matrix in matrices)
    limit = limit if limit > 0 else 1.0
    return -limit, limit


def heatmap_trace(
    matrix: Float[Tensor, "fact fact"],
    facts: Sequence[Fact],
    name: str = "p_matrix",
    layer: int | None = None,
    zrange: tuple[float, float] | None = None,
    visible: bool = True,
) -> go.Heatmap:
    """Return one Heatmap trace whose hover names the row fact, the column fact and the value."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(facts):
        raise KisError(f"need a square [fact, fact] matrix matching {len(facts)} facts, got {tuple(matrix.shape)}")
    style = matrix_style(name)
    labels = [fact_label(i, fact) for i, fact in enumerate(facts)]
    zmin, zmax = zrange or _colour_range(name, [matrix])
    where = "" if layer is None else f"layer {layer}"
    return go.Heatmap(
        z=matrix.detach().float().cpu().numpy(),
        x=labels,
        y=labels,
        zmin=zmin,
        zmax=zmax,
        zmid=0.0,
        colorscale=HEATMAP_COLORSCALE,
        colorbar={"title": {"text": style.symbol}},
        name=where or style.symbol,
        visible=visible,
        hovertemplate=(
            "row i: %{y}<br>column j: %{x}<br>" + style.symbol + "[i, j] = %{z:.4f}<extra>" + where + "</extra>"
        ),
    )


def _heatmap_axes(fig: go.Figure, facts: Sequence[Fact]) -> None:
    labels = [fact_label(i, fact) for i, fact in enumerate(facts)]
    ticks = [fact_tick(i, fact) for i, fact in enumerate(facts)]
    show = len(facts) <= MAX_TICK_LABELS
    # constrain="domain" shrinks the plot area (not the range) to keep cells square: no grey margins.
    common = {"tickvals": labels, "ticktext": ticks, "showticklabels": show, "type": "category", "constrain": "domain"}
    fig.update_xaxes(title_text="column fact j (the fact an edit of i spills onto)", tickangle=-60, **common)
    # Row 0 at the top, as a matrix is printed.
    fig.update_yaxes(title_text="row fact i (the edited fact)", autorange="reversed", scaleanchor="x", **common)


def heatmap(
    matrix: Float[Tensor, "fact fact"], facts: Sequence[Fact], name: str = "p_matrix", layer: int | None = None
) -> go.Figure:
    """Return a heatmap of one layer's matrix: diverging colours centred on 0 (−1..1 for P and cosines)."""
    style = matrix_style(name)
    fig = go.Figure(heatmap_trace(matrix, facts, name, layer))
    suffix = "" if layer is None else f", layer {layer}"
    fig.update_layout(title_text=f"{style.title}{suffix}", height=650, width=760)
    _heatmap_axes(fig, facts)
    return fig


def result_heatmap(result: RunResult, name: str = "p_matrix", layer: int | None = None) -> go.Figure:
    """Return the heatmap of one matrix at one layer of a run (default: its first layer)."""
    require_matrices(result, [name])
    layer = result.layers[0] if layer is None else layer
    if layer not in result.layers:
        raise KisError(f"layer {layer} not in these results: they hold layers {result.layers}")
    return heatmap(result.layer(name, layer), result.facts, name, layer)


def layer_heatmaps(result: RunResult, name: str = "p_matrix") -> go.Figure:
    """Return one figure holding every layer's heatmap of a matrix, with a slider to pick the layer."""
    require_matrices(result, [name])
    style = matrix_style(name)
    matrices = [result.layer(name, layer) for layer in result.layers]
    zrange = _colour_range(name, matrices)
    fig = go.Figure(
        [
            heatmap_trace(matrix, result.facts, name, layer, zrange=zrange, visible=index == 0)
            for index, (layer, matrix) in enumerate(zip(result.layers, matrices))
        ]
    )
    steps = [
        {
            "method": "update",
            "label": str(layer),
            "args": [
                {"visible": [other == index for other in range(len(result.layers))]},
                {"title": {"text": f"{style.title}, layer {layer}"}},
            ],
        }
        for index, layer in enumerate(result.layers)
    ]
    # The slider sits below the x axis: leave room for the rotated fact ticks and the axis title.
    ticks_shown = len(result.facts) <= MAX_TICK_LABELS
    fig.update_layout(
        title_text=f"{style.title}, layer {result.layers[0]}",
        sliders=[
            {
                "active": 0,
                "currentvalue": {"prefix": "layer "},
                "pad": {"t": 200 if ticks_shown else 70},
                "steps": steps,
            }
        ],
        height=860 if ticks_shown else 760,
        width=780,
        margin={"b": 260 if ticks_shown else 140},
    )
    _heatmap_axes(fig, result.facts)
    return fig


def _values_by_layer(result: RunResult, name: str) -> dict[int, np.ndarray]:
    require_matrices(result, [name])
    return {layer: off_diagonal_values(result.layer(name, layer)).cpu().numpy() for layer in result.layers}


def histogram_figure(result: RunResult, name: str = "p_matrix", bins: int = 60) -> go.Figure:
    """Return overlaid density histograms of a matrix's off-diagonal values, one bar trace per layer, shared bins."""
    if bins < 1:
        raise KisError(f"bins must be at least 1, got {bins}")
    style = matrix_style(name)
    values = _values_by_layer(result, name)
    everything = np.concatenate(list(values.values()))
    edges = np.histogram_bin_edges(everything, bins=bins)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure()
    for (layer, layer_values), colour in zip(values.items(), layer_colors(len(values))):
        density, _ = np.histogram(layer_values, bins=edges, density=True)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=density,
                width=widths,
                name=f"layer {layer}",
                marker_color=colour,
                opacity=0.55,
                hovertemplate=f"layer {layer}<br>{style.symbol} ≈ %{{x:.3f}}<br>density %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title_text=f"{style.title}: off-diagonal values by layer",
        barmode="overlay",
        bargap=0,
        xaxis_title=style.axis_label,
        yaxis_title="probability density (1 / value unit)",
        legend_title_text="click to hide/show",
    )
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
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=gaussian_kde(sample, grid, widths[layer]),
                mode="lines",
                name=f"layer {layer}",
                line={"color": colour},
                hovertemplate=f"layer {layer}<br>{style.symbol} = %{{x:.3f}}<br>density %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title_text=f"{style.title}: kernel density of off-diagonal values (Gaussian, Scott's bandwidth)",
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
    fig.update_layout(title_text="Superposition by layer: heavy tails and magnitude of off-diagonal values", height=480)
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
        title_text="Does whitening make knowledge orthogonal? Mean |cos| of off-diagonal fact pairs",
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


def band_figure(x: Sequence[float], panels: dict[str, Sequence[Band]], x_title: str, title: str) -> go.Figure:
    """Return one panel per entry of `panels` (key: y-axis title), each line drawn with its shaded interval."""
    if not panels:
        raise KisError("band_figure needs at least one panel")
    figure = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f"]
    for row, (y_title, bands) in enumerate(panels.items(), start=1):
        for index, band in enumerate(bands):
            color = palette[index % len(palette)]
            if band.low is not None and band.high is not None:
                figure.add_trace(
                    go.Scatter(
                        x=[*x, *reversed(list(x))],
                        y=[*band.high, *reversed(list(band.low))],
                        fill="toself",
                        mode="lines",
                        fillcolor=color,
                        opacity=0.18,
                        line={"width": 0},
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
                    showlegend=row == 1 or band.name not in {b.name for b in panels[next(iter(panels))]},
                    line={"color": color, "dash": band.dash},
                    marker={"size": 4},
                ),
                row=row,
                col=1,
            )
        figure.update_yaxes(title_text=y_title, row=row, col=1)
    figure.update_xaxes(title_text=x_title, row=len(panels), col=1)
    figure.update_layout(title=title, height=260 * len(panels) + 120, template="plotly_white")
    return figure


PLOTLY_BUNDLE = "plotly.min.js"  # written once per figures folder: the HTML loads it from beside itself, offline


def _write_plotly_bundle(folder: Path) -> None:
    """Write Plotly's JavaScript into folder unless the same bundle is already there."""
    bundle, script = folder / PLOTLY_BUNDLE, get_plotlyjs()
    if not bundle.is_file() or bundle.read_text(encoding="utf-8") != script:
        atomic_write(bundle, lambda temp: temp.write_text(script, encoding="utf-8"))


def write_figure_files(figure: go.Figure, html: str | Path, png: bool = True) -> dict[str, str | None]:
    """Write a figure as interactive HTML (Plotly from plotly.min.js beside it, never a CDN) and, when png and
    Plotly's static export (kaleido) works, a PNG beside it; return {"html": path, "png": path or None}."""
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    _write_plotly_bundle(html.parent)
    text = figure.to_html(include_plotlyjs="directory", full_html=True)
    atomic_write(html, lambda temp: temp.write_text(text, encoding="utf-8"))
    if not png:
        return {"html": str(html), "png": None}
    image: str | None = str(html.with_suffix(".png"))
    try:
        atomic_write(image, lambda temp: figure.write_image(str(temp), format="png", width=1000, scale=1))
    except Exception:  # noqa: BLE001 - kaleido or its browser missing: the HTML is still there
        image = None
    return {"html": str(html), "png": image}


def write_html_figures(figures: Mapping[str, go.Figure], folder: str | Path) -> dict[str, Path]:
    """Write each figure as HTML into folder (write_figure_files, no PNG); return {name: path}."""
    return {
        name: Path(write_figure_files(figure, Path(folder) / f"{name}.html", png=False)["html"])
        for name, figure in figures.items()
    }
