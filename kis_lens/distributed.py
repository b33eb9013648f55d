"""torch.distributed glue for `torchrun ... kis_lens.cli cache-cov`: rank, world size, exact all-reduce of sums."""

from __future__ import annotations

import os

import torch

from kis_lens.stats import SecondMoment


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); return (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """Return (rank, world_size) of the running process group, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> str | None:
    """Return this rank's GPU ("cuda:LOCAL_RANK") under torchrun with GPUs, else None (the default device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def all_reduce_moments(moments: dict[int, SecondMoment]) -> None:
    """Sum every rank's float64 sums and counts into every rank's accumulators (a no-op on one process)."""
    for layer in sorted(moments):  # the same order on every rank: collectives pair up
        moments[layer].all_reduce()


def all_reduce_ints(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Return the element-wise sum of integer lists over all ranks."""
    rank, world_size = rank_and_world()
    if world_size <= 1 or not values:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(value) for value in tensor.tolist()]


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    _, world_size = rank_and_world()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
