"""Error bars for the paper's claims: bootstrap intervals over facts, a permutation test, estimation noise of P.

Everything here takes matrices that are already computed; nothing runs the model.

- ``bootstrap_statistics``: seeded percentile intervals, resampling facts (rows and columns together).
- ``relation_permutation_test``: are same-relation pairs more superposed than different-relation pairs, with a
  p-value from permuting relation labels over facts (same-subject pairs excluded: their P is 1 by construction).
- ``p_difference``: how far two estimates of P are apart (e.g. from two disjoint halves of the corpus).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.facts import Fact

DEFAULT_RESAMPLES = 400
DEFAULT_PERMUTATIONS = 2000
CONFIDENCE = 0.95

# One statistic of a matrix's off-diagonal values: each resample's values and 0/1 weights in, one number out.
Statistic = Callable[[Float[Tensor, "resample pair"], Float[Tensor, "resample pair"]], Float[Tensor, " resample"]]


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum(dim=-1) / weights.sum(dim=-1)


def _central_moment(values: Tensor, weights: Tensor, order: int) -> Tensor:
    centred = values - _weighted_mean(values, weights)[..., None]
    return _weighted_mean(centred.pow(order), weights)


# Fisher's (excess) kurtosis: 0 for a Gaussian, the convention of every kurtosis kis_lens reports.
STATISTICS: dict[str, Statistic] = {
    "mean": _weighted_mean,
    "std": lambda values, weights: _central_moment(values, weights, 2).sqrt(),
    "excess_kurtosis": lambda values, weights: (
        _central_moment(values, weights, 4) / _central_moment(values, weights, 2).pow(2) - 3.0
    ),
    "mean_abs": lambda values, weights: _weighted_mean(values.abs(), weights),
    "mean_square": lambda values, weights: _weighted_mean(values.pow(2), weights),
}


@dataclass(frozen=True)
class Interval:
    """A statistic's value on all facts and its seeded bootstrap percentile interval over facts."""

    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, float]:
        """Return the interval as JSON-ready numbers."""
        return asdict(self)


def _off_diagonal_of_resamples(
    matrix: Float[Tensor, "fact fact"], samples: Tensor
) -> tuple[Float[Tensor, "resample pair"], Tensor]:
    """Return each resample's [n, n] submatrix flattened, and the mask of pairs of two different original facts."""
    rows = samples[:, :, None].expand(-1, -1, samples.shape[1])
    columns = samples[:, None, :].expand(-1, samples.shape[1], -1)
    values = matrix[rows, columns].reshape(samples.shape[0], -1)
    distinct = (rows != columns).reshape(samples.shape[0], -1)
    return values, distinct


