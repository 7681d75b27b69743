"""Per-task validation metrics over the whole validation set, gathered from every rank.

Binary tasks: AUC, log-loss, calibration (mean prediction / mean label) and, with a group id
column, GAUC; regression tasks: MSE and MAE. When the data carries the true probability /
expected value, the same metric of the truth (the oracle: the best any model can reach on this
data) is reported beside it. Rows whose label is missing or that are padding (mask 0) are
excluded. Every rank's rows are gathered first, so the figures are those of the whole
validation set (equal to scikit-learn's on the concatenated predictions), not means of ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.functional.classification import binary_auroc

from mtl_dist.config import TaskSpec


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[N, ...]`` from every rank (N is equal on all ranks) in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


_EPS = float(np.finfo(np.float32).eps)  # predictions are float32: clip as sklearn's log_loss


def _logloss(p: torch.Tensor, y: torch.Tensor) -> float:
    p = p.double().clamp(_EPS, 1 - _EPS)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def group_auc(pred: np.ndarray, label: np.ndarray, group: np.ndarray) -> float:
    """GAUC (Zhou et al., KDD 2018): the AUC of each group (e.g. user) with both classes,
    averaged with the group's row count as weight. Vectorised rank sums, ties averaged.

    ``pred``, ``label`` (0/1), ``group``: ``[N]``. NaN when no group has both classes.
    """
    order = np.lexsort((pred, group))
    g, p, y = group[order], pred[order], label[order].astype(np.float64)
    new_group = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_group) - 1
    rank = np.arange(len(g)) - np.flatnonzero(new_group)[gid] + 1.0  # 1-based, within group
    tie = np.cumsum(new_group | np.r_[True, p[1:] != p[:-1]]) - 1
    rank = (np.bincount(tie, weights=rank) / np.bincount(tie))[tie]  # ties share their mean
    size = np.bincount(gid).astype(np.float64)
    pos = np.bincount(gid, weights=y)
    neg = size - pos
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    rank_pos = np.bincount(gid, weights=rank * y)[ok]
    auc = (rank_pos - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return float((auc * size[ok]).sum() / size[ok].sum())


def task_metrics(
    task: TaskSpec,
    pred: torch.Tensor,
    label: torch.Tensor,
    truth: torch.Tensor,
    group: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one task on its labelled rows (1-D tensors of equal length)."""
    out: dict[str, float] = {"count": float(label.numel())}
    if label.numel() == 0:
        return out
    has_truth = not torch.isnan(truth).any()
    if task.kind == "binary":
        y = label.double()
        out["auc"] = float(binary_auroc(pred.double(), label.long()))
        out["logloss"] = _logloss(pred, y)
        out["label_mean"] = float(y.mean())
        out["pred_mean"] = float(pred.double().mean())
        out["calibration"] = out["pred_mean"] / out["label_mean"] if out["label_mean"] else math.nan
        if group is not None:
            out["gauc"] = group_auc(pred.double().numpy(), label.numpy(), group.numpy())
        if has_truth:
            out["oracle_auc"] = float(binary_auroc(truth.double(), label.long()))
            out["oracle_logloss"] = _logloss(truth, y)
            if group is not None:
                out["oracle_gauc"] = group_auc(truth.double().numpy(), label.numpy(), group.numpy())
    else:
        err = pred.double() - label.double()
        out["mse"] = float(err.square().mean())
        out["mae"] = float(err.abs().mean())
        if has_truth:
            terr = truth.double() - label.double()
            out["oracle_mse"] = float(terr.square().mean())
            out["oracle_mae"] = float(terr.abs().mean())
    return out


def compute_metrics(
    tasks: list[TaskSpec],
    preds: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    truth: torch.Tensor,
    group: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """``preds, labels, mask, truth``: this rank's ``[N, T]`` (``group`` ``[N]`` for GAUC);
    returns ``{task: {metric: value}}`` over all ranks' rows (every rank gets the same)."""
    # gathered on their device (nccl needs CUDA tensors), measured on the CPU
    preds, labels, mask, truth = (gather_rows(t).cpu() for t in (preds, labels, mask, truth))
    group = gather_rows(group).cpu() if group is not None else None
    result = {}
    for j, task in enumerate(tasks):
        keep = mask[:, j] > 0
        result[task.name] = task_metrics(
            task,
            preds[keep, j],
            labels[keep, j],
            truth[keep, j],
            group[keep] if group is not None else None,
        )
    return result


def format_table(tasks: list[TaskSpec], metrics: dict[str, dict[str, float]]) -> str:
    """Human-readable per-task table: model vs oracle."""
    lines = [
        f"{'task':<14}{'kind':<12}{'rows':>9}  {'metric':<12}{'model':>9}{'oracle':>9}{'gap':>9}"
    ]
    for t in tasks:
        m = metrics[t.name]
        pairs = (
            [("auc", "oracle_auc"), ("gauc", "oracle_gauc"), ("logloss", "oracle_logloss")]
            + [("calibration", "")]
            if t.kind == "binary"
            else [("mse", "oracle_mse"), ("mae", "oracle_mae")]
        )
        for i, (k, ok) in enumerate(pairs):
            if k not in m:
                continue
            head = f"{t.name:<14}{t.kind:<12}{int(m['count']):>9}" if i == 0 else " " * 35
            oracle = m.get(ok)
            o = f"{oracle:>9.4f}" if oracle is not None else f"{'-':>9}"
            gap = f"{abs(oracle - m[k]):>9.4f}" if oracle is not None else f"{'-':>9}"
            lines.append(f"{head}  {k:<12}{m[k]:>9.4f}{o}{gap}")
    return "\n".join(lines)
