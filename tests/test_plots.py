"""kis_lens.plots and kis_lens.plot_distributions: the traces, values, hover text and labels of every figure; the KDE
against scipy."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from scipy import stats

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.matrices import MATRIX_NAMES, all_matrices
from kis_lens.plot_distributions import (
    MAX_HISTOGRAM_PANELS,
    Band,
    band_figure,
    evenly_spaced_layers,
    gaussian_kde,
    histogram_figure,
    kde_figure,
    layer_trends_figure,
    matrix_figures,
    orthogonality_figure,
    scott_bandwidth,
)
from kis_lens.plots import (
    LAYER_HEATMAP_JS,
    colour_ranges,
    decode_layer,
    encode_layer,
    heatmap,
    layer_heatmaps,
    packed_layer_heatmaps,
    result_heatmap,
    result_model_name,
)
from kis_lens.results import RunResult

LAYERS = (1, 3, 4)


def make_facts(n: int) -> list[Fact]:
    return [Fact(str(i), f"Subject{i}", "{} was born in", f"City{i}") for i in range(n)]


@pytest.fixture(scope="module")
def result() -> RunResult:
    generator = torch.Generator().manual_seed(3)
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in MATRIX_NAMES}
    for _ in LAYERS:
        corpus = torch.randn(300, 10, generator=generator, dtype=torch.float64) + 0.5
        keys = torch.randn(6, 10, generator=generator, dtype=torch.float64) + 0.5
        for name, matrix in all_matrices(keys, corpus.T @ corpus / 300).items():
            stacked[name].append(matrix)
    settings = {"model": {"name": "synthetic", "d_mlp": 10}}
    return RunResult({k: torch.stack(v) for k, v in stacked.items()}, list(LAYERS), make_facts(6), settings)


def loop_off_diagonal(matrix: torch.Tensor) -> np.ndarray:
    n = matrix.shape[0]
    return np.array([float(matrix[i, j]) for i in range(n) for j in range(n) if i != j])


def loop_density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.zeros(len(edges) - 1)
    for value in values:
        for b in range(len(edges) - 1):
            last = b == len(edges) - 2
            if edges[b] <= value < edges[b + 1] or (last and value == edges[b + 1]):
                counts[b] += 1
                break
    return counts / counts.sum() / np.diff(edges)


def assert_labelled(fig: go.Figure) -> None:
    assert fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_scott_bandwidth_and_kde_match_scipy():
    values = np.random.default_rng(0).standard_t(4, size=700)
    reference = stats.gaussian_kde(values)  # Scott's rule by default
    assert scott_bandwidth(values) == pytest.approx(reference.factor * values.std(ddof=1))
    grid = np.linspace(-8, 8, 101)
    assert gaussian_kde(values, grid, chunk=64) == pytest.approx(reference(grid), rel=1e-10, abs=1e-14)
    with pytest.raises(KisError, match="bandwidth"):
        gaussian_kde(np.ones(5), grid)


def test_heatmap_of_p_is_diverging_and_names_both_facts(result):
    matrix = result.layer("p_matrix", 3)
    fig = heatmap(matrix, result.facts, "p_matrix", layer=3)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    trace = fig.data[0]
    assert (trace.zmin, trace.zmid, trace.zmax) == (-1.0, 0.0, 1.0)
    assert trace.colorscale[0][1] != trace.colorscale[-1][1]  # two different ends: diverging
    assert np.asarray(trace.z) == pytest.approx(matrix.numpy(), abs=1e-6)
    assert trace.x[2] == "#2 Subject2 was born in → City2" and list(trace.y) == list(trace.x)
    assert "%{y}" in trace.hovertemplate and "%{x}" in trace.hovertemplate and "%{z" in trace.hovertemplate
    assert "layer 3" in trace.hovertemplate
    assert "layer 3" in fig.layout.title.text
    assert fig.layout.yaxis.autorange == "reversed"  # fact 0 on top, as a printed matrix
    assert_labelled(fig)


def test_heatmap_of_q_centres_range_on_off_diagonal_values(result):
    fig = result_heatmap(result, "q_matrix", 4)
    limit = np.abs(loop_off_diagonal(result.layer("q_matrix", 4))).max()
    assert (fig.data[0].zmin, fig.data[0].zmax) == (pytest.approx(-limit), pytest.approx(limit))
    with pytest.raises(KisError, match="layer 7"):
        result_heatmap(result, "q_matrix", 7)


def test_layer_slider_shows_one_layer_per_step(result):
    fig = layer_heatmaps(result, "whitening_cos")
    assert len(fig.data) == len(LAYERS)
    assert [trace.visible for trace in fig.data] == [True, False, False]
    for index, trace in enumerate(fig.data):
        assert np.asarray(trace.z) == pytest.approx(result.matrices["whitening_cos"][index].numpy(), abs=1e-6)
    steps = fig.layout.sliders[0].steps
    assert [step.label for step in steps] == ["1", "3", "4"]
    assert steps[1].args[0]["visible"] == [False, True, False]
    assert "layer 3" in steps[1].args[1]["title"]["text"]


def test_histogram_densities_per_layer_on_shared_bins(result):
    fig = histogram_figure(result, "activation_cos", bins=12)
    assert [trace.name for trace in fig.data] == [f"layer {layer}" for layer in LAYERS]
    everything = np.concatenate([loop_off_diagonal(result.layer("activation_cos", layer)) for layer in LAYERS])
    edges = np.linspace(everything.min(), everything.max(), 13)
    for layer, trace in zip(LAYERS, fig.data):
        expected = loop_density(loop_off_diagonal(result.layer("activation_cos", layer)), edges)
        assert np.asarray(trace.y) == pytest.approx(expected)
        assert np.asarray(trace.x) == pytest.approx((edges[:-1] + edges[1:]) / 2)
        assert (np.asarray(trace.y) * np.asarray(trace.width)).sum() == pytest.approx(1.0)
    # Small multiples: one panel per layer, each on its own axes, titled with its layer.
    assert len({(trace.xaxis, trace.yaxis) for trace in fig.data}) == len(LAYERS)
    assert [annotation.text for annotation in fig.layout.annotations] == [f"layer {layer}" for layer in LAYERS]
    assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_kde_curves_match_scipy_per_layer(result):
    fig = kde_figure(result, "p_matrix", grid_points=64)
    assert len(fig.data) == len(LAYERS)
    for layer, trace in zip(LAYERS, fig.data):
        reference = stats.gaussian_kde(loop_off_diagonal(result.layer("p_matrix", layer)))
        # Stored as float32 (half the page size of float64): equal to scipy to float32 precision.
        assert np.asarray(trace.y) == pytest.approx(reference(np.asarray(trace.x, dtype=np.float64)), rel=1e-5)
    assert "Scott" in fig.layout.title.text
    assert_labelled(fig)


def test_layer_trends_have_all_four_matrices_in_both_panels(result):
    fig = layer_trends_figure(result)
    assert len(fig.data) == 2 * len(MATRIX_NAMES)
    kurtosis = {trace.legendgroup: trace for trace in fig.data if trace.xaxis == "x"}
    mean_abs = {trace.legendgroup: trace for trace in fig.data if trace.xaxis == "x2"}
    assert set(kurtosis) == set(mean_abs) == set(MATRIX_NAMES)
    for name in MATRIX_NAMES:
        values = [loop_off_diagonal(result.layer(name, layer)) for layer in LAYERS]
        assert list(kurtosis[name].x) == list(LAYERS)
        assert np.asarray(kurtosis[name].y) == pytest.approx([stats.kurtosis(v) for v in values])
        assert np.asarray(mean_abs[name].y) == pytest.approx([np.abs(v).mean() for v in values])
    assert fig.layout.yaxis2.type == "log"
    assert fig.layout.xaxis.title.text == "layer" and "kurtosis" in fig.layout.yaxis.title.text
    assert fig.layout.title.text


def test_orthogonality_figure_has_both_spaces_and_random_baseline(result):
    fig = orthogonality_figure(result)
    assert len(fig.data) == 3
    whitening, activation, baseline = fig.data
    assert np.asarray(whitening.y) == pytest.approx(
        [np.abs(loop_off_diagonal(result.layer("whitening_cos", layer))).mean() for layer in LAYERS]
    )
    assert np.asarray(activation.y) == pytest.approx(
        [np.abs(loop_off_diagonal(result.layer("activation_cos", layer))).mean() for layer in LAYERS]
    )
    samples = np.random.default_rng(0).normal(size=(20000, 2, 10))
    cosines = (
        np.abs((samples[:, 0] * samples[:, 1]).sum(1))
        / np.linalg.norm(samples[:, 0], axis=1)
        / np.linalg.norm(samples[:, 1], axis=1)
    )
    assert baseline.y[0] == pytest.approx(cosines.mean(), rel=0.02)  # Monte Carlo E|cos| in 10 dims
    assert_labelled(fig)


def test_matrix_figures_and_unknown_matrix(result):
    assert len(matrix_figures(result, "q_matrix")) == 3
    with pytest.raises(KisError, match="not in these results"):
        histogram_figure(result, "r_matrix")


# ------------------------------------------------------------------ colour ranges, packed layers, small multiples


def q_result(scales: tuple[float, ...] = (1.0, 1000.0), n_facts: int = 5) -> RunResult:
    """Return a run holding only Q, layer l being layer 0's matrix times scales[l]."""
    generator = torch.Generator().manual_seed(11)
    keys = torch.randn(n_facts, 7, generator=generator, dtype=torch.float64)
    base = keys @ keys.T
    stacked = torch.stack([base * scale for scale in scales])
    settings = {"model": {"name": "synthetic-q"}}
    return RunResult({"q_matrix": stacked}, list(range(len(scales))), make_facts(n_facts), settings)


