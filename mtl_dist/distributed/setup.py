"""Process group and device from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

Same code on CPU and GPU: CUDA present → ``nccl`` and ``cuda:LOCAL_RANK``; else ``gloo`` and CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", threads: int = 0, timeout_s: int = 600) -> DistInfo:
    """Initialise the default process group (a group of one without torchrun) and set threads.

    ``threads`` = 0 gives each local rank ``cores // local ranks`` intra-op threads, so ranks on one
    host do not oversubscribe the CPU.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python -m ...`: a one-process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world, local_world, dev, backend)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
