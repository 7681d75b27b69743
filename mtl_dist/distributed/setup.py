"""Process group and device from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

Same code on CPU and GPU: CUDA present → ``nccl`` and ``cuda:LOCAL_RANK``; else ``gloo`` and CPU.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import sys
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


def keep_large_buffers() -> bool:
    """Let glibc's malloc reuse freed large blocks instead of unmapping them (Linux, CPU).

    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap`` s and
    unmaps them on free, so every step's large activations (``[E, B, H]`` experts at B = 4096 is
    32 MiB) pay page faults on first touch: measured 3-4x slower ReLU / bias passes. Raising
    the mmap and trim thresholds keeps them in the heap (what jemalloc / tcmalloc do, without
    an LD_PRELOAD); memory stays bounded by the step's peak. Returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from <malloc.h>
    big = 1 << 30
    return bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))


_STORE: dist.Store | None = None  # a restarted group's store, kept alive until destroy()


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The ``env://`` store, namespaced by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts a failed group, the agent's store can still
    hold the previous attempt's peer addresses (seen with ``--standalone`` on torch 2.13), and
    gloo then dials dead peers and times out; a per-attempt prefix keeps attempts apart.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,  # under torchrun the agent hosts it
        timeout=timeout,
        multi_tenant=not agent,
    )
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
    if dev.type == "cpu":
        keep_large_buffers()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python -m ...`: a one-process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        timeout = datetime.timedelta(seconds=timeout_s)
        global _STORE
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        _STORE = attempt_store(rank, world, timeout) if restarted else None
        dist.init_process_group(
            backend=backend,
            store=_STORE,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world, local_world, dev, backend)


def destroy() -> None:
    """Tear the process group down, then release the store it used (in that order)."""
    global _STORE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None