def numpy_limit(matrix: torch.Tensor) -> float:
    values = matrix.numpy()
    return float(np.abs(values[~np.eye(len(values), dtype=bool)]).max())


def test_q_layers_a_thousand_fold_apart_each_get_their_own_colour_range():
    run = q_result()
    limits = [numpy_limit(run.layer("q_matrix", layer)) for layer in run.layers]
    assert limits[1] == pytest.approx(1000 * limits[0])
    fig = layer_heatmaps(run, "q_matrix")
    for trace, limit in zip(fig.data, limits):
        assert (trace.zmin, trace.zmax) == (pytest.approx(-limit), pytest.approx(limit))
    packed = packed_layer_heatmaps(run, "q_matrix").packed["layers"]
    assert [(layer["zmin"], layer["zmax"]) for layer in packed] == [
        (pytest.approx(-limit), pytest.approx(limit)) for limit in limits
    ]
    # Forced one shared range: layer 0 would draw as blank white, 1000× inside the range.
    shared = layer_heatmaps(run, "q_matrix", colour_scale="shared")
    assert [(trace.zmin, trace.zmax) for trace in shared.data] == [
        (pytest.approx(-limits[1]), pytest.approx(limits[1]))
    ] * 2


def test_colour_ranges_share_similar_layers_and_keep_bounded_matrices_on_minus_one_to_one(result):
    near = q_result((1.0, 3.0))
    assert len({trace.zmax for trace in layer_heatmaps(near, "q_matrix").data}) == 1  # within 10×: comparable
    assert layer_heatmaps(near, "q_matrix").data[0].zmax == pytest.approx(numpy_limit(near.layer("q_matrix", 1)))
    assert colour_ranges("p_matrix", list(result.matrices["p_matrix"])) == [(-1.0, 1.0)] * len(LAYERS)
    own = colour_ranges("p_matrix", list(result.matrices["p_matrix"]), "layer")
    limits = [numpy_limit(matrix) for matrix in result.matrices["p_matrix"]]
    assert np.array(own) == pytest.approx(np.array([(-limit, limit) for limit in limits]))
    with pytest.raises(KisError, match="colour_scale"):
        colour_ranges("q_matrix", [], "per-layer")


