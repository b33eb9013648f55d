"""The benchmark's version of the original per-pair algorithm does the original's work and agrees with kis_lens's P."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kis_lens.corpus import embedded_sample_texts
from kis_lens.covariance import estimate_second_moments
from kis_lens.facts import load_facts

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "matrices.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_matrices", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def covariances(tiny_gpt2):
    moments = estimate_second_moments(tiny_gpt2, embedded_sample_texts(24), [0, 1, 2], max_tokens=4000, progress=False)
    return {layer: moment.compute(torch.float64) for layer, moment in moments.items()}


@pytest.mark.slow
def test_reference_per_pair_p_equals_kis_lens(bench, tiny_gpt2, covariances):
    facts = load_facts("counterfact-known")[:4]
    fast = bench.kis_lens_p_matrices(tiny_gpt2, facts, [0, 1, 2], covariances, prepend_bos=False)
    for layer in (0, 2):
        slow, work = bench.reference_p_matrix(tiny_gpt2, facts, layer, covariances[layer], prepend_bos=False)
        assert work.entries == 16
        np.testing.assert_allclose(slow.numpy(), fast[layer].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.diag(slow.numpy()), 1.0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 5])
def test_reference_runs_the_originals_n_squared_plus_2n_forwards(bench, tiny_gpt2, covariances, n):
    """Compute_PMatrix.py: per row a forward for C⁻¹k_i and one for k_i, per entry one for k_j; C inverted once."""
    facts = load_facts("counterfact-known")[:n]
    model_calls = []
    handle = tiny_gpt2.register_forward_pre_hook(lambda module, args: model_calls.append(1))
    try:
        _, work = bench.reference_p_matrix(tiny_gpt2, facts, 1, covariances[1], prepend_bos=False)
    finally:
        handle.remove()
    assert len(model_calls) == n * n + 2 * n  # counted on the model itself, not by the reference
    assert (work.forwards, work.inversions, work.inverse_products, work.entries) == (n * n + 2 * n, 1, n, n * n)
    stubbed = bench.count_original_work(n)  # what an extrapolated row records
    assert (stubbed.forwards, stubbed.inversions, stubbed.inverse_products) == (n * n + 2 * n, 1, n)
    bench.check_original_work(n, work)
    with pytest.raises(RuntimeError, match="not the original's"):
        bench.check_original_work(
            n, bench.OriginalWork(forwards=2 * n * n, inversions=1, inverse_products=n, entries=n * n)
        )


def test_reference_stops_after_max_pairs_in_row_major_order(bench, tiny_gpt2, covariances):
    facts = load_facts("counterfact-known")[:3]
    partial, work = bench.reference_p_matrix(tiny_gpt2, facts, 1, covariances[1], prepend_bos=False, max_pairs=4)
    done = ~torch.isnan(partial)
    assert work.entries == 4 and done.sum() == 4
    assert done[0].all() and done[1, 0] and not done[1, 1:].any() and not done[2].any()
    assert work.forwards == (2 + 3) + (2 + 1)  # row 0 in full, then row 1's two forwards and its first column


def test_scaling_exponent_recovers_a_power_law(bench):
    sizes = [8, 16, 32, 64]
    assert bench.scaling_exponent(sizes, [3.0 * n**2 for n in sizes]) == pytest.approx(2.0)
    assert bench.scaling_exponent(sizes, [0.5 * n for n in sizes]) == pytest.approx(1.0)
