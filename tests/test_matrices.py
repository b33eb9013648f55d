"""The four matrices against the original per-pair definition, computed independently in float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_matrices

from kis_lens.corpus import embedded_sample_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.errors import KisError
from kis_lens.facts import load_facts, sample_facts
from kis_lens.keys import compute_keys
from kis_lens.matrices import (
    Whitener,
    activation_cos,
    all_matrices,
    p_matrix,
    q_matrix,
    whitening_cos,
)


@pytest.fixture(scope="module")
def real_inputs(tiny):
    """Keys of 12 real facts and a covariance from real Wikipedia text, at layer 1 of a tiny model."""
    facts = sample_facts(load_facts(), 12, seed=3)
    keys = compute_keys(tiny, facts, [1]).at_layer(1).double()
    moment = estimate_second_moments(tiny, embedded_sample_texts(40), [1], progress=False)[1]
    return keys, moment.compute(torch.float64)


@pytest.mark.slow
def test_matrices_equal_per_pair_float64_reference(real_inputs):
    keys, cov = real_inputs
    reference = reference_matrices(keys.numpy(), cov.numpy())
    ours = all_matrices(keys, cov)
    singles = {
        "p_matrix": p_matrix(keys, cov),
        "q_matrix": q_matrix(keys),
        "whitening_cos": whitening_cos(keys, cov),
        "activation_cos": activation_cos(keys),
    }
    for name, expected in reference.items():
        np.testing.assert_allclose(ours[name].numpy(), expected, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(singles[name].numpy(), expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_matrix_invariants(real_inputs):
    keys, cov = real_inputs
    matrices = all_matrices(keys, cov)
    n = keys.shape[0]
    np.testing.assert_allclose(torch.diagonal(matrices["p_matrix"]).numpy(), np.ones(n), atol=1e-12)
    np.testing.assert_allclose(matrices["q_matrix"].numpy(), matrices["q_matrix"].T.numpy(), rtol=1e-12)
    for name in ("whitening_cos", "activation_cos"):
        values = matrices[name]
        assert values.min() >= -1 and values.max() <= 1, name
        np.testing.assert_allclose(torch.diagonal(values).numpy(), np.ones(n), atol=1e-9, err_msg=name)
    # P is not symmetric in general, but P[i,j]·G_ii == P[j,i]·G_jj (the whitened Gram is).
    assert not torch.allclose(matrices["p_matrix"], matrices["p_matrix"].T)


def test_ridge_matches_reference_on_shifted_covariance(real_inputs):
    keys, cov = real_inputs
    ridge = 1e-3
    shifted = cov.numpy() + ridge * np.trace(cov.numpy()) / cov.shape[0] * np.eye(cov.shape[0])
    expected = reference_matrices(keys.numpy(), shifted)["p_matrix"]
    np.testing.assert_allclose(p_matrix(keys, cov, ridge=ridge).numpy(), expected, rtol=1e-6, atol=1e-9)


def test_whitener_reused_across_matrices_gives_same_values(real_inputs):
    keys, cov = real_inputs
    whitener = Whitener.from_covariance(cov)
    torch.testing.assert_close(p_matrix(keys, whitener), p_matrix(keys, cov))


def test_singular_covariance_is_a_clear_error():
    keys = torch.randn(4, 8, dtype=torch.float64)
    low_rank = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(KisError, match="singular or not positive definite.*condition number.*ridge"):
        p_matrix(keys, low_rank @ low_rank.T)


def test_non_finite_covariance_and_keys_are_clear_errors():
    cov = torch.eye(8, dtype=torch.float64)
    with pytest.raises(KisError, match="NaN or inf"):
        p_matrix(torch.randn(3, 8), cov * float("nan"))
    keys = torch.randn(3, 8)
    keys[1, 2] = float("inf")
    with pytest.raises(KisError, match="NaN or inf"):
        q_matrix(keys)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(KisError, match=r"\[n_facts, 8\]"):
        p_matrix(torch.randn(3, 5), torch.eye(8))
