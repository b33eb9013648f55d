"""Numbers behind the figures: per-layer statistics of off-diagonal values, the most superposed pairs,
a tidy per-layer table (CSV / DataFrame) and the whitening-vs-activation orthogonality comparison.

Off-diagonal values are every entry with i != j (both halves, so an asymmetric P counts each ordered
pair once). Statistics are population ones (ddof=0), kurtosis is Fisher's excess kurtosis with the
biased moment estimator, exactly ``scipy.stats.kurtosis(values)`` with its defaults.

>>> from kis_lens.results import load_result
>>> result = load_result("results/runs/gpt2-small/known_sample_size_128/subject_last")
>>> rows = summary_table(result)               # one dict per (matrix, layer)
>>> pairs = top_pairs(result.layer("p_matrix", 5), result.facts, k=10)
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.io import atomic_write
from kis_lens.matrices import MATRIX_NAMES
from kis_lens.results import RunResult

DEFAULT_THRESHOLD = 0.1
RankBy = Literal["abs", "value"]
SUMMARY_COLUMNS: tuple[str, ...] = (
    "matrix",
    "layer",
    "n_values",
    "mean",
    "std",
    "kurtosis",
    "mean_abs",
    "frac_above",
    "threshold",
)


def _check_square(matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise KisError(f"expected a square [fact, fact] matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] < 2:
        raise KisError("a matrix of one fact has no off-diagonal values: use at least two facts (--record_size 2)")


def off_diagonal_values(matrix: Float[Tensor, "fact fact"]) -> Float[Tensor, " pair"]:
    """Return every entry with i != j, row by row, as float64."""
    _check_square(matrix)
    n = matrix.shape[0]
    # Row-major n×n without the first entry, seen as (n-1)×(n+1): each row then ends on a diagonal entry.
    return matrix.double().reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(-1)


def excess_kurtosis(values: Float[Tensor, " n"]) -> float:
    """Return Fisher's (excess) kurtosis m4/m2² − 3 with biased moments, as scipy.stats.kurtosis; nan if constant."""
    values = values.double().flatten()
    if values.numel() == 0:
        raise KisError("kurtosis of no values: give at least one value")
    mean = values.mean()
    centred = values - mean
    second = (centred**2).mean().item()
    fourth = (centred**4).mean().item()
    # scipy's rule for "constant up to rounding" (answer nan rather than divide by ~0).
    if second <= (torch.finfo(torch.float64).eps * mean.item()) ** 2:
        return float("nan")
    return fourth / second**2 - 3.0


