"""Error bars: bootstrap draws against a per-resample numpy loop, interval coverage, the permutation test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.uncertainty import (
    bootstrap_draws,
    bootstrap_statistics,
    p_difference,
    relation_permutation_test,
)


def _numpy_statistics(matrix: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """The statistics of one resample, by a plain loop over ordered pairs of different original facts."""
    values = [matrix[a, b] for a in rows for b in rows if a != b]
    values = np.array(values)
    return {
        "mean": values.mean(),
        "std": values.std(),
        "excess_kurtosis": stats.kurtosis(values, fisher=True, bias=True),
        "mean_abs": np.abs(values).mean(),
        "mean_square": (values**2).mean(),
    }


def test_bootstrap_draws_equal_a_per_resample_numpy_loop():
    """Each resample's five statistics equal a numpy/scipy loop over the same seeded fact indices."""
    matrix = torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3
    draws = bootstrap_draws(matrix, ("mean", "std", "excess_kurtosis", "mean_abs", "mean_square"), resamples=25, seed=7)
    samples = torch.randint(12, (25, 12), generator=torch.Generator().manual_seed(7)).numpy()
    for index, rows in enumerate(samples):
        expected = _numpy_statistics(matrix.numpy(), rows)
        for name, value in expected.items():
            assert draws[name][index].item() == pytest.approx(value, rel=1e-9, abs=1e-12), (index, name)


def test_values_on_all_facts_match_scipy_and_intervals_contain_them():
    """The point value is the statistic of all off-diagonal entries (scipy's Fisher kurtosis); the interval holds it."""
    matrix = torch.randn(30, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    matrix = matrix + 3 * (matrix > 2)  # a heavy right tail
    off = matrix.numpy()[~np.eye(30, dtype=bool)]
    intervals = bootstrap_statistics(matrix, resamples=200, seed=0)
    assert intervals["mean"].value == pytest.approx(off.mean())
    assert intervals["std"].value == pytest.approx(off.std())
    assert intervals["excess_kurtosis"].value == pytest.approx(stats.kurtosis(off, fisher=True, bias=True))
    for interval in intervals.values():
        assert interval.low <= interval.value <= interval.high


def test_mean_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    """Matrices of i.i.d. entries with mean 0.3: the 95% interval of the mean covers 0.3 in most of 60 seeds."""
    covered = 0
    for seed in range(60):
        matrix = 0.3 + torch.randn(40, 40, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        interval = bootstrap_statistics(matrix, ("mean",), resamples=200, seed=seed)["mean"]
        covered += interval.low <= 0.3 <= interval.high
    assert covered >= 52  # 95% nominal; the percentile bootstrap of n = 40 facts runs a little narrow


def test_bad_input_is_refused():
    with pytest.raises(KisError, match="unknown statistic"):
        bootstrap_statistics(torch.eye(5), ("median",))
    with pytest.raises(KisError, match="at least 3 facts"):
        bootstrap_statistics(torch.eye(2))


def _facts(relations: list[str], subjects: list[str] | None = None) -> list[Fact]:
    subjects = subjects or [f"S{index}" for index in range(len(relations))]
    return [
        Fact(case_id=i, subject=s, prompt="{} is", relation_id=r, target_true="x", target_new="y")
        for i, (s, r) in enumerate(zip(subjects, relations))
    ]


def test_permutation_test_against_a_loop_and_on_a_planted_effect():
    """Same/other means equal a double loop; a planted same-relation effect gives a small p, no effect a large one."""
    generator = torch.Generator().manual_seed(3)
    relations = [f"P{index % 4}" for index in range(24)]
    subjects = [f"S{index // 2}" for index in range(24)]  # pairs of facts share a subject
    facts = _facts(relations, subjects)
    noise = torch.rand(24, 24, generator=generator, dtype=torch.float64)
    planted = noise + 0.5 * torch.tensor([[a == b for b in relations] for a in relations], dtype=torch.float64)
    result = relation_permutation_test(planted, facts, threshold=0.9, permutations=300, seed=0)
    same = [
        abs(planted[i, j])
        for i in range(24)
        for j in range(24)
        if i != j and subjects[i] != subjects[j] and relations[i] == relations[j]
    ]
    other = [
        abs(planted[i, j])
        for i in range(24)
        for j in range(24)
        if subjects[i] != subjects[j] and relations[i] != relations[j]
    ]
    assert result.same_relation_pairs == len(same) and result.other_relation_pairs == len(other)
    assert result.same_mean_abs == pytest.approx(np.mean(same)) and result.other_mean_abs == pytest.approx(
        np.mean(other)
    )
    assert result.same_share_above == pytest.approx(np.mean(np.array(same) > 0.9))
    assert result.same_subject_pairs_excluded == 24  # 12 subjects × 2 ordered pairs each
    assert result.p_value < 0.01
    assert relation_permutation_test(noise, facts, permutations=300, seed=0).p_value > 0.05


def test_p_difference_of_two_estimates():
    """RMS and relative RMS of the off-diagonal difference; the diagonal is ignored."""
    a = torch.tensor([[1.0, 0.2, 0.4], [0.1, 1.0, 0.0], [0.3, 0.5, 1.0]])
    b = a.clone()
    b[0, 1] += 0.3
    b[2, 2] = 7.0
    diff = p_difference(a, b)
    assert diff["max_abs"] == pytest.approx(0.3) and diff["rms"] == pytest.approx(0.3 / np.sqrt(6))
    off = b.numpy()[~np.eye(3, dtype=bool)]
    assert diff["relative_rms"] == pytest.approx(diff["rms"] / np.sqrt((off**2).mean()))
