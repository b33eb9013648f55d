"""Interactive Plotly figures of a run: heatmaps (one layer or a layer slider), histograms and KDEs of
off-diagonal values, kurtosis / mean |value| by layer, and whitening-vs-activation orthogonality.

Every function returns a ``plotly.graph_objects.Figure``; show it with ``fig.show()`` or save it with
``fig.write_html(path)``.

>>> fig = layer_heatmaps(result, "p_matrix")   # drag the slider through the layers

Every figure of a run is titled with its model. A slider heatmap colours each layer on its own range when the
layers differ by orders of magnitude (colour_ranges); packed_layer_heatmaps is the same figure for a page that
stores every layer packed (float16 or 8 bits) and draws one at a time, what kis_lens.report uses.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from html import escape as html_escape
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from jaxtyping import Float
from plotly.colors import qualitative, sample_colorscale
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
# Beyond this many layers a histogram grid shows evenly spaced layers (first and last included), not all of them.
MAX_HISTOGRAM_PANELS = 12
HISTOGRAM_COLUMNS = 4
ColourScale = Literal["auto", "layer", "shared"]
# "auto" colours each layer on its own range once the layers' largest |off-diagonal| differ by more than this
# factor: on one shared range a layer 1000× smaller than the largest draws as blank white.
LAYER_RANGE_RATIO = 10.0
Precision = Literal["f16", "u8"]


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


def result_model_name(result: RunResult) -> str | None:
    """Return the model a run measured (its model record, else its config), None when neither names it."""
    model = (result.settings.get("model") or {}).get("name") or (result.settings.get("config") or {}).get("model_name")
    return str(model) if model else None


def titled(text: str, model_name: str | None) -> str:
    """Return a figure title naming its model first ("model: text"), text alone when the model is unknown."""
    return f"{model_name}: {text}" if model_name else text


def _off_diagonal_limit(matrix: Tensor) -> float:
    """Return the largest finite |off-diagonal value| of a matrix, 1.0 when there is none (or it is 0)."""
    values = off_diagonal_values(matrix).abs()
    values = values[torch.isfinite(values)]
    limit = values.max().item() if values.numel() else 0.0
    return limit if limit > 0 else 1.0


def colour_ranges(
    name: str, matrices: Sequence[Tensor], colour_scale: ColourScale = "auto"
) -> list[tuple[float, float]]:
    """Return each matrix's (zmin, zmax): −1..1 for bounded matrices, else ±max |off-diagonal|, per layer or shared.

    "shared": one range over all matrices; "layer": each its own; "auto": −1..1 when bounded, else per layer once
    the layers' ranges differ by more than LAYER_RANGE_RATIO (so no layer draws blank), shared otherwise.
    """
    if colour_scale not in ("auto", "layer", "shared"):
        raise KisError(f"colour_scale must be 'auto', 'layer' or 'shared', got {colour_scale!r}")
    if colour_scale == "auto" and matrix_style(name).bounded:
        return [(-1.0, 1.0)] * len(matrices)
    # Symmetric around 0 from the off-diagonal values, so the large diagonal of Q saturates instead of washing out.
    limits = [_off_diagonal_limit(matrix) for matrix in matrices]
    per_layer = colour_scale == "layer" or (
        colour_scale == "auto" and bool(limits) and max(limits) > LAYER_RANGE_RATIO * min(limits)
    )
    if not per_layer:
        limits = [max(limits, default=1.0)] * len(matrices)
    return [(-limit, limit) for limit in limits]


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
    zmin, zmax = zrange or colour_ranges(name, [matrix])[0]
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
            "row i: %{y}<br>column j: %{x}<br>" + style.symbol + "[i, j] = %{z:.4g}<extra>" + where + "</extra>"
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
    matrix: Float[Tensor, "fact fact"],
    facts: Sequence[Fact],
    name: str = "p_matrix",
    layer: int | None = None,
    model_name: str | None = None,
) -> go.Figure:
    """Return a heatmap of one layer's matrix: diverging colours centred on 0 (−1..1 for P and cosines)."""
    style = matrix_style(name)
    fig = go.Figure(heatmap_trace(matrix, facts, name, layer))
    suffix = "" if layer is None else f", layer {layer}"
    fig.update_layout(title_text=titled(f"{style.title}{suffix}", model_name), height=650, width=760)
    _heatmap_axes(fig, facts)
    return fig


def result_heatmap(result: RunResult, name: str = "p_matrix", layer: int | None = None) -> go.Figure:
    """Return the heatmap of one matrix at one layer of a run (default: its first layer)."""
    require_matrices(result, [name])
    layer = result.layers[0] if layer is None else layer
    if layer not in result.layers:
        raise KisError(f"layer {layer} not in these results: they hold layers {result.layers}")
    return heatmap(result.layer(name, layer), result.facts, name, layer, result_model_name(result))


