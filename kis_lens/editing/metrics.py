"""Summary numbers of the lifelong-editing simulation: shares of successful edits and prediction correlations."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def fraction(values: np.ndarray) -> float | None:
    """Return the mean of booleans (the share that hold), or None when there are none."""
    return float(np.mean(values)) if len(values) else None


def correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Return {"pearson", "spearman", "n"} of two samples; coefficients are None for < 3 points or a constant sample."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return {"pearson": None, "spearman": None, "n": int(len(a))}
    ranks = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731 (ties have measure zero here)
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "spearman": float(np.corrcoef(ranks(a), ranks(b))[0, 1]),
        "n": int(len(a)),
    }
