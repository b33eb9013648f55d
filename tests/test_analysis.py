"""kis_lens.analysis against hand-computed values, per-pair loops and scipy."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from scipy import stats

from kis_lens.analysis import (
    SUMMARY_COLUMNS,
    excess_kurtosis,
    layer_summaries,
    off_diagonal_values,
    orthogonality_comparison,
    random_mean_abs_cosine,
    summarize_matrix,
    summary_arrays,
    summary_table,
    to_dataframe,
    top_pairs,
    top_pairs_by_layer,
    write_csv,
)
from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.matrices import MATRIX_NAMES, all_matrices
from kis_lens.results import RunResult

# Hand-worked example: off-diagonal values row by row are .5, -.2, .1, .3, -.4, .6.
HAND = torch.tensor([[1.0, 0.5, -0.2], [0.1, 1.0, 0.3], [-0.4, 0.6, 1.0]], dtype=torch.float64)


def make_facts(n: int) -> list[Fact]:
    return [Fact(str(i), f"Subject{i}", "{} is located in", f"Place{i}") for i in range(n)]


def synthetic_result(n_facts: int = 7, layers: tuple[int, ...] = (0, 2, 5), d: int = 12, seed: int = 0) -> RunResult:
    generator = torch.Generator().manual_seed(seed)
    stacked: dict[str, list[torch.Tensor]] = {name: [] for name in MATRIX_NAMES}
    for _ in layers:
        scale = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
        corpus = torch.randn(200, d, generator=generator, dtype=torch.float64) * scale + 1.0
        keys = torch.randn(n_facts, d, generator=generator, dtype=torch.float64) + 1.0
        for name, matrix in all_matrices(keys, corpus.T @ corpus / 200).items():
            stacked[name].append(matrix)
    settings = {"model": {"name": "synthetic", "d_mlp": d}, "config": {"seed": seed}}
    return RunResult({k: torch.stack(v) for k, v in stacked.items()}, list(layers), make_facts(n_facts), settings)


def loop_off_diagonal(matrix: torch.Tensor) -> np.ndarray:
    n = matrix.shape[0]
    return np.array([float(matrix[i, j]) for i in range(n) for j in range(n) if i != j])


def test_off_diagonal_values_row_major_without_diagonal():
    assert off_diagonal_values(HAND).tolist() == pytest.approx([0.5, -0.2, 0.1, 0.3, -0.4, 0.6])


def test_summarize_matrix_hand_computed():
    summary = summarize_matrix(HAND, "p_matrix", 3, threshold=0.25)
    values = np.array([0.5, -0.2, 0.1, 0.3, -0.4, 0.6])
    assert summary.n_values == 6
    assert summary.mean == pytest.approx(0.9 / 6)
    assert summary.mean_abs == pytest.approx(2.1 / 6)
    assert summary.frac_above == pytest.approx(4 / 6)  # .5, .3, .4, .6
    assert summary.std == pytest.approx(math.sqrt(((values - 0.15) ** 2).sum() / 6))
    assert summary.kurtosis == pytest.approx(stats.kurtosis(values))
    assert (summary.matrix, summary.layer, summary.threshold) == ("p_matrix", 3, 0.25)


def test_threshold_is_strict():
    assert summarize_matrix(HAND, threshold=0.5).frac_above == pytest.approx(1 / 6)  # only .6 > .5


@pytest.mark.parametrize(
    "draw",
    [
        lambda g: g.normal(size=500),
        lambda g: g.standard_t(3, size=400),  # heavy tails: large positive kurtosis
        lambda g: g.uniform(-1, 1, size=300),  # light tails: negative kurtosis
        lambda g: np.concatenate([np.zeros(50), [5.0]]),
        lambda g: g.normal(size=4) * 1e-8 + 3.0,
    ],
)
def test_excess_kurtosis_matches_scipy(draw):
    values = draw(np.random.default_rng(1))
    assert excess_kurtosis(torch.tensor(values)) == pytest.approx(stats.kurtosis(values), rel=1e-9, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy warns on constant data, by design
def test_excess_kurtosis_of_constant_is_nan_like_scipy():
    values = np.full(10, 0.3)
    assert math.isnan(stats.kurtosis(values))
    assert math.isnan(excess_kurtosis(torch.tensor(values)))


def test_layer_summaries_match_loops_and_scipy():
    result = synthetic_result()
    summaries = layer_summaries(result, threshold=0.2)
    assert [(s.matrix, s.layer) for s in summaries] == [
        (name, layer) for name in MATRIX_NAMES for layer in result.layers
    ]
    for summary in summaries:
        values = loop_off_diagonal(result.layer(summary.matrix, summary.layer))
        assert summary.n_values == 7 * 6
        assert summary.mean == pytest.approx(values.mean())
        assert summary.std == pytest.approx(values.std())
        assert summary.kurtosis == pytest.approx(stats.kurtosis(values))
        assert summary.mean_abs == pytest.approx(np.abs(values).mean())
        assert summary.frac_above == pytest.approx((np.abs(values) > 0.2).mean())


def test_summary_table_columns_csv_and_dataframe(tmp_path):
    result = synthetic_result()
    rows = summary_table(result, names=["p_matrix", "whitening_cos"])
    assert len(rows) == 2 * 3 and all(tuple(row) == SUMMARY_COLUMNS for row in rows)
    path = write_csv(rows, tmp_path / "sub" / "table.csv")
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["matrix"] for r in read] == ["p_matrix"] * 3 + ["whitening_cos"] * 3
    assert float(read[4]["kurtosis"]) == pytest.approx(rows[4]["kurtosis"])
    frame = to_dataframe(rows)
    assert list(frame.columns) == list(SUMMARY_COLUMNS) and len(frame) == 6
    arrays = summary_arrays(result, ["q_matrix"])
    assert arrays["q_matrix"]["layer"].tolist() == [0, 2, 5]
    expected = [stats.kurtosis(loop_off_diagonal(result.layer("q_matrix", layer))) for layer in (0, 2, 5)]
    assert arrays["q_matrix"]["kurtosis"] == pytest.approx(expected)


def brute_force_top(matrix: torch.Tensor, k: int, symmetric: bool, by_abs: bool = True) -> list[tuple[int, int, float]]:
    n = matrix.shape[0]
    entries = [(i, j, float(matrix[i, j])) for i in range(n) for j in range(n) if i != j and (not symmetric or i < j)]
    return sorted(entries, key=lambda e: -abs(e[2]) if by_abs else -e[2])[:k]


def test_top_pairs_symmetric_lists_each_pair_once_in_order():
    result = synthetic_result()
    matrix = result.layer("whitening_cos", 2)
    pairs = top_pairs(matrix, result.facts, k=5)
    got = [(p.row, p.column, p.value) for p in pairs]
    expected = brute_force_top(matrix, 5, symmetric=True)
    assert [(i, j) for i, j, _ in got] == [(i, j) for i, j, _ in expected]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected])
    assert all(p.row < p.column for p in pairs)
    magnitudes = [abs(p.value) for p in pairs]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert pairs[0].row_fact.subject == f"Subject{pairs[0].row}"
    flat = pairs[0].to_dict()
    assert flat["column_prompt"] == f"Subject{pairs[0].column} is located in"
    assert flat["column_answer"] == f"Place{pairs[0].column}"


def test_top_pairs_asymmetric_p_keeps_both_directions_and_excludes_diagonal():
    matrix = torch.tensor([[9.0, 0.2, 0.7], [0.9, 9.0, -0.8], [0.1, 0.3, 9.0]])
    pairs = top_pairs(matrix, make_facts(3), k=6)
    assert [(p.row, p.column) for p in pairs] == [(1, 0), (1, 2), (0, 2), (2, 1), (0, 1), (2, 0)]
    assert all(p.row != p.column for p in pairs)
    by_value = top_pairs(matrix, make_facts(3), k=2, rank_by="value")
    assert [(p.row, p.column, p.value) for p in by_value] == [(1, 0, pytest.approx(0.9)), (0, 2, pytest.approx(0.7))]


def test_top_pairs_ties_in_row_major_order_and_k_larger_than_pairs():
    matrix = torch.ones(3, 3) * 0.5
    pairs = top_pairs(matrix, make_facts(3), k=10)
    assert [(p.row, p.column) for p in pairs] == [(0, 1), (0, 2), (1, 2)]


def test_top_pairs_by_layer_of_p():
    result = synthetic_result()
    by_layer = top_pairs_by_layer(result, "p_matrix", k=3)
    assert list(by_layer) == result.layers
    for layer, pairs in by_layer.items():
        expected = brute_force_top(result.layer("p_matrix", layer), 3, symmetric=False)
        assert [(p.row, p.column) for p in pairs] == [(i, j) for i, j, _ in expected]


def test_random_mean_abs_cosine_closed_forms():
    assert random_mean_abs_cosine(2) == pytest.approx(2 / math.pi)  # E|cos θ|, θ uniform on the circle
    assert random_mean_abs_cosine(3) == pytest.approx(0.5)  # Archimedes: x uniform on [-1, 1]
    assert random_mean_abs_cosine(10_000) == pytest.approx(math.sqrt(2 / (math.pi * 10_000)), rel=1e-3)


def test_orthogonality_comparison_per_layer():
    result = synthetic_result()
    rows = orthogonality_comparison(result, threshold=0.3)
    assert [row.layer for row in rows] == result.layers
    for row in rows:
        whitened = loop_off_diagonal(result.layer("whitening_cos", row.layer))
        plain = loop_off_diagonal(result.layer("activation_cos", row.layer))
        assert row.whitening_mean_abs == pytest.approx(np.abs(whitened).mean())
        assert row.activation_mean_abs == pytest.approx(np.abs(plain).mean())
        assert row.whitening_frac_above == pytest.approx((np.abs(whitened) > 0.3).mean())
        assert row.activation_kurtosis == pytest.approx(stats.kurtosis(plain))
        assert row.random_mean_abs == pytest.approx(random_mean_abs_cosine(12))
        assert row.to_dict()["whitening_over_random"] == pytest.approx(row.whitening_mean_abs / row.random_mean_abs)
    # Keys and corpus share a +1 offset: raw cosines are large, whitening by C removes most of that overlap.
    assert all(row.activation_mean_abs > row.whitening_mean_abs for row in rows)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: summarize_matrix(torch.ones(1, 1)), "at least two facts"),
        (lambda: summarize_matrix(torch.ones(2, 3)), "square"),
        (lambda: summarize_matrix(HAND, threshold=-1), "threshold"),
        (lambda: top_pairs(HAND, make_facts(2)), "2 facts"),
        (lambda: top_pairs(HAND, make_facts(3), k=0), "k must"),
        (lambda: top_pairs(HAND, make_facts(3), rank_by="size"), "rank_by"),
        (lambda: summary_table(synthetic_result(), names=["r_matrix"]), "not in these results"),
        (lambda: write_csv([], "x.csv"), "empty"),
        (lambda: random_mean_abs_cosine(1), "at least 2"),
    ],
)
def test_bad_input_raises_kis_error(call, message):
    with pytest.raises(KisError, match=message):
        call()
