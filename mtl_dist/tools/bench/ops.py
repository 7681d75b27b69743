"""Where the dense head's time goes, op by op: forward + backward of each head at each precision
under ``torch.profiler``, every aten op's self time put in one category (matmul, copy / layout,
activation, cast, softmax, reduction, other elementwise, other), beside the same head with the
formulations it had before issue 28 (:func:`before_issue_28`), all timed in one run.

``python -m mtl_dist.tools.bench.ops [--heads mmoe,ple] [--precisions fp32,bf16] [--batch 2048]``

Defaults: the peers' model size (input 264 = 16 features × 16 + 8 dense, 4 experts of
[256, 128], towers [64], 2 tasks, batch 2048). Prints the CPU model and its ISA flags first;
bf16 figures mean something only where the CPU has ``avx512_bf16`` or ``amx_bf16`` (or on
CUDA). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mtl_dist.config.model import GateConfig, InteractionConfig
from mtl_dist.models import experts as experts_module
from mtl_dist.models import ple as ple_module
from mtl_dist.models.heads import PLE, MoE
from mtl_dist.models.interaction import build_interaction
from mtl_dist.models.ple import MixedExperts
from mtl_dist.models.precision import Precision, set_head_precision
from mtl_dist.tools.bench.heads import fwd_bwd, interleaved, sync
from mtl_dist.tools.bench.training import cpu_line

CATEGORIES = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_weight_int8pack_mm"),
    "copy / layout": ("copy_", "cat", "stack", "clone", "contiguous", "index_select",
                      "index_add", "index", "_index_put_impl_", "gather", "scatter"),
    "activation": ("clamp_min", "relu", "threshold_backward", "silu", "silu_backward",
                   "sigmoid", "sigmoid_backward"),
    "cast": ("_to_copy",),
    "softmax": ("_softmax", "_softmax_backward_data", "_log_softmax"),
    "reduction": ("sum", "mean", "amax", "native_layer_norm", "native_layer_norm_backward"),
    "elementwise": ("add", "add_", "mul", "mul_", "div", "sub", "fill_", "zero_", "where"),
}  # fmt: skip
_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}


def op_profile(step: Callable[[], None], steps: int = 10) -> dict[str, dict[str, float]]:
    """``{category: {op [input shapes]: ms per step}}`` of ``step``'s aten ops (self time)."""
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    table: dict[str, Counter] = defaultdict(Counter)
    for event in prof.key_averages(group_by_input_shape=True):
        if not event.key.startswith("aten::"):
            continue
        op = event.key.removeprefix("aten::")
        self_us = event.self_device_time_total or event.self_cpu_time_total
        table[_CATEGORY.get(op, "other")][f"{op} {event.input_shapes}"] += self_us / steps / 1e3
    return {cat: dict(ops) for cat, ops in table.items()}


@contextlib.contextmanager
def before_issue_28() -> Iterator[None]:
    """The head's formulations before issue 28, for a same-run comparison: PLE / STEM gathering
    ``experts[index]`` into their mix, and the shared first layer's strided ``[G, B, H]`` view
    fed to the batched matmuls whatever the dtype."""

    def gathered(weights: torch.Tensor, experts: torch.Tensor, index: torch.Tensor):
        return torch.einsum("bte,tebh->tbh", weights, experts[index])

    saved = ple_module.mix_selected, experts_module._needs_standard_batch_strides
    ple_module.mix_selected = gathered
    experts_module._needs_standard_batch_strides = lambda x: False
    try:
        yield
    finally:
        ple_module.mix_selected, experts_module._needs_standard_batch_strides = saved


def _variant(step: Callable[[], None], before: bool) -> Callable[[], None]:
    def run() -> None:
        with before_issue_28() if before else contextlib.nullcontext():
            step()

    return run


