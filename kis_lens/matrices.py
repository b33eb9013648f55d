"""The four per-layer matrices of knowledge superposition, from keys and the covariance C.

For keys K (one row per fact) and C = E[k kᵀ]:

- ``p_matrix``:      P[i, j] = k_iᵀ C⁻¹ k_j / k_iᵀ C⁻¹ k_i   (share of an edit of fact i that lands on j)
- ``q_matrix``:      Q[i, j] = k_i · k_j
- ``whitening_cos``: k_iᵀ C⁻¹ k_j / sqrt(k_iᵀ C⁻¹ k_i · k_jᵀ C⁻¹ k_j)
- ``activation_cos``: k_i · k_j / (|k_i| |k_j|)

C⁻¹ is never formed: one Cholesky factor L (C = L Lᵀ) per layer, one triangular solve W = L⁻¹ Kᵀ,
and the whitened Gram matrix G = Wᵀ W = K C⁻¹ Kᵀ gives P and the whitening cosine by scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError

MATRIX_NAMES: tuple[str, ...] = ("p_matrix", "q_matrix", "whitening_cos", "activation_cos")


def condition_number(covariance: Float[Tensor, "d d"]) -> float:
    """Return the 2-norm condition number of a symmetric matrix (inf when singular)."""
    eigenvalues = torch.linalg.eigvalsh(covariance.double())
    smallest, largest = eigenvalues.min().item(), eigenvalues.max().item()
    return float("inf") if smallest <= 0 else largest / smallest


@dataclass(frozen=True)
class Whitener:
    """The Cholesky factor of C (+ ridge), reused for every matrix of a layer."""

    factor: Float[Tensor, "d d"]
    ridge: float

    @classmethod
    def from_covariance(
        cls, covariance: Float[Tensor, "d d"], ridge: float = 0.0, dtype: torch.dtype = torch.float64
    ) -> "Whitener":
        """Return the factor of C + ridge·(tr C / d)·I; a clear KisError when C is not positive definite."""
        if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
            raise KisError(f"covariance must be a square [d_mlp, d_mlp] matrix, got {tuple(covariance.shape)}")
        if not torch.isfinite(covariance).all():
            raise KisError("covariance contains NaN or inf: recompute it (check the model dtype for overflow)")
        matrix = covariance.to(dtype)
        matrix = (matrix + matrix.T) / 2
        if ridge:
            scale = torch.diagonal(matrix).mean()
            matrix = matrix + ridge * scale * torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)
        factor, info = torch.linalg.cholesky_ex(matrix)
        if info.item() != 0:
            cond = condition_number(matrix)
            raise KisError(
                f"covariance is singular or not positive definite (condition number {cond:.3g}): "
                "estimate it on more tokens, or pass a ridge (e.g. --ridge 1e-6, added as ridge·mean(diag C)·I)"
            )
        return cls(factor, float(ridge))

    @property
    def dim(self) -> int:
        """Return d_mlp."""
        return int(self.factor.shape[0])

    def whiten(self, keys: Float[Tensor, "fact d"]) -> Float[Tensor, "fact d"]:
        """Return L⁻¹ k for every key, so that whitened dot products equal k_iᵀ C⁻¹ k_j."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise KisError(f"keys must have shape [n_facts, {self.dim}] to match the covariance, got {tuple(keys.shape)}")
        rhs = keys.to(device=self.factor.device, dtype=self.factor.dtype).T
        return torch.linalg.solve_triangular(self.factor, rhs, upper=False).T

    def gram(self, keys: Float[Tensor, "fact d"]) -> Float[Tensor, "fact fact"]:
        """Return K C⁻¹ Kᵀ."""
        whitened = self.whiten(keys)
        return whitened @ whitened.T


CovarianceLike = Tensor | Whitener


def _whitener(covariance: CovarianceLike, ridge: float) -> Whitener:
    if isinstance(covariance, Whitener):
        return covariance
    return Whitener.from_covariance(covariance, ridge=ridge)


def _check_keys(keys: Tensor) -> None:
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise KisError(f"keys must have shape [n_facts, d_mlp] with at least one fact, got {tuple(keys.shape)}")
    if not torch.isfinite(keys).all():
        raise KisError("keys contain NaN or inf: recompute them (check the model dtype for overflow)")


def _cosine_from_gram(gram: Float[Tensor, "fact fact"]) -> Float[Tensor, "fact fact"]:
    norms = torch.sqrt(torch.diagonal(gram).clamp_min(torch.finfo(gram.dtype).tiny))
    return (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0)


def p_matrix(
    keys: Float[Tensor, "fact d_mlp"], covariance: CovarianceLike, ridge: float = 0.0
) -> Float[Tensor, "fact fact"]:
    """Return P[i, j] = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i (float64, unit diagonal)."""
    _check_keys(keys)
    gram = _whitener(covariance, ridge).gram(keys)
    return gram / torch.diagonal(gram)[:, None]


def q_matrix(keys: Float[Tensor, "fact d_mlp"]) -> Float[Tensor, "fact fact"]:
    """Return Q[i, j] = k_i · k_j (float64, symmetric)."""
    _check_keys(keys)
    keys64 = keys.double()
    return keys64 @ keys64.T


def whitening_cos(
    keys: Float[Tensor, "fact d_mlp"], covariance: CovarianceLike, ridge: float = 0.0
) -> Float[Tensor, "fact fact"]:
    """Return the cosine of keys in the whitened space, k_iᵀC⁻¹k_j / sqrt(k_iᵀC⁻¹k_i k_jᵀC⁻¹k_j)."""
    _check_keys(keys)
    return _cosine_from_gram(_whitener(covariance, ridge).gram(keys))


def activation_cos(keys: Float[Tensor, "fact d_mlp"]) -> Float[Tensor, "fact fact"]:
    """Return the plain cosine similarity of the keys."""
    return _cosine_from_gram(q_matrix(keys))


def all_matrices(
    keys: Float[Tensor, "fact d_mlp"], covariance: CovarianceLike, ridge: float = 0.0
) -> dict[str, Float[Tensor, "fact fact"]]:
    """Return all four matrices of one layer from a single factorisation and two Gram matrices."""
    _check_keys(keys)
    whitened_gram = _whitener(covariance, ridge).gram(keys)
    plain_gram = q_matrix(keys)
    return {
        "p_matrix": whitened_gram / torch.diagonal(whitened_gram)[:, None],
        "q_matrix": plain_gram,
        "whitening_cos": _cosine_from_gram(whitened_gram),
        "activation_cos": _cosine_from_gram(plain_gram),
    }