@pytest.mark.parametrize("precision", ["f16", "u8"])
def test_packed_layers_decode_to_the_matrix_at_the_stored_precision(precision):
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(9, 4, generator=generator, dtype=torch.float64) * 300  # Q far beyond float16's 65504
    symmetric, asymmetric = keys @ keys.T, torch.randn(9, 9, generator=generator, dtype=torch.float64)
    asymmetric[2, 3] = float("nan")
    for matrix, triangle in ((symmetric, True), (asymmetric, False)):
        packed = encode_layer(matrix, precision)
        assert packed["triangle"] is triangle
        values = len(base64.b64decode(packed["data"])) // (2 if precision == "f16" else 1)
        assert values == (45 if triangle else 81)  # upper triangle with the diagonal: 9·10/2
        decoded, exact = decode_layer(packed, 9), matrix.numpy()
        finite = np.isfinite(exact)
        assert np.isnan(decoded[~finite]).all()
        if precision == "f16":
            scale = np.abs(exact[finite]).max()
            expected = (exact / scale).astype(np.float16).astype(np.float64) * scale
            assert decoded[finite] == pytest.approx(expected[finite], rel=1e-12, abs=scale * 2**-24)
            assert np.abs(decoded - exact)[finite].max() <= scale * 2**-11
        else:
            low, high = exact[finite].min(), exact[finite].max()
            assert np.abs(decoded - exact)[finite].max() <= (high - low) / 254 / 2 * (1 + 1e-9)
    with pytest.raises(KisError, match="precision"):
        encode_layer(symmetric, "f8")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's decoder")