def _check_matrix(matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 3:
        raise KisError(f"bootstrap needs a square matrix of at least 3 facts, got {tuple(matrix.shape)}")


def bootstrap_draws(
    matrix: Float[Tensor, "fact fact"], statistics: Sequence[str], resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, Float[Tensor, " resample"]]:
    """Return {statistic: its value on each of `resamples` seeded resamples of the facts}.

    A resample draws n facts with replacement (torch.randint with a generator seeded by `seed`, in batches) and
    takes the off-diagonal entries of its n×n submatrix; entries pairing a fact with a copy of itself are left
    out, as the diagonal is.
    """
    unknown = [name for name in statistics if name not in STATISTICS]
    if unknown:
        raise KisError(f"unknown statistic(s) {unknown}: choose from {', '.join(STATISTICS)}")
    _check_matrix(matrix)
    n = matrix.shape[0]
    matrix = matrix.double().cpu()
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list[Tensor]] = {name: [] for name in statistics}
    chunk = max(1, 4_000_000 // (n * n))  # resamples per batch: bounded memory at any n
    for start in range(0, resamples, chunk):
        samples = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        values, distinct = _off_diagonal_of_resamples(matrix, samples)
        for name in statistics:
            draws[name].append(STATISTICS[name](values, distinct.double()))
    return {name: torch.cat(parts) for name, parts in draws.items()}


def bootstrap_statistics(
    matrix: Float[Tensor, "fact fact"],
    statistics: Sequence[str] = tuple(STATISTICS),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Interval]:
    """Return {statistic: value on all facts with its percentile bootstrap interval over resampled facts}."""
    if resamples < 10 or not 0 < confidence < 1:
        raise KisError(f"use at least 10 resamples and a confidence in (0, 1), not {resamples} and {confidence}")
    draws = bootstrap_draws(matrix, statistics, resamples, seed)
    values, distinct = _off_diagonal_of_resamples(matrix.double().cpu(), torch.arange(matrix.shape[0])[None, :])
    alpha = (1 - confidence) / 2
    result = {}
    for name in statistics:
        finite = draws[name][torch.isfinite(draws[name])]
        low, high = torch.quantile(finite, torch.tensor([alpha, 1 - alpha], dtype=finite.dtype)).tolist()
        value = float(STATISTICS[name](values, distinct.double())[0])
        result[name] = Interval(value, low, high, confidence)
    return result


@dataclass(frozen=True)
class RelationTest:
    """Same-relation vs different-relation pairs of facts about different subjects, and a permutation p-value."""

    same_relation_pairs: int
    other_relation_pairs: int
    same_subject_pairs_excluded: int
    same_mean_abs: float
    other_mean_abs: float
    same_share_above: float
    other_share_above: float
    threshold: float
    p_value: float  # one-sided: same-relation mean |P| at least as far above the other pairs' as observed
    permutations: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the test as JSON-ready numbers."""
        return asdict(self)


def relation_permutation_test(
    matrix: Float[Tensor, "fact fact"],
    facts: Sequence[Fact],
    threshold: float = 0.5,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> RelationTest:
    """Return mean |P| and the share with |P| > threshold for same- vs different-relation pairs, with a p-value.

    The statistic is mean |P| over same-relation pairs minus over different-relation pairs (ordered pairs of
    facts about different subjects). Relation labels are permuted over the facts (subjects stay with their
    facts), and p = (1 + #permutations with a statistic ≥ the observed one) / (1 + permutations).
    """
    n = len(facts)
    if matrix.shape != (n, n):
        raise KisError(f"the matrix is {tuple(matrix.shape)} but there are {n} facts")
    magnitudes = matrix.double().abs().cpu()
    subjects = _codes([fact.subject for fact in facts])
    relations = _codes([fact.relation_id for fact in facts])
    usable = (subjects[:, None] != subjects[None, :]) & ~torch.eye(n, dtype=torch.bool)
    same_subject = int((~usable).sum()) - n

    def contrast(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        same = (labels[..., :, None] == labels[..., None, :]) & usable
        other = (labels[..., :, None] != labels[..., None, :]) & usable
        same_mean = (magnitudes * same).sum(dim=(-1, -2)) / same.sum(dim=(-1, -2)).clamp(min=1)
        other_mean = (magnitudes * other).sum(dim=(-1, -2)) / other.sum(dim=(-1, -2)).clamp(min=1)
        return same_mean - other_mean, same, other

    observed, same, other = contrast(relations)
    if not same.any() or not other.any():
        raise KisError("the facts need pairs of the same and of different relations (about different subjects)")
    generator = torch.Generator().manual_seed(seed)
    exceed, done = 0, 0
    while done < permutations:
        batch = min(200, permutations - done)
        shuffled = torch.stack([relations[torch.randperm(n, generator=generator)] for _ in range(batch)])
        exceed += int((contrast(shuffled)[0] >= observed - 1e-12).sum())
        done += batch
    return RelationTest(
        same_relation_pairs=int(same.sum()),
        other_relation_pairs=int(other.sum()),
        same_subject_pairs_excluded=same_subject,
        same_mean_abs=float(magnitudes[same].mean()),
        other_mean_abs=float(magnitudes[other].mean()),
        same_share_above=float((magnitudes[same] > threshold).double().mean()),
        other_share_above=float((magnitudes[other] > threshold).double().mean()),
        threshold=threshold,
        p_value=(1 + exceed) / (1 + permutations),
        permutations=permutations,
    )


def _codes(labels: Sequence[str]) -> Tensor:
    """Return integer codes of string labels (equal labels, equal codes)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(label, len(index)) for label in labels])


def p_difference(first: Float[Tensor, "fact fact"], second: Float[Tensor, "fact fact"]) -> dict[str, float]:
    """Return how far two estimates of P are apart off the diagonal: max abs, RMS, RMS relative to second's, r."""
    off = ~torch.eye(first.shape[0], dtype=torch.bool)
    a, b = first.double().cpu()[off], second.double().cpu()[off]
    difference = a - b
    rms = float(difference.pow(2).mean().sqrt())
    return {
        "max_abs": float(difference.abs().max()),
        "rms": rms,
        "relative_rms": rms / float(b.pow(2).mean().sqrt()),
        "correlation": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
    }


def intervals_to_dict(intervals: Mapping[str, Interval]) -> dict[str, dict[str, float]]:
    """Return {statistic: interval numbers} ready for JSON."""
    return {name: interval.to_dict() for name, interval in intervals.items()}
