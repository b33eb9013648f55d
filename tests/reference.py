"""Independent slow references that tests compare kis_lens against."""

from __future__ import annotations

import numpy as np


def reference_matrices(keys: np.ndarray, covariance: np.ndarray) -> dict[str, np.ndarray]:
    """The original scripts' per-pair definitions with an explicit inverse, in float64 NumPy."""
    inverse = np.linalg.inv(covariance)
    n = len(keys)
    out = {name: np.zeros((n, n)) for name in ("p_matrix", "q_matrix", "whitening_cos", "activation_cos")}
    for i in range(n):
        for j in range(n):
            ki, kj = keys[i], keys[j]
            out["p_matrix"][i, j] = (ki @ inverse @ kj) / (ki @ inverse @ ki)
            out["q_matrix"][i, j] = ki @ kj
            out["whitening_cos"][i, j] = (ki @ inverse @ kj) / np.sqrt((ki @ inverse @ ki) * (kj @ inverse @ kj))
            out["activation_cos"][i, j] = (ki @ kj) / (np.linalg.norm(ki) * np.linalg.norm(kj))
    return out