def test_the_page_decodes_packed_layers_as_decode_layer_does(tmp_path):
    generator = torch.Generator().manual_seed(4)
    matrices = {
        "f16-full": (torch.randn(6, 6, generator=generator, dtype=torch.float64) * 1e5, "f16"),
        "f16-triangle": (torch.eye(6, dtype=torch.float64) + 0.25, "f16"),
        "u8-full": (torch.randn(6, 6, generator=generator, dtype=torch.float64), "u8"),
    }
    matrices["u8-full"][0][1, 1] = float("inf")
    packed = {name: encode_layer(matrix, precision) for name, (matrix, precision) in matrices.items()}
    script = tmp_path / "decode.js"
    script.write_text(
        LAYER_HEATMAP_JS
        + f"const packed = {json.dumps(packed)};\n"
        + "const out = {};\nfor (const name in packed) out[name] = globalThis.kisLayers.decode(packed[name], 6)"
        + ".map(row => row.map(v => Number.isNaN(v) ? null : v));\nconsole.log(JSON.stringify(out));\n",
        encoding="utf-8",
    )
    decoded = json.loads(subprocess.run(["node", str(script)], capture_output=True, check=True, text=True).stdout)
    for name, layer in packed.items():
        page = np.array([[np.nan if v is None else v for v in row] for row in decoded[name]], dtype=np.float64)
        np.testing.assert_array_equal(page, decode_layer(layer, 6))


