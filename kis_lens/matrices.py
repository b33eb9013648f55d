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

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError

MATRIX_NAMES: tuple[str, ...] = ("p_matrix", "q_matrix", "whitening_cos", "activation_cos")

# Above this condition number, k C⁻¹ k is dominated by C's smallest (least-sampled, float32-rounded) directions.
CONDITION_WARNING_THRESHOLD = 1e10
# Up to this d the exact eigenvalues are cheap; above it the condition number is estimated from the factor.
EXACT_CONDITION_MAX_DIM = 512


class IllConditionedWarning(UserWarning):
    """C is so ill-conditioned that P and the whitening cosine are unreliable without a ridge."""


def condition_number(covariance: Float[Tensor, "d d"]) -> float:
    """Return the 2-norm condition number of a symmetric matrix (inf when singular)."""
    eigenvalues = torch.linalg.eigvalsh(covariance.double())
    smallest, largest = eigenvalues.min().item(), eigenvalues.max().item()
    return float("inf") if smallest <= 0 else largest / smallest


def estimate_condition_number(factor: Float[Tensor, "d d"], iterations: int = 40) -> float:
    """Return cond₂(L Lᵀ) estimated from a Cholesky factor L by power and inverse iteration (a lower bound)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(factor.shape[0], 1, generator=generator, dtype=torch.float64).to(factor)
    largest, vector = 0.0, start / start.norm()
    for _ in range(iterations):  # power iteration on C = L Lᵀ: the Rayleigh quotient |Lᵀv|² → λ_max
        product = factor @ (factor.T @ vector)
        largest = float((factor.T @ vector).square().sum())
        vector = product / product.norm()
    inverse_largest, vector = 0.0, start / start.norm()
    for _ in range(iterations):  # the same on C⁻¹ = L⁻ᵀ L⁻¹, through two triangular solves
        half = torch.linalg.solve_triangular(factor, vector, upper=False)
        inverse_largest = float(half.square().sum())
        product = torch.linalg.solve_triangular(factor.T, half, upper=True)
        vector = product / product.norm()
    return largest * inverse_largest


def _condition_of(matrix: Float[Tensor, "d d"], factor: Float[Tensor, "d d"]) -> float:
    """Return cond₂ of a positive definite matrix: exact for small d, estimated from its factor for large d."""
    if matrix.shape[0] <= EXACT_CONDITION_MAX_DIM:
        return condition_number(matrix)
    return estimate_condition_number(factor)


@dataclass(frozen=True)
class Whitener:
    """The Cholesky factor of C (+ ridge), reused for every matrix of a layer, and C's condition number."""

    factor: Float[Tensor, "d d"]
    ridge: float
    condition: float = float("nan")  # cond₂ of C + ridge (estimated for d > EXACT_CONDITION_MAX_DIM)

    @classmethod
    def from_covariance(
        cls,
        covariance: Float[Tensor, "d d"],
        ridge: float = 0.0,
        dtype: torch.dtype = torch.float64,
        label: str = "covariance",
        warn_above: float = CONDITION_WARNING_THRESHOLD,
    ) -> Whitener:
        """Return the factor of C + ridge·(tr C / d)·I; KisError if not positive definite, warns if ill-conditioned."""
        if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1] or covariance.shape[0] == 0:
            raise KisError(f"{label} must be a square [d_mlp, d_mlp] matrix, got {tuple(covariance.shape)}")
        if not covariance.is_floating_point():
            raise KisError(f"{label} must hold floating-point numbers, not {covariance.dtype}")
        if ridge < 0 or ridge != ridge:
            raise KisError(f"ridge must be zero or positive, not {ridge}")
        if not torch.isfinite(covariance).all():
            raise KisError(f"{label} contains NaN or inf: recompute it (check the model dtype for overflow)")
        matrix = covariance.to(dtype)
        matrix = (matrix + matrix.T) / 2
        if ridge:
            scale = torch.diagonal(matrix).mean()
            matrix = matrix + ridge * scale * torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)
        factor, info = torch.linalg.cholesky_ex(matrix)
        if info.item() != 0:
            cond = condition_number(matrix)
            raise KisError(
                f"{label} is singular or not positive definite (condition number {cond:.3g}): "
                "estimate it on more tokens, or pass a ridge (e.g. --ridge 1e-6, added as ridge·mean(diag C)·I)"
            )
        condition = _condition_of(matrix, factor)
        if condition > warn_above:
            warnings.warn(
                f"{label} is ill-conditioned (condition number {condition:.3g} > {warn_above:.0e}): "
                "P and the whitening "
                "cosine are dominated by its smallest, noisiest directions; estimate C on more tokens or pass a ridge "
                "(e.g. --ridge 1e-6, added as ridge·mean(diag C)·I)",
                IllConditionedWarning,
                stacklevel=2,
            )
        return cls(factor, float(ridge), condition)

    @classmethod
    def of(
        cls,
        covariance_or_whitener: Float[Tensor, "d_mlp d_mlp"] | Whitener,
        ridge: float = 0.0,
        label: str = "covariance",
    ) -> Whitener:
        """Return the given Whitener as is (own ridge kept), or the factor of the given C + ridge (from_covariance)."""
        if isinstance(covariance_or_whitener, Whitener):
            return covariance_or_whitener
        return cls.from_covariance(covariance_or_whitener, ridge=ridge, label=label)

    @property
    def dim(self) -> int:
        """Return d_mlp."""
        return int(self.factor.shape[0])

    def whiten(self, keys: Float[Tensor, "fact d"]) -> Float[Tensor, "fact d"]:
        """Return L⁻¹ k for every key, so that whitened dot products equal k_iᵀ C⁻¹ k_j."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise KisError(
                f"keys must have shape [n_facts, {self.dim}] to match the covariance, got {tuple(keys.shape)}"
            )
        rhs = keys.to(device=self.factor.device, dtype=self.factor.dtype).T
        return torch.linalg.solve_triangular(self.factor, rhs, upper=False).T

    def gram(self, keys: Float[Tensor, "fact d"]) -> Float[Tensor, "fact fact"]:
        """Return K C⁻¹ Kᵀ."""
        whitened = self.whiten(keys)
        return whitened @ whitened.T


CovarianceLike = Tensor | Whitener


def _check_keys(keys: Tensor) -> None:
    if keys.ndim != 2 or keys.shape[0] == 0 or keys.shape[1] == 0:
        raise KisError(
            f"keys must have shape [n_facts, d_mlp] with at least one fact and one dimension, got {tuple(keys.shape)}"
        )
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
    gram = Whitener.of(covariance, ridge).gram(keys)
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
    return _cosine_from_gram(Whitener.of(covariance, ridge).gram(keys))


def activation_cos(keys: Float[Tensor, "fact d_mlp"]) -> Float[Tensor, "fact fact"]:
    """Return the plain cosine similarity of the keys."""
    return _cosine_from_gram(q_matrix(keys))


def all_matrices(
    keys: Float[Tensor, "fact d_mlp"], covariance: CovarianceLike, ridge: float = 0.0
) -> dict[str, Float[Tensor, "fact fact"]]:
    """Return all four matrices of one layer from a single factorisation and two Gram matrices."""
    _check_keys(keys)
    whitened_gram = Whitener.of(covariance, ridge).gram(keys)
    plain_gram = q_matrix(keys)
    return {
        "p_matrix": whitened_gram / torch.diagonal(whitened_gram)[:, None],
        "q_matrix": plain_gram,
        "whitening_cos": _cosine_from_gram(whitened_gram),
        "activation_cos": _cosine_from_gram(plain_gram),
    }
