"""Dense-head benchmark: forward+backward samples/s of every head, batched vs a per-expert loop,
dense vs top-k gating, achieved GFLOP/s next to a plain matmul's on this device, and every head
at each precision (fp32, bf16; fp16 on CUDA) against the roofline of that precision's own
matmul rate, measured in the same run.

``python -m mtl_dist.tools.bench.heads [--batch 4096 --in-dim 256 --experts 8 --hidden 256,128 --tasks 3]
[--precisions fp32,bf16]``

Runs unchanged on CUDA when present (no TorchRec needed). Prints the CPU model and its ISA flags
(avx2 / avx512 / amx) first. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl_dist.distributed.setup import keep_large_buffers
from mtl_dist.models.dependent import DependentTowers
from mtl_dist.models.experts import ExpertStyle
from mtl_dist.models.funnel import AITM
from mtl_dist.models.gates import GateConfig
from mtl_dist.models.head_parts import Probe
from mtl_dist.models.heads import PLE, MoE, SharedBottom
from mtl_dist.models.outputs import NO_PROBES
from mtl_dist.models.pepnet import PEPNet
from mtl_dist.models.ple import MixedExperts
from mtl_dist.models.precision import Precision, resolve_precision, set_head_precision
from mtl_dist.tools.bench.training import cpu_line


class LoopMMoE(nn.Module):
    """The straightforward baseline: a ModuleList of expert MLPs and gates, looped in Python."""

    def __init__(
        self, in_dim: int, tasks: int, experts: int, hidden: list[int], tower: list[int]
    ) -> None:
        super().__init__()

        def mlp(d: int, widths: list[int], last_act: bool = True) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i, w in enumerate(widths):
                layers.append(nn.Linear(d, w))
                if i < len(widths) - 1 or last_act:
                    layers.append(nn.ReLU())
                d = w
            return nn.Sequential(*layers)

        self.experts = nn.ModuleList(mlp(in_dim, hidden) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(in_dim, experts) for _ in range(tasks))
        self.towers = nn.ModuleList(
            mlp(hidden[-1], [*tower, 1], last_act=False) for _ in range(tasks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([e(x) for e in self.experts], 1)  # [B, E, H]
        res = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), -1).unsqueeze(-1)
            res.append(tower((w * outs).sum(1)))
        return torch.cat(res, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, reps: int, rounds: int
) -> dict[str, float]:
    """Seconds per call of each function: the best over ``rounds`` of the mean of ``reps`` calls,
    the functions taking turns within each round so that a noisy neighbour on a shared machine
    slows them alike (noise only ever adds time, hence best-of). Warmed up, synchronised."""
    for fn in fns.values():
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t) / reps)
    return best


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return step


def by_precision(
    heads: dict[str, nn.Module],
    x: torch.Tensor,
    precisions: list[str],
    device: torch.device,
    n: int,
    reps: int,
    rounds: int,
) -> None:
    """Every head (not the loop baseline) at each precision, against the roofline of that
    precision's own matmul rate (every FLOP of the head at it), all timed in one interleaved
    run so the comparison holds on a noisy machine."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    mats = {p: (torch.randn(n, n, device=device, dtype=dtypes[p]),) * 2 for p in precisions}
    fns: dict[str, Callable[[], None]] = {}
    for p in precisions:
        fns[f"matmul {p}"] = lambda m=mats[p]: m[0] @ m[1]
        for name, head in heads.items():
            if not isinstance(head, LoopMMoE):
                fns[f"{name} {p}"] = _in(head, Precision(p, "bench"), fwd_bwd(head, x))
    secs = interleaved(fns, device, reps, rounds)
    for head in heads.values():
        set_head_precision(head, Precision("fp32", "bench"))
    B = x.shape[0]
    print("\nprecision: forward+backward samples/s, and % of the roofline at that precision")
    print(f"  {'head':<40}" + "".join(f"{p:>22}" for p in precisions))
    rates = {p: 2 * n**3 / secs[f"matmul {p}"] / 1e9 for p in precisions}
    print(f"  {'matmul GFLOP/s':<40}" + "".join(f"{rates[p]:>22,.1f}" for p in precisions))
    for name, head in heads.items():
        if isinstance(head, LoopMMoE):
            continue
        with FlopCounterMode(display=False) as counter:
            fwd_bwd(head, x)()
        flops = counter.get_total_flops()
        cells = []
        for p in precisions:
            rate = B / secs[f"{name} {p}"]
            roof = flops / (rates[p] * 1e9)
            cells.append(f"{rate:>12,.0f} ({roof / secs[f'{name} {p}']:>4.0%})")
        print(f"  {name:<40}" + "".join(f"{c:>22}" for c in cells))