def test_packed_heatmap_holds_every_layer_and_draws_only_one(result):
    packed = packed_layer_heatmaps(result, "q_matrix")
    assert len(packed.figure.data) == 1 and packed.figure.data[0].z is None
    assert [layer["layer"] for layer in packed.packed["layers"]] == list(LAYERS)
    for index, layer in enumerate(packed.packed["layers"]):
        assert decode_layer(layer, 6) == pytest.approx(result.matrices["q_matrix"][index].numpy(), rel=2e-3, abs=1e-6)
        assert layer["title"] == f"synthetic: Q matrix (key dot products), layer {LAYERS[index]}"
    steps = packed.figure.layout.sliders[0].steps
    assert [(step.method, step.label, step.value) for step in steps] == [
        ("skip", "1", "0"),
        ("skip", "3", "1"),
        ("skip", "4", "2"),
    ]
    page = packed.to_html(div_id="heat-1", config={"displaylogo": False})
    assert 'id="heat-1"' in page and "kisLayers.plot(" in page and "<b>" not in page


def test_histogram_of_many_layers_shows_evenly_spaced_labelled_panels():
    run = q_result(tuple(1.0 + layer / 10 for layer in range(30)))
    fig = histogram_figure(run, "q_matrix")
    shown = evenly_spaced_layers(run.layers, MAX_HISTOGRAM_PANELS)
    assert shown[0] == 0 and shown[-1] == 29 and len(shown) == MAX_HISTOGRAM_PANELS == len(set(shown))
    assert len(fig.data) == MAX_HISTOGRAM_PANELS
    assert len({trace.xaxis for trace in fig.data}) == MAX_HISTOGRAM_PANELS  # one panel each
    assert [annotation.text for annotation in fig.layout.annotations] == [f"layer {layer}" for layer in shown]
    assert [trace.name for trace in fig.data] == [f"layer {layer}" for layer in shown]
    assert not fig.layout.showlegend and all(trace.showlegend is False for trace in fig.data)
    assert "12 of 30 layers" in fig.layout.title.text
    # Shared bins and x axis: every panel's bars sit on the same centres.
    assert all(np.asarray(trace.x) == pytest.approx(np.asarray(fig.data[0].x)) for trace in fig.data)
    chosen = histogram_figure(run, "q_matrix", layers=[2, 7])
    assert [annotation.text for annotation in chosen.layout.annotations] == ["layer 2", "layer 7"]
    with pytest.raises(KisError, match="layers \\[40\\] not in these results"):
        histogram_figure(run, "q_matrix", layers=[2, 40])


def test_band_figure_gives_every_series_its_own_colour():
    panels = {
        "a": [Band("quarter", [1, 2], [0, 1], [2, 3]), Band("half", [1, 2]), Band("halves", [1, 1], dash="dash")],
        "b": [Band("quarter", [2, 2]), Band("all", [3, 3])],
        "c": [Band("cond", [4, 4], color="#000000")],
    }
    fig = band_figure([0, 1], panels, "layer", "title", model_name="m")
    lines = {trace.name: trace.line.color for trace in fig.data if trace.mode == "lines+markers"}
    assert set(lines) == {"quarter", "half", "halves", "all", "cond"} and lines["cond"] == "#000000"
    assert len(set(lines.values())) == len(lines)
    assert [trace.name for trace in fig.data if trace.showlegend] == ["quarter", "half", "halves", "all", "cond"]
    assert fig.layout.title.text == "m: title"


def test_every_run_figure_names_its_model(result):
    figures = [
        result_heatmap(result, "p_matrix", 3),
        layer_heatmaps(result, "q_matrix"),
        histogram_figure(result, "p_matrix"),
        kde_figure(result, "p_matrix", grid_points=16),
        layer_trends_figure(result),
        orthogonality_figure(result),
    ]
    assert all(fig.layout.title.text.startswith("synthetic: ") for fig in figures)
    steps = figures[1].layout.sliders[0].steps
    assert all(step.args[1]["title"]["text"].startswith("synthetic: ") for step in steps)
    assert heatmap(result.layer("p_matrix", 1), result.facts, model_name="gpt2").layout.title.text.startswith("gpt2: ")
    unnamed = RunResult(result.matrices, result.layers, result.facts, {})
    assert result_model_name(unnamed) is None and histogram_figure(unnamed).layout.title.text.startswith("P matrix")