def _slider_layout(fig: go.Figure, result: RunResult, steps: list[dict[str, Any]], title: str) -> None:
    """Lay out a one-heatmap-at-a-time figure: title, the layer slider below the x axis, square cells."""
    # The slider sits below the x axis: leave room for the rotated fact ticks and the axis title.
    ticks_shown = len(result.facts) <= MAX_TICK_LABELS
    fig.update_layout(
        title_text=title,
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


def layer_heatmaps(result: RunResult, name: str = "p_matrix", colour_scale: ColourScale = "auto") -> go.Figure:
    """Return one figure holding every layer's heatmap of a matrix, with a slider to pick the layer (colour_ranges)."""
    require_matrices(result, [name])
    style, model = matrix_style(name), result_model_name(result)
    matrices = [result.layer(name, layer) for layer in result.layers]
    ranges = colour_ranges(name, matrices, colour_scale)
    fig = go.Figure(
        [
            heatmap_trace(matrix, result.facts, name, layer, zrange=zrange, visible=index == 0)
            for index, (layer, matrix, zrange) in enumerate(zip(result.layers, matrices, ranges))
        ]
    )
    steps = [
        {
            "method": "update",
            "label": str(layer),
            "args": [
                {"visible": [other == index for other in range(len(result.layers))]},
                {"title": {"text": titled(f"{style.title}, layer {layer}", model)}},
            ],
        }
        for index, layer in enumerate(result.layers)
    ]
    _slider_layout(fig, result, steps, titled(f"{style.title}, layer {result.layers[0]}", model))
    return fig


# --------------------------------------------------------------------- heatmaps whose layers load on demand


def encode_layer(matrix: Float[Tensor, "fact fact"], precision: Precision = "f16") -> dict[str, Any]:
    """Return one layer's matrix packed for the page: base64 of float16 values over the largest |value| ("f16",
    about 3 significant digits) or of 8-bit steps between min and max ("u8", 255 = not finite); a symmetric matrix
    keeps its upper triangle (row by row, diagonal included) only."""
    values = matrix.detach().double().cpu().numpy()
    n = values.shape[0]
    finite = values[np.isfinite(values)]
    # Symmetric within float32 rounding (Q and the cosines): the lower triangle repeats the upper one.
    triangle = bool(np.allclose(values, values.T, rtol=1e-5, atol=0.0, equal_nan=True))
    flat = values[np.triu_indices(n)] if triangle else values.ravel()
    packed: dict[str, Any] = {"encoding": precision, "triangle": triangle}
    if precision == "f16":
        # Scaling by the largest |value| keeps Q (activation², far beyond float16's 65504) in range.
        scale = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        data = (flat / scale).astype("<f2").tobytes()
        packed["scale"] = scale
    elif precision == "u8":
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        step = (high - low) / 254 if high > low else 1.0
        steps = np.full(flat.shape, 255, dtype=np.uint8)
        ok = np.isfinite(flat)
        steps[ok] = np.clip(np.rint((flat[ok] - low) / step), 0, 254).astype(np.uint8)
        data = steps.tobytes()
        packed.update(offset=low, step=step)
    else:
        raise KisError(f"precision must be 'f16' or 'u8', got {precision!r}")
    packed["data"] = base64.b64encode(data).decode("ascii")
    return packed


def decode_layer(packed: Mapping[str, Any], n: int) -> np.ndarray:
    """Return the [n, n] float64 matrix of one encode_layer payload (what the page's script draws)."""
    raw = base64.b64decode(packed["data"])
    if packed["encoding"] == "f16":
        flat = np.frombuffer(raw, dtype="<f2").astype(np.float64) * packed["scale"]
    else:
        steps = np.frombuffer(raw, dtype=np.uint8)
        flat = np.where(steps == 255, np.nan, packed["offset"] + steps * packed["step"])
    if not packed["triangle"]:
        return flat.reshape(n, n)
    matrix = np.empty((n, n))
    rows, columns = np.triu_indices(n)
    matrix[rows, columns] = flat
    matrix[columns, rows] = flat
    return matrix


# Decodes a layer (as decode_layer) and draws it when the slider moves: the page holds every layer packed, and only
# the shown one as a Plotly trace. Defined once per page whatever the number of figures.
LAYER_HEATMAP_JS = """
(function (root) {
  if (root.kisLayers) return;
  function bytes(text) {
    var binary = atob(text), out = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
    return out;
  }
  function half(h) {
    var sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * fraction * Math.pow(2, -24);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
  }
  function decode(layer, n) {
    var raw = bytes(layer.data), count = layer.encoding === "f16" ? raw.length / 2 : raw.length;
    var flat = new Array(count), i, j, k = 0;
    if (layer.encoding === "f16") {
      var view = new DataView(raw.buffer);
      for (i = 0; i < count; i++) flat[i] = half(view.getUint16(2 * i, true)) * layer.scale;
    } else {
      for (i = 0; i < count; i++) flat[i] = raw[i] === 255 ? NaN : layer.offset + raw[i] * layer.step;
    }
    var z = [];
    for (i = 0; i < n; i++) z.push(new Array(n));
    for (i = 0; i < n; i++) {
      for (j = layer.triangle ? i : 0; j < n; j++) {
        z[i][j] = flat[k++];
        if (layer.triangle) z[j][i] = z[i][j];
      }
    }
    return z;
  }
  function plot(id, figure, packed, config) {
    var element = document.getElementById(id);
    function shown(index) {
      var layer = packed.layers[index];
      var trace = {z: [decode(layer, packed.n)], zmin: [layer.zmin], zmax: [layer.zmax]};
      trace.meta = ["layer " + layer.layer];
      return [trace, {"title.text": layer.title}];
    }
    var first = shown(0);
    figure.data[0].z = first[0].z[0];
    figure.data[0].zmin = first[0].zmin[0];
    figure.data[0].zmax = first[0].zmax[0];
    figure.data[0].meta = first[0].meta[0];
    figure.layout.title = {text: first[1]["title.text"]};
    Plotly.newPlot(element, figure.data, figure.layout, config).then(function () {
      element.on("plotly_sliderchange", function (event) {
        var update = shown(Number(event.step.value));
        Plotly.update(element, update[0], update[1]);
      });
    });
  }
  root.kisLayers = {decode: decode, plot: plot};
})(typeof window !== "undefined" ? window : globalThis);
"""


def _script_json(value: str) -> str:
    """Return JSON that is safe inside a <script> element (no "<", ">" or "&" that could end or open a tag)."""
    return value.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class LayerHeatmaps:
    """A layer-slider heatmap whose layers are stored packed (encode_layer) and drawn one at a time by the page."""

    figure: go.Figure  # one heatmap trace without z; the slider's steps carry the layer index as their value
    packed: dict[str, Any]  # {"n": facts, "layers": [encode_layer(...) + layer, title, zmin, zmax]}

    def to_html(self, div_id: str = "kis-heatmap", config: Mapping[str, Any] | None = None, **_: Any) -> str:
        """Return the figure's <div> and the script that draws it (needs Plotly loaded on the page first)."""
        figure_json = _script_json(pio.to_json(self.figure, validate=False))
        packed_json = _script_json(json.dumps(self.packed, separators=(",", ":")))
        config_json = _script_json(json.dumps(dict(config or {})))
        height = self.figure.layout.height or 760
        return (
            f'<div id="{html_escape(div_id)}" class="plotly-graph-div" style="height:{height}px;width:100%;"></div>'
            f'<script type="text/javascript">{LAYER_HEATMAP_JS}'
            f"kisLayers.plot({json.dumps(div_id)}, {figure_json}, {packed_json}, {config_json});</script>"
        )


def packed_layer_heatmaps(
    result: RunResult, name: str = "p_matrix", precision: Precision = "f16", colour_scale: ColourScale = "auto"
) -> LayerHeatmaps:
    """Return layer_heatmaps for a page: each layer packed at `precision` and drawn only when the slider shows it."""
    require_matrices(result, [name])
    style, model = matrix_style(name), result_model_name(result)
    matrices = [result.layer(name, layer) for layer in result.layers]
    ranges = colour_ranges(name, matrices, colour_scale)
    layers = [
        {
            "layer": layer,
            "title": titled(f"{style.title}, layer {layer}", model),
            "zmin": zmin,
            "zmax": zmax,
            **encode_layer(matrix, precision),
        }
        for layer, matrix, (zmin, zmax) in zip(result.layers, matrices, ranges)
    ]
    trace = heatmap_trace(matrices[0], result.facts, name, zrange=ranges[0])
    trace.z = None  # drawn from the packed layers by the page
    trace.hovertemplate = trace.hovertemplate.replace("<extra></extra>", "<extra>%{meta}</extra>")
    fig = go.Figure(trace)
    # "skip": Plotly moves the slider only; the page's script swaps the layer in (value: its index).
    steps = [
        {"method": "skip", "label": str(layer), "value": str(index), "args": []}
        for index, layer in enumerate(result.layers)
    ]
    _slider_layout(fig, result, steps, layers[0]["title"])
    return LayerHeatmaps(fig, {"n": len(result.facts), "layers": layers})


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


PLOTLY_BUNDLE = "plotly.min.js"  # written once per figures folder: the HTML loads it from beside itself, offline


def write_plotly_bundle(folder: str | Path) -> Path:
    """Write Plotly's JavaScript into folder unless the same bundle is already there; return its path."""
    bundle, script = Path(folder) / PLOTLY_BUNDLE, get_plotlyjs()
    if not bundle.is_file() or bundle.read_text(encoding="utf-8") != script:
        atomic_write(bundle, lambda temp: temp.write_text(script, encoding="utf-8"))
    return bundle


def write_figure_files(figure: go.Figure, html: str | Path, png: bool = True) -> dict[str, str | None]:
    """Write a figure as interactive HTML (Plotly from plotly.min.js beside it, never a CDN) and, when png and
    Plotly's static export (kaleido) works, a PNG beside it; return {"html": path, "png": path or None}."""
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    write_plotly_bundle(html.parent)
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
