"""kis_lens.plots: the traces, values, hover text and labels of every figure; the KDE against scipy."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from scipy import stats

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.matrices import MATRIX_NAMES, all_matrices
from kis_lens.plots import (
    gaussian_kde,
    heatmap,
    histogram_figure,
    kde_figure,
    layer_heatmaps,
    layer_trends_figure,
    matrix_figures,
    orthogonality_figure,
    result_heatmap,
    scott_bandwidth,
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
    assert fig.layout.barmode == "overlay"
    assert_labelled(fig)


def test_kde_curves_match_scipy_per_layer(result):
    fig = kde_figure(result, "p_matrix", grid_points=64)
    assert len(fig.data) == len(LAYERS)
    for layer, trace in zip(LAYERS, fig.data):
        reference = stats.gaussian_kde(loop_off_diagonal(result.layer("p_matrix", layer)))
        assert np.asarray(trace.y) == pytest.approx(reference(np.asarray(trace.x)), rel=1e-9)
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
