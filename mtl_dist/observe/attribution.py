"""Per-task feature attribution: which input features each task's prediction leans on.

For task t and feature f: the mean over rows of ``Σ_{columns of f} |∂ out_t / ∂x · (x − x̄)|``,
where x ``[B, Din]`` is the head's input (each sparse feature's pooled embedding, each dense
value) and x̄ its batch mean — gradient × input against the average input as the baseline, so
a feature's constant offset (an embedding's common direction) earns nothing. A feature a task
ignores scores near 0 for that task. Averaged over rows of every rank.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mtl_dist.balancing import all_mean
from mtl_dist.data.batch import Batch
from mtl_dist.files import written_whole


def feature_attribution(
    ranker: nn.Module, batches: Iterable[Batch], device: torch.device
) -> tuple[list[str], torch.Tensor]:
    """Attribution ``[T, F]`` over ``batches`` (the same count on every rank) and feature names.

    ``ranker`` is the (sharded) :class:`~mtl_dist.models.ranker.Ranker`, called directly —
    outside DDP, which would wait for a parameter backward that never comes.
    """
    was_training, probes = ranker.training, ranker.probes
    ranker.eval()
    ranker.probes = replace(probes, head_input=True)  # the output's head_input: x [B, Din]
    names, widths = ranker.input_blocks()
    total, count = None, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with torch.enable_grad():
                ranked = ranker(batch)
                outputs, x = ranked.logits, ranked.head_input  # [B, T], [B, Din]
                per_task = []
                for t in range(outputs.shape[1]):
                    (g,) = torch.autograd.grad(outputs[:, t].sum(), x, retain_graph=True)
                    gx = (g * (x - x.mean(0))).abs().detach()  # [B, Din]
                    per_task.append(torch.stack([c.sum(1) for c in gx.split(widths, 1)], 1))
            keep = batch.mask.amax(1) > 0  # skip padding rows
            part = torch.stack(per_task)[:, keep].sum(1)  # [T, F]
            total = part if total is None else total + part
            count += int(keep.sum())
    finally:
        ranker.probes = probes
        ranker.train(was_training)
    if total is None:
        raise ValueError("feature attribution needs at least one batch")
    stats = all_mean(torch.cat([total.flatten(), torch.tensor([float(count)], device=device)]))
    return names, (stats[:-1] / stats[-1].clamp_min(1)).view_as(total).cpu()


def write_attribution(
    path: Path, features: list[str], tasks: list[str], attr: torch.Tensor
) -> None:
    """``feature, <task>..., rank_<task>...`` CSV: one row per feature (rank 1 = most used)."""
    ranks = attr.argsort(1, descending=True).argsort(1) + 1  # [T, F]
    with written_whole(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", *tasks, *[f"rank_{t}" for t in tasks]])
        for f, name in enumerate(features):
            w.writerow(
                [name, *[f"{attr[t, f]:.6g}" for t in range(len(tasks))],
                 *[int(ranks[t, f]) for t in range(len(tasks))]]
            )  # fmt: skip


def attribution_figure(features: list[str], tasks: list[str], attr: torch.Tensor):
    """Feature × task heatmap, each task's column scaled to its maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = (attr / attr.amax(1, keepdim=True).clamp_min(1e-12)).t().numpy()  # [F, T]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(tasks), 0.8 + 0.28 * len(features)))
    im = ax.imshow(scaled, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(features)), features)
    ax.set_title("|grad x input| per task (÷ task max)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
