"""The end-to-end benchmark's roofline: the dense model's FLOPs per sample and this machine's
matmul rate, measured in the same run, per process and thread layout."""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from mtl_dist.tools.bench.e2e_runs import TASKS


def model_flops_per_sample(meta: dict, experts: int = 4, hidden=(256, 128), tower=(64,)) -> float:
    """Multiply-adds × 2 × 3 (forward, and backward's two products) of the dense MMoE per row:
    the experts, the gates' logits and the towers. The embedding lookups are not matmuls."""
    d_in = 16 * len(meta["columns"]["sparse"]) + len(meta["columns"]["dense"])
    dims = [d_in, *hidden]
    macs = experts * sum(a * b for a, b in zip(dims, dims[1:]))
    macs += len(TASKS) * d_in * experts  # gate logits
    tdims = [hidden[-1], *tower, 1]
    macs += len(TASKS) * sum(a * b for a, b in zip(tdims, tdims[1:]))
    return 2.0 * macs * 3


def _matmul_rate(threads: int, seconds: float, queue, dtype: str = "fp32") -> None:
    """GFLOP/s of the model's largest product (batch × d_in × E·H1) on ``threads`` threads,
    in ``dtype`` (fp32 | bf16)."""
    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(2048, 264, dtype=dt), torch.randn(264, 1032, dtype=dt)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    queue.put(2 * 2048 * 264 * 1032 * n / (time.perf_counter() - t0) / 1e9)


def hardware_baseline(seconds: float = 3.0, precisions: tuple[str, ...] = ()) -> dict[str, float]:
    """This machine's matmul rate now: one process × 1 and × 2 threads, and two 1-thread
    processes at once (what a 2 × 1 layout can get from the cores at best); ``1x2 <p>`` for
    each reduced precision of ``precisions``."""
    ctx = mp.get_context("spawn")
    out = {}
    runs = [("1x1", 1, 1, "fp32"), ("1x2", 1, 2, "fp32"), ("2x1", 2, 1, "fp32")]
    runs += [(f"1x2 {p}", 1, 2, p) for p in precisions if p != "fp32"]
    for name, procs, threads, dtype in runs:
        q = ctx.Queue()
        ps = [
            ctx.Process(target=_matmul_rate, args=(threads, seconds, q, dtype))
            for _ in range(procs)
        ]
        for p in ps:
            p.start()
        out[name] = sum(q.get() for _ in ps)
        for p in ps:
            p.join()
    out["scaling_2x1"] = out["2x1"] / out["1x1"]
    return out
