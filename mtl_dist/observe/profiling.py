"""Where a training step's time goes: a torch.profiler trace split into the step's phases.

``--monitor.profile_steps N`` profiles N training steps after ``monitor.profile_after`` warm-up
steps and writes ``profile_rank<r>.json``; rank 0 prints the table. Each profiled operator's own
(self) CPU time is charged to the phase of its innermost tagged ancestor (or itself):

* ``data``: pulling the batch (the DataLoader's ``__next__``) and moving it to the device;
* ``collectives``: c10d / gloo / NCCL calls and TorchRec's waits on them (embedding all-to-alls,
  DDP's gradient all-reduce);
* ``embedding_fwd`` / ``embedding_bwd``: TorchRec's input distribution and lookup, fbgemm's
  table-batched kernels (the backward one applies the fused optimizer to the rows);
* ``optimizer``: the dense optimizer's step;
* ``dense_bwd``: everything else the autograd engine runs; ``dense_fwd``: everything else;
* ``python``: the step's wall time no operator accounts for (interpreter and framework code).

Shares are of the mean step wall time. On CUDA the CPU times are host (launch) costs only:
device time is not recorded.
"""

from __future__ import annotations

from collections import defaultdict

from torch.autograd.profiler_util import EventList, FunctionEvent

PHASES = (
    "data",
    "embedding_fwd",
    "dense_fwd",
    "embedding_bwd",
    "dense_bwd",
    "collectives",
    "optimizer",
    "python",
)


def _tag(name: str, in_backward: bool) -> str | None:
    """The phase an operator or record_function range named ``name`` belongs to, if tagged."""
    if name.startswith(("c10d::", "gloo:", "nccl:", "record_param_comms")) or "wait()" in name:
        return "collectives"
    if "all2all" in name or "alltoall" in name or "allreduce" in name:
        return "collectives"
    if name.startswith("fbgemm::") or "[lookup]" in name or "_dist]" in name:
        return "embedding_bwd" if in_backward or "backward" in name else "embedding_fwd"
    if name.startswith(("enumerate(DataLoader)", "## copy_batch_to_gpu")):
        return "data"
    if name.startswith(("Optimizer.step", "Optimizer.zero_grad")) or "## zero_grad" in name:
        return "optimizer"
    if name.startswith("autograd::engine::evaluate_function"):
        return "dense_bwd"
    return None


def _phase(event: FunctionEvent) -> str:
    """Phase of ``event``: its own tag or its innermost tagged ancestor's; else dense_fwd."""
    chain, e = [], event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    in_backward = any(n.startswith("autograd::engine") for n in chain)
    for name in chain:
        tag = _tag(name, in_backward)
        if tag is not None:
            return tag
    return "dense_bwd" if in_backward else "dense_fwd"


def step_profile(events: EventList, steps: int, wall_s: float) -> dict[str, object]:
    """Mean ms per step of each phase and its share of the step, from a profiler's events.

    ``wall_s``: wall time of the ``steps`` profiled steps (the ``python`` phase is what the
    operators' self times leave of it).
    """
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        ms[_phase(e)] += e.self_cpu_time_total / 1e3  # µs → ms
    per = {p: ms.get(p, 0.0) / steps for p in PHASES if p != "python"}
    # operators on other threads can overlap the step: then their sum is the step
    step_ms = max(wall_s * 1e3 / steps, sum(per.values()))
    per["python"] = step_ms - sum(per.values())
    return {
        "steps": steps,
        "step_ms": step_ms,
        "ms": {p: per[p] for p in PHASES},
        "share": {p: per[p] / step_ms for p in PHASES},
    }


def format_profile(profile: dict[str, object]) -> str:
    """The profile as a small table: phase, ms per step, share of the step."""
    lines = [f"step {profile['step_ms']:.1f} ms (mean of {profile['steps']} profiled steps)"]
    for p in PHASES:
        lines.append(f"  {p:<14}{profile['ms'][p]:>8.2f} ms {profile['share'][p]:>7.1%}")
    return "\n".join(lines)