@dataclass(frozen=True)
class OffDiagonalSummary:
    """Statistics of one matrix's off-diagonal values at one layer."""

    matrix: str
    layer: int
    n_values: int
    mean: float
    std: float
    kurtosis: float
    mean_abs: float
    frac_above: float  # share of |value| strictly above threshold
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as one row of the tidy table."""
        return asdict(self)


def summarize_matrix(
    matrix: Float[Tensor, "fact fact"], name: str = "matrix", layer: int = -1, threshold: float = DEFAULT_THRESHOLD
) -> OffDiagonalSummary:
    """Return mean, std (ddof=0), Fisher kurtosis, mean |v| and share of |v| > threshold of the off-diagonal values."""
    if threshold < 0 or not math.isfinite(threshold):
        raise KisError(f"threshold must be a finite number >= 0, got {threshold}")
    values = off_diagonal_values(matrix)
    if not torch.isfinite(values).all():
        raise KisError(f"{name} layer {layer} contains NaN or inf: recompute the matrices")
    magnitudes = values.abs()
    return OffDiagonalSummary(
        matrix=name,
        layer=int(layer),
        n_values=int(values.numel()),
        mean=values.mean().item(),
        std=values.std(correction=0).item(),
        kurtosis=excess_kurtosis(values),
        mean_abs=magnitudes.mean().item(),
        frac_above=(magnitudes > threshold).double().mean().item(),
        threshold=float(threshold),
    )


def require_matrices(result: RunResult, names: Sequence[str] | None = None) -> list[str]:
    """Return the requested matrix names (default: all the run holds, in MATRIX_NAMES order); KisError if absent."""
    chosen = [name for name in MATRIX_NAMES if name in result.matrices] if names is None else list(names)
    missing = [name for name in chosen if name not in result.matrices]
    if missing:
        raise KisError(f"matrix {missing} not in these results (they hold {', '.join(result.matrices)}): run `kis all`")
    if not chosen:
        raise KisError("these results hold no matrices: run `kis all` first")
    return chosen


def layer_summaries(
    result: RunResult, names: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD
) -> list[OffDiagonalSummary]:
    """Return one OffDiagonalSummary per (matrix, layer), matrices in MATRIX_NAMES order, layers ascending."""
    return [
        summarize_matrix(result.layer(name, layer), name, layer, threshold)
        for name in require_matrices(result, names)
        for layer in result.layers
    ]


def summary_table(
    result: RunResult, names: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD
) -> list[dict[str, Any]]:
    """Return the tidy per-layer table: one dict per (matrix, layer) with the SUMMARY_COLUMNS keys."""
    return [summary.to_dict() for summary in layer_summaries(result, names, threshold)]


def to_dataframe(rows: Sequence[dict[str, Any]]) -> Any:
    """Return the rows as a pandas DataFrame (needs pandas)."""
    try:
        import pandas as pd
    except ImportError:
        raise KisError("to_dataframe needs pandas: `pip install pandas`, or use the list of dicts as is") from None
    return pd.DataFrame(list(rows))


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows of dicts (e.g. summary_table) as CSV atomically, columns in first-row order; return the path."""
    if not rows:
        raise KisError("no rows to write: the table is empty")
    columns = list(rows[0])

    def write(temp: Path) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


@dataclass(frozen=True)
class SuperposedPair:
    """One off-diagonal entry M[i, j] and the two facts it links."""

    row: int
    column: int
    value: float
    row_fact: Fact
    column_fact: Fact

    def to_dict(self) -> dict[str, Any]:
        """Return the pair as a flat JSON-ready dict with both facts' subject, prompt and answer."""
        flat: dict[str, Any] = {"row": self.row, "column": self.column, "value": self.value}
        for side, fact in (("row", self.row_fact), ("column", self.column_fact)):
            flat.update(
                {
                    f"{side}_subject": fact.subject,
                    f"{side}_prompt": fact.text,
                    f"{side}_answer": fact.target_true,
                }
            )
        return flat


