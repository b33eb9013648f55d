"""Figures that render anywhere: every figure names its model in its title, and the reproduction's convergence
figure gives each series its own colour (kis_lens.reproduction_plots, lifelong_plots, simulation_plots)."""

from __future__ import annotations

import pytest
import torch
from study_fixtures import make_run

from kis_lens.docs.reproduction import BUDGET_FRACTIONS, Reproduction
from kis_lens.editing.lifelong_plots import study_figure, update_norm_figure
from kis_lens.editing.simulation_plots import editing_figures
from kis_lens.facts import Fact
from kis_lens.matrices import MATRIX_NAMES, all_matrices
from kis_lens.reproduction_plots import reproduction_figures
from kis_lens.results import RunResult

MODEL = "HuggingFaceTB/SmolLM2-135M"
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def result() -> RunResult:
    generator = torch.Generator().manual_seed(1)
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in MATRIX_NAMES}
    for _ in LAYERS:
        corpus = torch.randn(100, 8, generator=generator, dtype=torch.float64)
        keys = torch.randn(5, 8, generator=generator, dtype=torch.float64)
        for name, matrix in all_matrices(keys, corpus.T @ corpus / 100).items():
            stacked[name].append(matrix)
    facts = [Fact(str(i), f"S{i}", "{} speaks", f"L{i}") for i in range(5)]
    settings = {"model": {"name": MODEL, "d_mlp": 8}}
    return RunResult({k: torch.stack(v) for k, v in stacked.items()}, LAYERS, facts, settings)


def interval(value: float) -> dict[str, float]:
    return {"value": value, "low": value - 0.1, "high": value + 0.1}


def layer_row(layer: int) -> dict:
    return {
        "layer": layer,
        "statistics": {
            "p": {"std": interval(0.2 + layer), "excess_kurtosis": interval(3.0 + layer)},
            "whitening": {"mean_abs": interval(0.1)},
        },
        "random_mean_abs_cos": 0.05,
        "convergence": {
            fraction: {"p_vs_all": {"relative_rms": 0.1 / (index + 1)}, "p_std": 0.2 + index}
            for index, fraction in enumerate(BUDGET_FRACTIONS)
        },
        "halves": {"relative_rms": 0.05},
        "condition": 10.0 ** (3 + layer),
    }


def reproduction() -> Reproduction:
    rows = [layer_row(layer) for layer in LAYERS]
    return Reproduction(
        model={"name": MODEL}, settings={}, known={}, covariance={}, layers=rows, null_model={"layers": rows}
    )


def test_convergence_gives_each_series_its_own_colour(result):
    figure = reproduction_figures(result, reproduction())["convergence"]
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    assert len(lines) == 7  # ¼, ½, halves; ¼, ½, all; cond(C)
    colours = {trace.name: trace.line.color for trace in lines}
    assert len(colours) == len(lines) and len(set(colours.values())) == len(lines)
    # The shaded interval of a series is its line's colour.
    error_bars = reproduction_figures(result, reproduction())["error_bars"]
    by_name = {trace.name: trace.line.color for trace in error_bars.data if trace.mode == "lines+markers"}
    assert set(by_name) == {"model", "random init", "random directions"} and len(set(by_name.values())) == 3
    for band in (trace for trace in error_bars.data if trace.fill == "toself"):
        assert band.fillcolor == by_name[band.legendgroup]


def test_every_reproduction_figure_names_its_model(result):
    figures = reproduction_figures(result, reproduction())
    assert set(figures) == {"error_bars", "convergence", "layer_trends", "orthogonality", "p_histogram"}
    for name, figure in figures.items():
        assert figure.layout.title.text.startswith(f"{MODEL}: "), name


def test_lifelong_study_figures_name_their_model():
    runs = [make_run("rome", seed, model_name="smollm2-135m") for seed in (0, 1)]
    assert "smollm2-135m" in study_figure(runs).layout.title.text
    assert update_norm_figure(runs).layout.title.text.startswith("smollm2-135m: ")


def test_edit_simulation_figures_name_their_model():
    curve = {"n_edits": [1, 2], "efficacy": [1.0, 1.0], "retention": [None, 1.0], "unedited_logprob_drift": [0.1, 0.2]}
    simulation = {
        "curves": {"rome": curve},
        "scatter": {"predicted": [0.1, 0.2], "measured_output": [0.1, 0.3], "measured_logprob": [0.0, 0.1]},
        "settings": {"model": {"name": MODEL}, "config": {"layer": 3}},
    }
    for figure in editing_figures(simulation).values():
        assert MODEL in figure.layout.title.text
