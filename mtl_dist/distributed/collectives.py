"""The collectives helpers: every cross-rank reduction, gather and broadcast the toolkit uses.

Each works without a process group (one process: the value itself) and with a world of one,
so the same code runs under torchrun and in a plain test. Tensors are reduced on the device
they live on (gloo on CPU, NCCL on CUDA); objects go through ``torch.distributed``'s pickled
object collectives (small metadata only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or no process group)."""
    return rank() == 0


def barrier() -> None:
    """Every rank reaches this point before any goes on (a no-op without a group)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks; a new, detached tensor (``x``'s copy in one process)."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks; a new, detached tensor (gloo has no AVG: SUM / world)."""
    x = all_sum(x)
    if world_size() > 1:
        x /= world_size()
    return x


def all_max(x: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``x`` over ranks; a new, detached tensor."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, ...]`` of every rank concatenated in rank order ``[R·N, ...]`` (N equal on
    every rank); ``x`` itself in one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank; ``value`` itself in one process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
