"""Closed-form edits of one layer's MLP output weight W_out: ROME (rank one), MEMIT (batch), AlphaEdit (null space).

Convention (TransformerLens, row vectors): the layer's MLP output at a token is ``m = k @ W + b`` with the key
``k`` = ``blocks.{L}.mlp.hook_post`` [d_mlp] and ``W`` = W_out [d_mlp, d_model]. Every editor is a pure function
of W, b, keys, values and C (all solves in float64) and returns a float64 delta ``ΔW`` [d_mlp, d_model]; nothing
touches the model until ``apply_delta`` / ``applied_delta`` (kis_lens.editing.weights).

With C = E[k kᵀ] (the cached second moment) and a residual ``r = v - (k W + b)``:

- rank one (ROME):  ΔW = C⁻¹k rᵀ / (kᵀC⁻¹k), so another key k_j moves by (k_jᵀC⁻¹k / kᵀC⁻¹k)·r = P[i, j]·r.
- batch (MEMIT):    ΔW = argmin Σ‖(W+ΔW)ᵀk_i + b − v_i‖² + λ tr(ΔWᵀ C ΔW) = C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹ R,
                    leaving the residual λ(λI + G)⁻¹R on the edited keys (G = K C⁻¹ Kᵀ).
- null space (AlphaEdit): ΔW = P⊥ (P⊥(KᵀK + K_pᵀK_p) + αI)⁻¹ P⊥ Kᵀ R, with P⊥ the projector on the
                    eigenvectors of the preserved keys' covariance whose eigenvalues fall below a threshold,
                    so that ΔW changes (almost) nothing on the preserved keys.

Every ``covariance`` argument is C itself or a ``Whitener`` of it (``Whitener.of`` turns either into the factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.matrices import CovarianceLike, Whitener


def solve_covariance(covariance: CovarianceLike, keys: Float[Tensor, "fact d_mlp"]) -> Float[Tensor, "fact d_mlp"]:
    """Return C⁻¹k for every key (rows), from the Cholesky factor in float64."""
    whitener = Whitener.of(covariance)
    rhs = keys.to(device=whitener.factor.device, dtype=whitener.factor.dtype).T
    return torch.cholesky_solve(rhs, whitener.factor, upper=False).T


def layer_outputs(
    weight: Float[Tensor, "d_mlp d_model"], bias: Float[Tensor, " d_model"], keys: Float[Tensor, "fact d_mlp"]
) -> Float[Tensor, "fact d_model"]:
    """Return the MLP outputs k @ W + b of the keys, in float64."""
    return keys.double() @ weight.double() + bias.double()


def _check_pairs(keys: Tensor, values: Tensor, weight: Tensor) -> None:
    if keys.ndim != 2 or values.ndim != 2 or keys.shape[0] != values.shape[0]:
        raise KisError(
            f"keys [n, d_mlp] and values [n, d_model] must pair up, got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.shape[1] != weight.shape[0] or values.shape[1] != weight.shape[1]:
        raise KisError(f"keys/values of width {keys.shape[1]}/{values.shape[1]} do not fit W_out {tuple(weight.shape)}")


def rank_one_delta(
    key: Float[Tensor, " d_mlp"], residual: Float[Tensor, " d_model"], covariance: CovarianceLike
) -> Float[Tensor, "d_mlp d_model"]:
    """Return ROME's ΔW = C⁻¹k rᵀ / (kᵀC⁻¹k): moves the output at k by r, least change on the key distribution."""
    key64 = key.double().reshape(1, -1)
    solved = solve_covariance(covariance, key64)[0]
    denominator = solved @ key64[0].to(solved.device)
    if not denominator > 0:
        raise KisError("kᵀC⁻¹k is not positive: the key is zero or C is not positive definite")
    return torch.outer(solved, residual.double().to(solved.device)) / denominator


def rome_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    key: Float[Tensor, " d_mlp"],
    value: Float[Tensor, " d_model"],
    covariance: CovarianceLike,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return the rank-one ΔW that makes the layer output exactly `value` at `key`."""
    _check_pairs(key.reshape(1, -1), value.reshape(1, -1), weight)
    residual = value.double() - layer_outputs(weight, bias, key.reshape(1, -1))[0]
    return rank_one_delta(key, residual, covariance)


def memit_update(
    keys: Float[Tensor, "edit d_mlp"],
    residuals: Float[Tensor, "edit d_model"],
    covariance: CovarianceLike,
    covariance_weight: float = 0.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return MEMIT's least-squares ΔW = C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹ R that moves the outputs at K by (about) R."""
    if covariance_weight < 0:
        raise KisError(f"covariance_weight λ must be >= 0, got {covariance_weight}")
    solved = solve_covariance(covariance, keys)  # rows C⁻¹k_i
    gram = solved @ keys.double().T.to(solved.device)
    gram = (gram + gram.T) / 2 + covariance_weight * torch.eye(len(keys), dtype=torch.float64, device=gram.device)
    try:
        mixing = torch.linalg.solve(gram, residuals.double().to(gram.device))
    except RuntimeError:
        raise KisError("K C⁻¹ Kᵀ + λI is singular (repeated or dependent keys): use covariance_weight > 0") from None
    return solved.T @ mixing


