"""Run under torchrun (2 ranks): every balancer trains an MMoE head under DDP while the
conversion task has no label on any rank for a stretch (and on rank 1 only for another).

Different data on each rank; the real loss module (:class:`ModelWithLoss`: the step check's
all-gather, the balancer, the update gate) and the real guarded dense optimizer. Writes each
rank's per-step task weights and the uncertainty log-variances to ``OUT/rank<r>.pt``.
"""

import sys

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mtl_dist.balancing import all_mean
from mtl_dist.config import BALANCERS, LossConfig, TaskSpec
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.loop.guard import GradGate
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.optim import GuardedDense
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.heads import MoE
from mtl_dist.models.outputs import NO_PROBES

TASKS = [
    TaskSpec(name="click", label="click"),
    TaskSpec(name="conversion", label="conversion"),
    TaskSpec(name="watch", kind="regression", label="watch"),
]
STEPS, B, D = 60, 64, 8
NONE_ANYWHERE = range(10, 30)  # no conversion label on any rank
NONE_ON_RANK1 = range(30, 40)  # none on rank 1 only


class DenseRanker(nn.Module):
    """Dense features straight into the head (the tables are not what is tested here)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = MoE(D, [t.name for t in TASKS], 3, [16, 8], [8])
        self.grad_gate = GradGate()

    def forward(self, batch):
        return self.head(self.grad_gate(batch.dense), getattr(self, "probes", NO_PROBES))


def batch(step: int, rank: int, conv: ArrowBatchConverter):
    rng = np.random.default_rng(1000 * rank + step)
    x = rng.normal(size=(B, D))
    click = (rng.random(B) < 1 / (1 + np.exp(-x[:, 0]))).astype(np.int8)
    conversion = pa.array((rng.random(B) < 0.3).astype(np.int8))
    if step in NONE_ANYWHERE or (step in NONE_ON_RANK1 and rank == 1):
        conversion = pa.nulls(B, pa.int8())
    cols = {f"x{i}": x[:, i] for i in range(D)}
    table = pa.table({**cols, "click": click, "conversion": conversion, "watch": x[:, 1] * 2})
    return conv(table)


def run(balancer: str, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = LossConfig(balancer=balancer, dwa_period=5, gradnorm_lr=0.1)
    model = ModelWithLoss(DenseRanker(), TASKS, loss=cfg)
    step_fn = TrainStep(model)  # the step check, balancer and update gate
    ddp = DDP(model)
    named = dict(ddp.named_parameters())
    # the balancer's own parameters at a high learning rate: the drift the fix prevents shows
    # within these 60 steps (at the default rate it takes ~90k)
    own = {id(p) for p in model.balancer.parameters()}

    def adam(params):
        groups = [{"params": [p for p in params if id(p) not in own], "lr": 0.01},
                  {"params": [p for p in params if id(p) in own], "lr": 0.5}]  # fmt: skip
        return torch.optim.Adam([g for g in groups if g["params"]], fused=True)

    opt = GuardedDense(named, adam, step_fn.switch)
    model.balancer.attach(opt._optimizer)
    opt.before_step.append(model.balancer.before_step)
    conv = ArrowBatchConverter([], [f"x{i}" for i in range(D)], TASKS)
    weights, log_vars = [], []
    for step in range(STEPS):
        loss, out = step_fn.loss(ddp(batch(step, rank, conv)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(out.weights.detach().clone())
        if balancer == "uncertainty":
            log_vars.append(model.balancer.log_vars.detach().clone())
    # the head's weights too: DDP keeps them equal, the test checks they stayed finite
    head = torch.cat([p.detach().flatten() for p in model.model.parameters()])
    return {
        "weights": torch.stack(weights),
        "log_vars": torch.stack(log_vars) if log_vars else torch.zeros(0),
        "head_mean": all_mean(head.abs().mean().unsqueeze(0)),
        "head_finite": torch.isfinite(head).all(),
        "head_sum": head.double().sum(),  # this rank's: equal on every rank if updates were
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {b: run(b, rank) for b in BALANCERS}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
