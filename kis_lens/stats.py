"""Streaming, exactly mergeable uncentered second moment E[k kᵀ] of activation rows."""

from __future__ import annotations

import threading
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError

# Rows per block of the triangular product: block i forms rows[:, s:e]ᵀ·rows[:, s:], the part of XᵀX on and
# right of its diagonal, so d_mlp = 1536 takes 6 blocks and 0.58 of a dense XᵀX's multiply-adds. Measured on
# a 2-core CPU: 128–384 rows are equally fast; 512 and more compute too much below the diagonal.
TRIANGLE_BLOCK_ROWS = 256

# One float32 scratch buffer per device and thread, shared by every layer's accumulator: the block products
# land in it contiguously (no temporary per layer and batch) before they are added into the float64 totals.
_scratch = threading.local()


def triangle_blocks(dim: int, block_rows: int = TRIANGLE_BLOCK_ROWS) -> list[tuple[int, int]]:
    """Return the (start, stop) column ranges whose row blocks tile the upper triangle of a dim × dim product."""
    return [(start, min(start + block_rows, dim)) for start in range(0, dim, block_rows)]


def triangle_size(dim: int, block_rows: int = TRIANGLE_BLOCK_ROWS) -> int:
    """Return how many floats the row blocks of the upper triangle hold."""
    return sum((stop - start) * (dim - start) for start, stop in triangle_blocks(dim, block_rows))


def _scratch_buffer(device: torch.device, numel: int) -> Float[Tensor, " numel"]:
    buffers: dict[torch.device, Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]


def upper_gram_blocks(
    rows: Float[Tensor, "row d_mlp"], block_rows: int = TRIANGLE_BLOCK_ROWS
) -> list[tuple[int, Float[Tensor, "block d_right"]]]:
    """Return [(start, rows[:, start:stop]ᵀ·rows[:, start:])] in float32: the row blocks of XᵀX's upper triangle.

    The blocks are views of a scratch buffer, valid until this thread's next call on that device.
    """
    rows = rows.to(torch.float32)
    dim = rows.shape[1]
    scratch = _scratch_buffer(rows.device, triangle_size(dim, block_rows))
    blocks, offset = [], 0
    for start, stop in triangle_blocks(dim, block_rows):
        size = (stop - start) * (dim - start)
        block = scratch[offset : offset + size].view(stop - start, dim - start)
        torch.mm(rows[:, start:stop].T, rows[:, start:], out=block)
        blocks.append((start, block))
        offset += size
    return blocks


class NonFiniteBatch(KisError):
    """A batch whose product has a NaN or inf (a NaN/inf activation, or a float32 overflow); nothing was added."""


def symmetrize_upper(upper: Float[Tensor, "d_mlp d_mlp"]) -> Float[Tensor, "d_mlp d_mlp"]:
    """Return the symmetric matrix whose upper triangle is upper's."""
    triangle = torch.triu(upper)
    return triangle + torch.triu(upper, diagonal=1).T


class SecondMoment:
    """Running sum of k kᵀ (float64) and row count; ``compute()`` returns E[k kᵀ].

    Each batch's product is formed in float32 as the row blocks of one triangle (about half the work of
    XᵀX, the same code on every device) and added to a float64 total, so 10⁸ tokens lose nothing that
    matters. ``merge`` adds sums and counts, so shards computed anywhere
    combine into the one-pass result.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = int(dim)
        # Only the upper triangle is maintained; ``sum`` mirrors it on demand.
        self.upper: Float[Tensor, "d_mlp d_mlp"] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count: int = 0

    @property
    def sum(self) -> Float[Tensor, "d_mlp d_mlp"]:
        """Return the full symmetric float64 sum of k kᵀ."""
        return symmetrize_upper(self.upper)

    def update(self, rows: Float[Tensor, "row d_mlp"]) -> None:
        """Add the outer products of a batch of activation rows; raise NonFiniteBatch (adding nothing) on NaN/inf."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise KisError(f"expected activation rows of shape [n, {self.dim}], got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        blocks = upper_gram_blocks(rows.to(device=self.upper.device))
        # The diagonal is each column's sum of squares: a NaN or inf anywhere in the rows, or a product that
        # overflows float32, shows there, and by Cauchy–Schwarz a finite diagonal bounds every other entry.
        # Checking d numbers replaces a pass over all n·d activations.
        diagonal_finite = torch.stack(
            [torch.isfinite(block[:, : block.shape[0]].diagonal()).all() for _, block in blocks]
        )
        if not bool(diagonal_finite.all()):
            raise NonFiniteBatch("the batch's product has a NaN or inf: a NaN/inf activation or a float32 overflow")
        for start, block in blocks:
            self.upper[start : start + block.shape[0], start:].add_(block)  # float32 batch product into float64
        self.count += int(rows.shape[0])

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Add another accumulator's sums into this one and return self."""
        if other.dim != self.dim:
            raise KisError(f"cannot merge second moments of dimension {other.dim} into {self.dim}")
        self.upper += torch.triu(other.upper).to(self.upper.device)
        self.upper = torch.triu(self.upper)
        self.count += other.count
        return self

    def all_reduce(self) -> SecondMoment:
        """Sum this accumulator over every torch.distributed rank in place (a no-op if not distributed); return self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return self
        self.upper = torch.triu(self.upper)  # the unspecified lower triangle must not be summed
        dist.all_reduce(self.upper, op=dist.ReduceOp.SUM)
        count = torch.tensor([self.count], dtype=torch.int64, device=self.upper.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        self.count = int(count.item())
        return self

    def compute(self, dtype: torch.dtype = torch.float64) -> Float[Tensor, "d_mlp d_mlp"]:
        """Return the uncentered second moment sum / count (float64 unless another dtype is asked for)."""
        if self.count == 0:
            raise KisError("the second moment saw no tokens: the corpus is empty or every text was empty")
        return (self.sum / self.count).to(dtype)

    def state_dict(self) -> dict[str, Any]:
        """Return the exact state: the float64 upper triangle of the sum and the row count."""
        return {"upper": torch.triu(self.upper), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> SecondMoment:
        """Replace this accumulator's state by a state_dict (upper triangle or full sum, and a count); return self."""
        total = state["upper"] if "upper" in state else state["sum"]
        if tuple(total.shape) != (self.dim, self.dim):
            raise KisError(
                f"a state of shape {tuple(total.shape)} does not fit a second moment of dimension {self.dim}"
            )
        self.upper = torch.triu(total.to(device=self.upper.device, dtype=torch.float64)).clone()
        self.count = int(state["count"])
        return self

    def clone(self, device: str | torch.device | None = None) -> SecondMoment:
        """Return an independent copy (on device, default this one's)."""
        copy = SecondMoment(self.dim, device=device or self.upper.device)
        return copy.load_state_dict(self.state_dict())

    @staticmethod
    def bytes_needed(dim: int) -> int:
        """Return the memory one accumulator of this dimension holds, plus the float32 scratch of its products.

        The scratch is shared by all layers but counted for each, so memory budgets err on the safe side.
        """
        return dim * dim * 8 + triangle_size(dim) * 4

    @classmethod
    def from_state(cls, total: Float[Tensor, "d_mlp d_mlp"], count: int) -> SecondMoment:
        """Return an accumulator that continues from a saved sum (full or upper triangle) and count."""
        return cls(total.shape[0], device=total.device).load_state_dict({"upper": total, "count": count})

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count}, device={self.upper.device})"