def memit_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    keys: Float[Tensor, "edit d_mlp"],
    values: Float[Tensor, "edit d_model"],
    covariance: CovarianceLike,
    covariance_weight: float = 0.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return MEMIT's batch ΔW that maps every key to its value in the least-squares sense (λ = covariance_weight)."""
    _check_pairs(keys, values, weight)
    return memit_update(keys, values.double() - layer_outputs(weight, bias, keys), covariance, covariance_weight)


def memit_residual(
    keys: Float[Tensor, "edit d_mlp"],
    residuals: Float[Tensor, "edit d_model"],
    covariance: CovarianceLike,
    covariance_weight: float,
) -> Float[Tensor, "edit d_model"]:
    """Return the residual a MEMIT edit leaves on its own keys, λ(λI + K C⁻¹ Kᵀ)⁻¹ R (zero when λ = 0)."""
    whitened = Whitener.of(covariance).whiten(keys)
    gram = whitened @ whitened.T
    eye = torch.eye(len(keys), dtype=torch.float64, device=gram.device)
    return covariance_weight * torch.linalg.solve(gram + covariance_weight * eye, residuals.double().to(gram.device))


@dataclass(frozen=True)
class NullSpace:
    """AlphaEdit's projector onto the low-eigenvalue directions of the preserved keys' covariance."""

    projector: Float[Tensor, "d_mlp d_mlp"]
    rank: int
    threshold: float

    @property
    def dim(self) -> int:
        """Return d_mlp."""
        return int(self.projector.shape[0])


def null_space_projector(
    preserved_covariance: Float[Tensor, "d_mlp d_mlp"], threshold: float = 1e-2, relative: bool = False
) -> NullSpace:
    """Return the projector U Uᵀ on the eigenvectors with eigenvalue < threshold (× the largest if relative)."""
    if preserved_covariance.ndim != 2 or preserved_covariance.shape[0] != preserved_covariance.shape[1]:
        raise KisError(f"preserved covariance must be square [d_mlp, d_mlp], got {tuple(preserved_covariance.shape)}")
    if threshold <= 0:
        raise KisError(f"null-space threshold must be > 0, got {threshold}")
    matrix = preserved_covariance.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    cutoff = threshold * eigenvalues.max().item() if relative else threshold
    basis = eigenvectors[:, eigenvalues < cutoff]
    return NullSpace(basis @ basis.T, int(basis.shape[1]), float(cutoff))