class WithInteraction(nn.Module):
    """A head behind an interaction stage, as the ranker runs them (``model_body``)."""

    def __init__(self, interaction: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.interaction, self.head = interaction, head

    def forward(self, x: torch.Tensor):
        return self.head(self.interaction(x))


HEADS = ("mmoe", "ple", "mmoe_dselect", "mmoe_dcn_v2")


def build(name: str, in_dim: int, tasks: list[str], experts: int, hidden: list[int]) -> nn.Module:
    """One of :data:`HEADS`: MMoE, PLE (2 shared + 2 per-task experts), MMoE with DSelect-k
    gates (k = 2), MMoE behind a DCN-V2 cross stage (3 layers, its output beside the input)."""
    if name == "mmoe":
        return MoE(in_dim, tasks, experts, hidden, [64])
    if name == "ple":
        return PLE(in_dim, tasks, 2, MixedExperts(2, 2, hidden, [64]))
    if name == "mmoe_dselect":
        return MoE(in_dim, tasks, experts, hidden, [64], GateConfig(dselect_k=2))
    if name == "mmoe_dcn_v2":
        cross, width = build_interaction(InteractionConfig(kind="dcn_v2"), [in_dim], 0)
        return WithInteraction(cross, MoE(width, tasks, experts, hidden, [64]))
    raise SystemExit(f"--heads: {name!r} is not one of {', '.join(HEADS)}")


def set_precision(model: nn.Module, precision: Precision) -> None:
    """The head's (and an interaction stage's) compute dtype, as training sets them."""
    for m in (model, *model.children()) if isinstance(model, WithInteraction) else (model,):
        set_head_precision(m, precision)


def print_table(title: str, now: dict, before: dict) -> None:
    total_now = sum(sum(ops.values()) for ops in now.values())
    total_before = sum(sum(ops.values()) for ops in before.values())
    print(f"\n{title}: aten self time {total_before:.2f} → {total_now:.2f} ms per step")
    print(f"  {'category':<15}{'before ms':>10}{'share':>7}{'now ms':>9}{'share':>7}  top ops now")
    for cat in sorted(set(now) | set(before), key=lambda c: -sum(before.get(c, {}).values())):
        b, n = sum(before.get(cat, {}).values()), sum(now.get(cat, {}).values())
        top = sorted(now.get(cat, {}).items(), key=lambda kv: -kv[1])[:2]
        ops = "; ".join(f"{k[:60]} {v:.2f}" for k, v in top)
        print(f"  {cat:<15}{b:>10.2f}{b / total_before:>7.1%}{n:>9.2f}{n / total_now:>7.1%}  {ops}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="mmoe,ple", help=f"of {', '.join(HEADS)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--in-dim", type=int, default=264)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden = [int(h) for h in a.hidden.split(",")]
    x = torch.randn(a.batch, a.in_dim, device=device, requires_grad=True)
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for name in a.heads.split(","):
        for precision in a.precisions.split(","):
            torch.manual_seed(0)
            head = build(name, a.in_dim, ["click", "purchase"], a.experts, hidden).to(device)
            set_precision(head, Precision(precision, "bench"))
            steps[(name, precision)] = fwd_bwd(head, x)
    fns = {
        f"{k} {v}": _variant(s, v == "before") for k, s in steps.items() for v in ("before", "now")
    }
    secs = interleaved(fns, device, 8, a.rounds)
    print(cpu_line())
    print(f"device: {device}; batch {a.batch}, input {a.in_dim}, {a.experts} experts of {hidden}")
    print(
        f"\nforward+backward samples/s, before issue 28's changes and now (one run, best of {a.rounds})"
    )
    for k in steps:
        before, now = secs[f"{k} before"], secs[f"{k} now"]
        print(
            f"  {k[0]:<14}{k[1]:<6}{a.batch / before:>12,.0f}{a.batch / now:>12,.0f}{before / now:>8.2f}x"
        )
    for k, step in steps.items():
        print_table(f"{k[0]} {k[1]}", op_profile(step), op_profile(_variant(step, True)))


if __name__ == "__main__":
    main()
