"""Process group and device from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

Same code on CPU and GPU: CUDA present → ``nccl`` and ``cuda:LOCAL_RANK``; else ``gloo`` and CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import itertools
import os
import sys
from dataclasses import dataclass, field

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
    cpu_blocks: list[list[int]] = field(default_factory=list)  # each local rank's CPUs; [] unbound

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


def physical_cores(cpus: set[int]) -> list[list[int]]:
    """The logical CPUs in ``cpus`` grouped by physical core (socket, core id), in CPU order.

    Reads Linux's ``/sys/devices/system/cpu/cpuN/topology``; a CPU without it is its own core.
    """
    cores: dict[tuple[str, str] | int, list[int]] = {}
    for c in sorted(cpus):
        topo = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{topo}/physical_package_id") as p, open(f"{topo}/core_id") as k:
                key: tuple[str, str] | int = (p.read().strip(), k.read().strip())
        except OSError:
            key = c
        cores.setdefault(key, []).append(c)
    return list(cores.values())


def cpu_blocks(local_world: int, cores: list[list[int]] | None = None) -> list[list[int]]:
    """The logical CPUs each of ``local_world`` local ranks is bound to (``[]``: none bound).

    ``cores``, the allowed physical cores (default: :func:`physical_cores` of
    ``os.sched_getaffinity``, what Slurm, a cgroup or taskset left this process), are cut into
    ``local_world`` contiguous blocks, the remainder to the first ranks; each rank gets one block
    with every hyperthread of its cores, so no two ranks share a physical core. ``[]`` with one
    local rank or fewer physical cores than local ranks.
    """
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            return []
        cores = physical_cores(os.sched_getaffinity(0))
    if local_world <= 1 or len(cores) < local_world:
        return []
    per, extra = divmod(len(cores), local_world)
    starts = [r * per + min(r, extra) for r in range(local_world + 1)]
    return [[c for core in cores[a:b] for c in core] for a, b in zip(starts, starts[1:])]


def bind_process(cpus: list[int]) -> None:
    """Bind every thread of this process (``os.sched_setaffinity`` binds only the calling one)
    and the threads and processes it starts later to ``cpus``."""
    tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def init_distributed(
    device: str = "auto", threads: int = 0, timeout_s: int = 600, cpu_affinity: str = "auto"
) -> DistInfo:
    """Initialise the default process group (a group of one without torchrun) and set threads.

    ``threads`` = 0 gives each local rank ``cores // local ranks`` intra-op threads, so ranks on one
    host do not oversubscribe the CPU. ``cpu_affinity`` = ``auto`` on CPU binds each local rank
    to its own block of physical cores (:func:`cpu_blocks`), so the OS does not move a rank or its
    gloo threads onto another rank's core (2 ranks × 1 thread on 2 cores, issue 28: +3–8%
    samples/s over unbound in three alternated rounds; docs/benchmarks.md).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if threads <= 0:  # the CPUs this process may use (Slurm, cgroups, taskset), not the host's
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        threads = max(1, (len(allowed) if allowed else os.cpu_count() or 1) // local_world)
    blocks = cpu_blocks(local_world) if cpu_affinity == "auto" and dev.type == "cpu" else []
    if blocks:
        bind_process(blocks[local_rank])
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
    return DistInfo(rank, local_rank, world, local_world, dev, backend, blocks)


def destroy() -> None:
    """Tear the process group down, then release the store it used (in that order)."""
    global _STORE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None


def describe_binding(info: DistInfo) -> str:
    """One line: which CPUs each local rank is bound to, e.g. ``local ranks bound to CPUs 0-3 | 4-7``."""
    if not info.cpu_blocks:
        return "ranks not bound to cores"
    return "local ranks bound to CPUs " + " | ".join(_ranges(b) for b in info.cpu_blocks)


def _ranges(cpus: list[int]) -> str:
    """``[0, 1, 2, 5, 8, 9]`` → ``0-2,5,8-9``."""
    runs = [  # consecutive CPUs share ``cpu - position``
        [c for _, c in run]
        for _, run in itertools.groupby(enumerate(sorted(cpus)), key=lambda p: p[1] - p[0])
    ]
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