def is_symmetric(matrix: Float[Tensor, "fact fact"], rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Return True when the matrix equals its transpose up to float rounding."""
    return bool(torch.allclose(matrix, matrix.T, rtol=rtol, atol=atol))


def top_pairs(
    matrix: Float[Tensor, "fact fact"],
    facts: Sequence[Fact],
    k: int = 10,
    rank_by: RankBy = "abs",
    symmetric: bool | None = None,
) -> list[SuperposedPair]:
    """Return the k off-diagonal entries largest by |value| (or by value), most superposed first.

    The diagonal is never included. A symmetric matrix (Q and both cosines; detected when
    ``symmetric`` is None) contributes each unordered pair once, as i < j; P is asymmetric, so
    (i, j) and (j, i) are distinct entries. Ties keep row-major order.
    """
    _check_square(matrix)
    if len(facts) != matrix.shape[0]:
        raise KisError(f"{len(facts)} facts for a matrix of {matrix.shape[0]} facts: pass the run's own facts")
    if k < 1:
        raise KisError(f"k must be at least 1, got {k}")
    if rank_by not in ("abs", "value"):
        raise KisError(f"rank_by must be 'abs' or 'value', got {rank_by!r}")
    matrix = matrix.double().cpu()
    n = matrix.shape[0]
    symmetric = is_symmetric(matrix) if symmetric is None else symmetric
    rows, columns = torch.triu_indices(n, n, offset=1) if symmetric else (~torch.eye(n, dtype=torch.bool)).nonzero().T
    values = matrix[rows, columns]
    score = values.abs() if rank_by == "abs" else values
    # Stable sort on -score: largest first, ties in row-major order.
    order = torch.sort(-score, stable=True).indices[:k]
    return [
        SuperposedPair(int(rows[i]), int(columns[i]), values[i].item(), facts[int(rows[i])], facts[int(columns[i])])
        for i in order.tolist()
    ]


def top_pairs_by_layer(
    result: RunResult, name: str = "p_matrix", k: int = 10, rank_by: RankBy = "abs"
) -> dict[int, list[SuperposedPair]]:
    """Return {layer: top_pairs} of one matrix for every layer of a run."""
    require_matrices(result, [name])
    return {layer: top_pairs(result.layer(name, layer), result.facts, k, rank_by) for layer in result.layers}


def random_mean_abs_cosine(dim: int) -> float:
    """Return E|cos| of two independent isotropic random directions in dim dimensions (the 'orthogonal' baseline)."""
    if dim < 2:
        raise KisError(f"dimension must be at least 2, got {dim}")
    # E|x_1| for x uniform on the unit sphere S^{d-1}: Γ(d/2) / (√π Γ((d+1)/2)).
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


@dataclass(frozen=True)
class OrthogonalityComparison:
    """Whitening-space vs activation-space cosines of one layer's keys."""

    layer: int
    whitening_mean_abs: float
    activation_mean_abs: float
    whitening_frac_above: float
    activation_frac_above: float
    whitening_kurtosis: float
    activation_kurtosis: float
    random_mean_abs: float | None  # E|cos| of random directions in d_mlp dims; None when d_mlp is unknown
    threshold: float

    @property
    def whitening_over_random(self) -> float | None:
        """Return how many times the whitened keys' mean |cos| exceeds random directions' (None when unknown)."""
        return None if self.random_mean_abs is None else self.whitening_mean_abs / self.random_mean_abs

    def to_dict(self) -> dict[str, Any]:
        """Return the comparison as one table row (with whitening_over_random)."""
        return {**asdict(self), "whitening_over_random": self.whitening_over_random}


def orthogonality_comparison(result: RunResult, threshold: float = DEFAULT_THRESHOLD) -> list[OrthogonalityComparison]:
    """Return, per layer, the off-diagonal |cos| of keys in whitened and activation space and a random baseline.

    Whitening with C⁻¹ removes the corpus-wide correlations, yet the paper finds the whitened keys
    of different facts are still far from orthogonal: compare whitening_mean_abs to random_mean_abs.
    """
    require_matrices(result, ["whitening_cos", "activation_cos"])
    d_mlp = (result.settings.get("model") or {}).get("d_mlp")
    baseline = random_mean_abs_cosine(int(d_mlp)) if d_mlp else None
    rows = []
    for layer in result.layers:
        whitened = summarize_matrix(result.layer("whitening_cos", layer), "whitening_cos", layer, threshold)
        plain = summarize_matrix(result.layer("activation_cos", layer), "activation_cos", layer, threshold)
        rows.append(
            OrthogonalityComparison(
                layer=layer,
                whitening_mean_abs=whitened.mean_abs,
                activation_mean_abs=plain.mean_abs,
                whitening_frac_above=whitened.frac_above,
                activation_frac_above=plain.frac_above,
                whitening_kurtosis=whitened.kurtosis,
                activation_kurtosis=plain.kurtosis,
                random_mean_abs=baseline,
                threshold=float(threshold),
            )
        )
    return rows


def summary_arrays(
    result: RunResult, names: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, dict[str, np.ndarray]]:
    """Return {matrix: {"layer", "kurtosis", "mean_abs", ...: array over layers}} for plotting lines."""
    table: dict[str, dict[str, list[float]]] = {}
    for summary in layer_summaries(result, names, threshold):
        columns = table.setdefault(summary.matrix, {column: [] for column in SUMMARY_COLUMNS if column != "matrix"})
        for column in columns:
            columns[column].append(getattr(summary, column))
    return {name: {column: np.asarray(values) for column, values in columns.items()} for name, columns in table.items()}