def alphaedit_update(
    keys: Float[Tensor, "edit d_mlp"],
    residuals: Float[Tensor, "edit d_model"],
    null_space: NullSpace,
    previous_keys: Float[Tensor, "fact d_mlp"] | None = None,
    l2: float = 1.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return AlphaEdit's ΔW = P⊥(P⊥(KᵀK + K_pᵀK_p) + αI)⁻¹P⊥KᵀR, which lies in the preserved keys' null space."""
    if l2 <= 0:
        raise KisError(f"AlphaEdit's l2 term α must be > 0 (the projected system is singular otherwise), got {l2}")
    projector = null_space.projector
    device = projector.device
    keys64 = keys.double().to(device)
    outer = keys64.T @ keys64
    if previous_keys is not None and len(previous_keys):
        previous = previous_keys.double().to(device)
        outer = outer + previous.T @ previous
    system = projector @ outer + l2 * torch.eye(null_space.dim, dtype=torch.float64, device=device)
    delta = torch.linalg.solve(system, projector @ keys64.T @ residuals.double().to(device))
    return projector @ delta  # already in range(P⊥) in exact arithmetic; projecting again removes round-off


def alphaedit_delta(
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    keys: Float[Tensor, "edit d_mlp"],
    values: Float[Tensor, "edit d_model"],
    null_space: NullSpace,
    previous_keys: Float[Tensor, "fact d_mlp"] | None = None,
    l2: float = 1.0,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return AlphaEdit's null-space ΔW towards the values, protecting previously edited keys too."""
    _check_pairs(keys, values, weight)
    residuals = values.double() - layer_outputs(weight, bias, keys)
    return alphaedit_update(keys, residuals, null_space, previous_keys, l2)


# ---------------------------------------------------------------------------------------------------------
# The originals' updates, as their authors' code computes them (TransformerLens orientation, float64)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankOneEdit:
    """A ROME-family update ΔW = u rightᵀ and the numbers that explain its size."""

    delta: Float[Tensor, "d_mlp d_model"]
    left: Float[Tensor, " d_mlp"]  # u = C⁻¹d / ‖C⁻¹d‖ (d: the direction key)
    right: Float[Tensor, " d_model"]  # (v* − (s W + b)) / (s · u) (s: the scale key)


def rome_rank_one(
    direction_key: Float[Tensor, " d_mlp"],
    scale_key: Float[Tensor, " d_mlp"],
    value: Float[Tensor, " d_model"],
    weight: Float[Tensor, "d_mlp d_model"],
    bias: Float[Tensor, " d_model"],
    covariance: CovarianceLike,
) -> RankOneEdit:
    """Return ROME's update: u from the direction key (compute_u), right from the scale key (compute_v)."""
    _check_pairs(scale_key.reshape(1, -1), value.reshape(1, -1), weight)
    direction = direction_key.double().reshape(1, -1)
    solved = solve_covariance(covariance, direction)[0].cpu()
    norm = solved.norm()
    if not norm > 0:
        raise KisError("C⁻¹k̄ is zero: the direction key is zero")
    left = solved / norm
    scale = scale_key.double().cpu()
    dot = float(scale @ left)
    if dot == 0:
        raise KisError("the key is orthogonal to C⁻¹k̄: ROME's right vector (v* − Wk) / (k·u) is undefined")
    residual = value.double().cpu() - layer_outputs(weight.cpu(), bias.cpu(), scale.reshape(1, -1))[0]
    right = residual / dot
    return RankOneEdit(torch.outer(left, right), left, right)


def key_agreement(
    averaged_key: Float[Tensor, " d_mlp"], plain_key: Float[Tensor, " d_mlp"], covariance: CovarianceLike
) -> float:
    """Return ρ = (C⁻¹k̄)ᵀk / (C⁻¹k̄)ᵀk̄: original ROME's ΔW grows as 1/ρ (Gupta et al.'s disabling edits)."""
    solved = solve_covariance(covariance, averaged_key.double().reshape(1, -1))[0].cpu()
    return float((solved @ plain_key.double().cpu()) / (solved @ averaged_key.double().cpu()))


def memit_layer_delta(
    keys: Float[Tensor, "edit d_mlp"],
    targets: Float[Tensor, "edit d_model"],
    covariance: Float[Tensor, "d_mlp d_mlp"],
    covariance_weight: float,
    remaining_layers: int,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return one layer of MEMIT's update: solve(λC + KᵀK, Kᵀ) · (targets / remaining layers)."""
    if covariance_weight < 0 or remaining_layers < 1:
        raise KisError(f"need λ >= 0 and remaining_layers >= 1, got {covariance_weight}, {remaining_layers}")
    keys64 = keys.double().cpu()
    system = covariance_weight * covariance.double().cpu() + keys64.T @ keys64
    try:
        adjusted = torch.linalg.solve(system, keys64.T)
    except RuntimeError:
        raise KisError("λC + KᵀK is singular: raise --covariance_weight or check C") from None
    return adjusted @ (targets.double().cpu() / remaining_layers)


def alphaedit_layer_delta(
    keys: Float[Tensor, "edit d_mlp"],
    targets: Float[Tensor, "edit d_model"],
    projector: Float[Tensor, "d_mlp d_mlp"],
    earlier_keys_outer: Float[Tensor, "d_mlp d_mlp"],
    l2: float,
    remaining_layers: int,
) -> Float[Tensor, "d_mlp d_model"]:
    """Return one layer of AlphaEdit's update: solve(P(KᵀK + cache_c) + L2·I, P Kᵀ (targets / remaining layers))."""
    if not l2 > 0 or remaining_layers < 1:
        raise KisError(f"need L2 > 0 and remaining_layers >= 1, got {l2}, {remaining_layers}")
    keys64, projector64 = keys.double().cpu(), projector.double().cpu()
    eye = torch.eye(projector64.shape[0], dtype=torch.float64)
    system = projector64 @ (keys64.T @ keys64 + earlier_keys_outer.double().cpu()) + l2 * eye
    return torch.linalg.solve(system, projector64 @ keys64.T @ (targets.double().cpu() / remaining_layers))


# ---------------------------------------------------------------------------------------------------------
# Keys that do not superpose: whitening + Gram–Schmidt
# ---------------------------------------------------------------------------------------------------------


def whitened_orthogonal_keys(
    keys: Float[Tensor, "fact d_mlp"], covariance: CovarianceLike
) -> Float[Tensor, "fact d_mlp"]:
    """Return keys k'_i with k'_iᵀC⁻¹k'_j = 0 (i ≠ j), each the Gram–Schmidt successor of k_i with its C⁻¹-norm kept."""
    whitener = Whitener.of(covariance)
    if keys.shape[0] > whitener.dim:
        raise KisError(f"cannot make {keys.shape[0]} keys orthogonal in {whitener.dim} dimensions: use fewer facts")
    whitened = whitener.whiten(keys)  # rows L⁻¹k_i
    basis, triangle = torch.linalg.qr(whitened.T)  # Gram–Schmidt of the whitened keys, in order
    signs = torch.sign(torch.diagonal(triangle))
    signs[signs == 0] = 1
    norms = whitened.norm(dim=1)
    orthogonal = basis.T * (signs * norms)[:, None]
    return orthogonal @ whitener.factor.T  # back from the whitened space: k' = L w'
