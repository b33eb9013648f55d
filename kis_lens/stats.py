"""Streaming, exactly mergeable uncentered second moment E[k kᵀ] of activation rows."""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError


class SecondMoment:
    """Running sum of k kᵀ (float64) and row count; ``compute()`` returns E[k kᵀ].

    Each batch's product is formed in float32 (fast, exact enough for a few thousand rows) and added
    to a float64 total, so 10⁸ tokens lose nothing that matters. ``merge`` adds sums and counts, so
    shards computed anywhere combine into exactly the one-pass result.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = int(dim)
        self.sum: Float[Tensor, "d d"] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count: int = 0

    def update(self, rows: Float[Tensor, "n d"]) -> None:
        """Add the outer products of a batch of activation rows."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise KisError(f"expected activation rows of shape [n, {self.dim}], got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        rows = rows.to(device=self.sum.device, dtype=torch.float32)
        self.sum += einops.einsum(rows, rows, "n i, n j -> i j").double()
        self.count += int(rows.shape[0])

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's sums into this one and return self."""
        if other.dim != self.dim:
            raise KisError(f"cannot merge second moments of dimension {other.dim} into {self.dim}")
        self.sum += other.sum.to(self.sum.device)
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

    @classmethod
    def from_state(cls, total: Float[Tensor, "d d"], count: int) -> "SecondMoment":
        """Return an accumulator that continues from a saved sum and count."""
        moment = cls(total.shape[0], device=total.device)
        moment.sum = total.to(torch.float64).clone()
        moment.count = int(count)
        return moment

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count}, device={self.sum.device})"