def _in(head: nn.Module, precision: Precision, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with ``head`` switched to ``precision`` first."""

    def run() -> None:
        set_head_precision(head, precision)
        step()

    return run


def build_heads(D: int, names: list[str], E: int, hidden: list[int]) -> dict[str, nn.Module]:
    """Every head timed, by its row label: the loop MMoE baseline first."""
    T = len(names)
    dom, prior = max(1, D // 16), max(2, D // 4)  # 16 domain, 48 prior columns at D = 256
    return {
        "loop MMoE (baseline)": LoopMMoE(D, T, E, hidden, [64]),
        "mmoe": MoE(D, names, E, hidden, [64]),
        "omoe": MoE(D, names, E, hidden, [64], shared_gate=True),
        "shared_bottom": SharedBottom(D, T, hidden, [64]),
        "ple (2 levels, 2+2 experts)": PLE(D, names, 2, MixedExperts(2, 2, hidden, [64])),
        "mmoe top-2": MoE(D, names, E, hidden, [64], GateConfig(top_k=2)),
        "omoe top-2 (one gate)": MoE(
            D, names, E, hidden, [64], GateConfig(top_k=2), shared_gate=True
        ),
        "mmoe dselect-2": MoE(D, names, E, hidden, [64], GateConfig(dselect_k=2)),
        "mmoe swish + layer-norm experts": MoE(
            D, names, E, hidden, [64], style=ExpertStyle("swish", "layer")
        ),
        "aitm (chain of all tasks)": AITM(D, names, names, hidden, [64]),
        "dbmtl over mmoe (chain)": MoE(
            D,
            names,
            E,
            hidden,
            [64],
            towers=DependentTowers(T, hidden[-1], [64], [32], {t: [t - 1] for t in range(1, T)}),
        ),  # fmt: skip
        f"pepnet ({dom} domain, {prior - dom} prior cols)": PEPNet(
            D, names, list(range(dom)), list(range(dom, prior)), [64]
        ),
        "ple + HoME feature (r 8) / self gates": PLE(
            D,
            names,
            2,
            MixedExperts(
                2, 2, hidden, [64], style=ExpertStyle(feature_gate_rank=8), self_gate=True
            ),
        ),  # fmt: skip
    }


def pick_precisions(requested: str, device: torch.device) -> list[str]:
    """``--precisions``, or fp32 plus what the device computes natively."""
    if requested:
        precisions = requested.split(",")
    elif device.type == "cuda":
        precisions = ["fp32", "bf16", "fp16"]
    else:  # bf16 where the CPU computes it natively; emulated it is 10-30x slower than fp32
        auto = resolve_precision("auto", "cpu")
        precisions = ["fp32", "bf16"] if auto.name == "bf16" else ["fp32"]
        if auto.name != "bf16":
            print(f"\nbf16 not timed: {auto.reason} (--precisions fp32,bf16 times it anyway)")
    return precisions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--precisions",
        default="",
        help="comma list (default: fp32, bf16 where native: CUDA, AMX-BF16 / AVX512-BF16; fp16 on CUDA)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuned = device.type == "cpu" and keep_large_buffers()  # as training does on CPU
    hidden = [int(h) for h in a.hidden.split(",")]
    B, D, E, T = a.batch, a.in_dim, a.experts, a.tasks
    names = [f"t{i}" for i in range(T)]
    x = torch.randn(B, D, device=device, requires_grad=True)  # as embeddings are in training
    torch.manual_seed(0)

    heads = build_heads(D, names, E, hidden)
    fns = {name: fwd_bwd(model.to(device), x) for name, model in heads.items()}

    # the machine's plain matmul rate, same device, same run
    n = 4096 if device.type == "cuda" else 2048
    m1, m2 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    fns["matmul"] = lambda: m1 @ m2
    # expert compute alone: dense stacked experts vs top-2-of-E sparse dispatch with one gate
    fns["dense experts"] = fwd_bwd(heads["mmoe"].experts, x)
    sparse = heads["omoe top-2 (one gate)"]
    with torch.no_grad():
        weights, _ = sparse.gates(x)
    selected = (weights > 0).any(1)
    probe = Probe(NO_PROBES, training=True)
    fns["top-2 experts"] = lambda: sparse._sparse_mix(x, weights, selected, probe).sum().backward()

    secs = interleaved(fns, device, a.reps, a.rounds)
    mm_rate = 2 * n**3 / secs["matmul"] / 1e9
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(cpu_line())
    print(f"device: {device} ({where}); plain {n}x{n} matmul: {mm_rate:,.1f} GFLOP/s")
    if tuned:
        print("malloc: large blocks kept in the heap (keep_large_buffers), for every model below")
    print(f"\nforward+backward, batch {B}, input {D}, {E} experts of {hidden}, {T} tasks")
    size = {name: sum(q.numel() for q in model.parameters()) for name, model in heads.items()}
    print(f"  {'head':<40}{'samples/s':>12}{'vs mmoe':>9}{'parameters':>12}{'vs mmoe':>9}")
    for name, model in heads.items():
        note = f"  dispatch={model.dispatch(x)}" if isinstance(model, MoE) else ""
        print(f"  {name:<40}{B / secs[name]:>12,.0f}{secs['mmoe'] / secs[name]:>9.2f}"
              f"{size[name]:>12,}{size[name] / size['mmoe']:>9.2f}{note}")  # fmt: skip
    ratio = secs["loop MMoE (baseline)"] / secs["mmoe"]
    print(f"  batched MMoE / loop = {ratio:.2f}x (target >= 1.4x)")
    # roofline: every FLOP of the MMoE at the plain matmul rate; no implementation beats it
    with FlopCounterMode(display=False) as counter:
        fns["mmoe"]()
    roof = counter.get_total_flops() / (mm_rate * 1e9)
    print(
        f"  roofline (all {counter.get_total_flops() / 1e9:.1f} GFLOP at the matmul rate): "
        f"{B / roof:,.0f} samples/s; loop at {roof / secs['loop MMoE (baseline)']:.0%} of it, "
        f"batched at {roof / secs['mmoe']:.0%}; the most any batching can gain over this loop: "
        f"{secs['loop MMoE (baseline)'] / roof:.2f}x"
    )

    by_precision(heads, x, pick_precisions(a.precisions, device), device, n, a.reps, a.rounds)

    flops = 3 * 2 * B * E * sum(i * o for i, o in zip([D, *hidden], hidden))  # fwd + bwd
    t_dense, t_sparse = secs["dense experts"], secs["top-2 experts"]
    rate = flops / t_dense / 1e9
    print(
        f"\ndense expert compute: {rate:,.1f} GFLOP/s = {rate / mm_rate:.0%} of matmul (target >= 60%)"
    )
    f = selected.float().mean().item()
    print(
        f"top-2 of {E}, one gate ({sparse.experts.grouped_kernel(x)}): computed fraction f = {f:.3f}; "
        f"expert time {t_sparse / t_dense:.2f} of dense (target <= 1.5 f = {1.5 * f:.2f}); "
        f"speed-up {t_dense / t_sparse:.2f}x"
    )


if __name__ == "__main__":
    main()
