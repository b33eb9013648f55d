"""Streaming, exactly mergeable uncentered second moment E[k kᵀ] of activation rows."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError

try:  # BLAS ssyrk forms only one triangle of XᵀX: half the multiply-adds of a dense product.
    from scipy.linalg.blas import ssyrk as _ssyrk
except ImportError:  # pragma: no cover - scipy is optional; the blocked torch path does the same job
    _ssyrk = None

# Column blocks of the triangular update on devices without a syrk: 8 blocks compute 36/64 ≈ 0.56 of XᵀX.
TRIANGLE_BLOCKS = 8


def upper_gram(rows: Float[Tensor, "n d"], blocks: int = TRIANGLE_BLOCKS) -> Float[Tensor, "d d"]:
    """Return a float32 matrix whose upper triangle (diagonal included) is rowsᵀ·rows; the rest is unspecified."""
    rows = rows.to(torch.float32)
    if rows.device.type == "cpu" and _ssyrk is not None:
        array = rows.contiguous().numpy()
        # array.T is Fortran-ordered, so BLAS reads it without a copy; asking for the lower triangle of a
        # column-major result gives, read row-major, the upper triangle of a C-contiguous matrix.
        lower = _ssyrk(1.0, array.T, trans=0, lower=1)
        return torch.from_numpy(lower.T)
    dim = rows.shape[1]
    size = -(-dim // max(1, blocks))
    gram = torch.empty(dim, dim, dtype=torch.float32, device=rows.device)
    for start in range(0, dim, size):
        stop = min(start + size, dim)
        torch.mm(rows[:, start:stop].T, rows[:, start:], out=gram[start:stop, start:])
    return gram


def symmetrize_upper(upper: Float[Tensor, "d d"]) -> Float[Tensor, "d d"]:
    """Return the symmetric matrix whose upper triangle is upper's."""
    triangle = torch.triu(upper)
    return triangle + torch.triu(upper, diagonal=1).T


class SecondMoment:
    """Running sum of k kᵀ (float64) and row count; ``compute()`` returns E[k kᵀ].

    Each batch's product is formed in float32 as one triangle only (BLAS syrk on CPU, a blocked
    triangular product elsewhere: about half the work of XᵀX) and added to a float64 total, so 10⁸
    tokens lose nothing that matters. ``merge`` adds sums and counts, so shards computed anywhere
    combine into the one-pass result.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = int(dim)
        # Only the upper triangle is maintained; ``sum`` mirrors it on demand.
        self.upper: Float[Tensor, "d d"] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count: int = 0

    @property
    def sum(self) -> Float[Tensor, "d d"]:
        """Return the full symmetric float64 sum of k kᵀ."""
        return symmetrize_upper(self.upper)

    @sum.setter
    def sum(self, total: Float[Tensor, "d d"]) -> None:
        self.upper = total.to(torch.float64).clone()

    def update(self, rows: Float[Tensor, "n d"]) -> None:
        """Add the outer products of a batch of activation rows."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise KisError(f"expected activation rows of shape [n, {self.dim}], got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        gram = upper_gram(rows.to(device=self.upper.device))
        self.upper.add_(gram)  # float32 batch product into the float64 total
        self.count += int(rows.shape[0])

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's sums into this one and return self."""
        if other.dim != self.dim:
            raise KisError(f"cannot merge second moments of dimension {other.dim} into {self.dim}")
        self.upper += torch.triu(other.upper).to(self.upper.device)
        self.upper = torch.triu(self.upper)
        self.count += other.count
        return self

    def compute(self, dtype: torch.dtype = torch.float32) -> Float[Tensor, "d d"]:
        """Return the uncentered second moment sum / count."""
        if self.count == 0:
            raise KisError("the second moment saw no tokens: the corpus is empty or every text was empty")
        return (self.sum / self.count).to(dtype)

    def state_dict(self) -> dict[str, Any]:
        """Return the raw sums and count (what merging and checkpoints need)."""
        return {"sum": self.sum, "count": self.count}

    def nbytes(self) -> int:
        """Return the memory this accumulator holds."""
        return self.upper.numel() * self.upper.element_size()

    @staticmethod
    def bytes_needed(dim: int) -> int:
        """Return the memory one accumulator of this dimension holds, plus its float32 batch product."""
        return dim * dim * (8 + 4)

    @classmethod
    def from_state(cls, total: Float[Tensor, "d d"], count: int) -> "SecondMoment":
        """Return an accumulator that continues from a saved sum (full or upper triangle) and count."""
        moment = cls(total.shape[0], device=total.device)
        moment.upper = torch.triu(total.to(torch.float64)).clone()
        moment.count = int(count)
        return moment

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count}, device={self.upper.device})"
