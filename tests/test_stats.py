"""SecondMoment: triangular float32 batch products into float64 totals, against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kis_lens.errors import KisError
from kis_lens.stats import NonFiniteBatch, SecondMoment, triangle_blocks, triangle_size, upper_gram_blocks


def _reference(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows.T @ rows


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_batches_equal_float64_reference():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1500, 97, generator=generator) * 3 + 0.5  # odd width: blocks of unequal size
    moment = SecondMoment(97)
    for chunk in rows.split(256):
        moment.update(chunk)
    assert moment.count == 1500
    expected = _reference(rows.numpy())
    assert _relative(moment.sum.numpy(), expected) < 1e-6
    assert np.array_equal(moment.sum.numpy(), moment.sum.numpy().T)
    assert _relative(moment.compute(torch.float64).numpy(), expected / 1500) < 1e-6


@pytest.mark.parametrize("dim, block_rows", [(40, 256), (40, 7), (97, 16), (64, 32), (1, 4)])
def test_triangle_blocks_hold_exactly_the_upper_triangle(dim, block_rows):
    rows = torch.randn(64, dim, generator=torch.Generator().manual_seed(1))
    expected = _reference(rows.numpy())
    covered = np.zeros((dim, dim), dtype=int)
    for start, block in upper_gram_blocks(rows, block_rows):
        stop = start + block.shape[0]
        assert block.shape == (stop - start, dim - start)
        assert _relative(block.double().numpy(), expected[start:stop, start:]) < 1e-6
        covered[start:stop, start:] += 1
    # Every entry on or above the diagonal exactly once; below it only what the blocks' squares add.
    assert (np.triu(covered) == np.triu(np.ones((dim, dim), dtype=int))).all()
    assert covered.sum() == triangle_size(dim, block_rows)
    assert sum(stop - start for start, stop in triangle_blocks(dim, block_rows)) == dim


def test_nonfinite_or_overflowing_batch_adds_nothing():
    rows = torch.randn(50, 12, generator=torch.Generator().manual_seed(4))
    moment = SecondMoment(12)
    moment.update(rows)
    before = moment.sum.clone()
    for value in (float("nan"), float("inf"), 3e19):  # 3e19² overflows float32 though 3e19 itself is finite
        bad = rows.clone()
        bad[7, 9] = value
        with pytest.raises(NonFiniteBatch):
            moment.update(bad)
        assert torch.equal(moment.sum, before) and moment.count == 50


def test_merged_halves_equal_one_pass():
    rows = torch.randn(800, 33, generator=torch.Generator().manual_seed(2))
    whole = SecondMoment(33)
    for chunk in rows.split(100):
        whole.update(chunk)
    first, second = SecondMoment(33), SecondMoment(33)
    for chunk in rows[:400].split(100):
        first.update(chunk)
    for chunk in rows[400:].split(100):
        second.update(chunk)
    merged = first.merge(second)
    assert merged.count == whole.count == 800
    # Same float32 batch products, float64 additions in another order.
    np.testing.assert_allclose(merged.sum.numpy(), whole.sum.numpy(), rtol=1e-12, atol=0)


def test_from_state_continues_exactly():
    rows = torch.randn(300, 20, generator=torch.Generator().manual_seed(3))
    straight = SecondMoment(20)
    for chunk in rows.split(100):
        straight.update(chunk)
    partial = SecondMoment(20)
    partial.update(rows[:100])
    resumed = SecondMoment.from_state(partial.sum, partial.count)
    for chunk in rows[100:].split(100):
        resumed.update(chunk)
    assert torch.equal(resumed.sum, straight.sum) and resumed.count == 300


def test_bad_input_is_refused():
    moment = SecondMoment(4)
    with pytest.raises(KisError, match="shape"):
        moment.update(torch.zeros(3, 5))
    with pytest.raises(KisError, match="no tokens"):
        moment.compute()
    with pytest.raises(KisError, match="dimension"):
        moment.merge(SecondMoment(5))
