"""Interactive Plotly heatmaps of a run's matrices (one layer, or every layer behind a slider) and the styling every
figure of a run shares: matrix names and units, fact labels, layer colours, titles naming the model.

Every function returns a ``plotly.graph_objects.Figure``; show it with ``fig.show()`` or save it with
``fig.write_html(path)`` (kis_lens.figure_files writes it to open offline).

>>> fig = layer_heatmaps(result, "p_matrix")   # drag the slider through the layers

A slider heatmap colours each layer on its own range when the layers differ by orders of magnitude
(colour_ranges); packed_layer_heatmaps is the same figure for a page that stores every layer packed (float16 or
8 bits) and draws one at a time, what kis_lens.report uses. The values' distributions (histograms, KDEs, statistics
by layer) are kis_lens.plot_distributions.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape as html_escape
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from jaxtyping import Float
from plotly.colors import sample_colorscale
from torch import Tensor

from kis_lens.analysis import off_diagonal_values, require_matrices
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.results import RunResult

HEATMAP_COLORSCALE = "RdBu_r"  # diverging: blue negative, white 0, red positive
# Beyond this many facts the tick labels would overlap; hover still names both facts.
MAX_TICK_LABELS = 40
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
