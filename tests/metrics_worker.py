"""Run under torchrun: each rank holds different (padded) rows; compute_metrics over all ranks.

Writes each rank's metrics and its raw rows to ``OUT/rank<r>.pt`` for the test to compare with
scikit-learn on the concatenation.
"""

import sys

import torch
import torch.distributed as dist

from mtl_dist.config import TaskSpec
from mtl_dist.observe.metrics import compute_metrics

TASKS = [
    TaskSpec(name="click", label="click"),
    TaskSpec(name="watch", kind="regression", label="watch"),
    TaskSpec(name="never", label="never", truth="p_never"),  # no positive on any rank
    TaskSpec(name="split", label="split"),  # rank 0 only negatives, rank 1 only positives
]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    n = 3000  # equal row count per rank (the validation reader pads); masks differ
    preds = torch.stack([torch.rand(n, generator=g) * 0.98 + 0.01, torch.randn(n, generator=g)], 1)
    labels = torch.stack(
        [(torch.rand(n, generator=g) < preds[:, 0]).float(), torch.randn(n, generator=g)], 1
    )
    mask = (torch.rand(n, 2, generator=g) < 0.8).float()
    mask[n - 200 * (rank + 1) :] = 0  # padding rows: a different number on each rank
    truth = torch.stack([preds[:, 0] * 0.5 + 0.25, labels[:, 1] * 0.9], 1)
    # two more binary tasks: one class over all ranks (AUC undefined), and one class per rank
    # but both classes over the gathered set (AUC defined: one rank alone must not decide)
    extra = torch.rand(n, 2, generator=g) * 0.98 + 0.01
    preds = torch.cat([preds, extra], 1)
    labels = torch.cat([labels, torch.zeros(n, 1), torch.full((n, 1), float(rank))], 1)
    mask = torch.cat([mask, torch.ones(n, 2)], 1)
    mask[n - 200 * (rank + 1) :] = 0
    truth = torch.cat([truth, extra * 0.5, torch.full((n, 1), float("nan"))], 1)
    preds = preds.to(torch.float32)
    group = torch.randint(0, 50, (n,), generator=g)
    metrics = compute_metrics(TASKS, preds, labels, mask, truth, group)
    torch.save(
        {"metrics": metrics, "preds": preds, "labels": labels, "mask": mask, "truth": truth,
         "group": group},
        f"{out}/rank{rank}.pt",
    )  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
