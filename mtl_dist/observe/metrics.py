"""Per-task validation metrics over the whole validation set, gathered from every rank.

Binary tasks: AUC, log-loss, calibration (mean prediction / mean label) and, with a group id
column, GAUC; regression tasks: MSE and MAE. When the data carries the true probability /
expected value, the same metric of the truth (the oracle: the best any model can reach on this
data) is reported beside it. Rows whose label is missing or that are padding (mask 0) are
excluded. Every rank's rows are gathered first, so the figures are those of the whole
validation set (equal to scikit-learn's on the concatenated predictions), not means of ranks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from mtl_dist.config import TaskSpec
from mtl_dist.distributed.collectives import gather_rows
from mtl_dist.files import written_whole

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


def _two_classes(y: torch.Tensor) -> str:
    """Why a ranking metric of labels ``y`` is undefined ('' when both classes occur)."""
    pos, n = int(y.sum()), y.numel()
    if 0 < pos < n:
        return ""
    return f"one class only: {pos:,} positive(s) among {n:,} labelled rows"


def label_unit(task: TaskSpec) -> str:
    """The unit regression metrics of ``task`` are in: the label's, or log1p of it."""
    return f"log1p({task.label})" if task.transform == "log1p" else task.label


def metric_units(tasks: list[TaskSpec]) -> dict[str, str]:
    """``{regression task: the unit of its MSE (squared) and MAE}`` (``metrics.json``)."""
    return {t.name: label_unit(t) for t in tasks if t.kind == "regression"}


def _gauc(scores: torch.Tensor, label: torch.Tensor, group: torch.Tensor, key: str,
          out: dict[str, float], undefined: dict[str, str]) -> None:  # fmt: skip
    gauc = group_auc(scores.double().numpy(), label.numpy(), group.numpy())
    if math.isnan(gauc):
        undefined[key] = "no group has both classes"
    else:
        out[key] = gauc


def _binary_metrics(
    pred: torch.Tensor,
    label: torch.Tensor,
    truth: torch.Tensor | None,
    group: torch.Tensor | None,
    out: dict[str, float],
    undefined: dict[str, str],
) -> None:
    """A binary task's figures into ``out`` / ``undefined`` (see :func:`task_metrics`);
    ``truth`` None: no oracle figures."""
    y = label.double()
    one_class = _two_classes(y)
    if one_class:
        undefined["auc"] = one_class
        if truth is not None:
            undefined["oracle_auc"] = one_class
    else:
        out["auc"] = float(binary_auroc(pred.double(), label.long()))
    out["logloss"] = _logloss(pred, y)
    out["label_mean"] = float(y.mean())
    out["pred_mean"] = float(pred.double().mean())
    if out["label_mean"] > 0:
        out["calibration"] = out["pred_mean"] / out["label_mean"]
    else:
        undefined["calibration"] = "no positive label (mean label 0)"
    if group is not None:
        _gauc(pred, label, group, "gauc", out, undefined)
    if truth is not None:
        if not one_class:
            out["oracle_auc"] = float(binary_auroc(truth.double(), label.long()))
        out["oracle_logloss"] = _logloss(truth, y)
        if group is not None:
            _gauc(truth, label, group, "oracle_gauc", out, undefined)


def task_metrics(
    task: TaskSpec,
    pred: torch.Tensor,
    label: torch.Tensor,
    truth: torch.Tensor,
    group: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics of one task on its labelled rows (1-D tensors of equal length):
    ``({metric: value}, {metric: why it is undefined})``.

    Every value is a finite float. A metric that is undefined on these rows — AUC, GAUC and
    their oracle twins with one class only, calibration without a positive, every metric
    without a labelled row, the oracle's without truth on every row, every model metric when a
    prediction is not finite — is left out of the values and its reason given instead, never
    a number (torchmetrics returns AUC 0 for one class). Regression figures are in
    :func:`label_unit` (MSE: its square).
    """
    out: dict[str, float] = {"count": float(label.numel())}
    undefined: dict[str, str] = {}
    names = (
        ["auc", "logloss", "calibration"] + (["gauc"] if group is not None else [])
        if task.kind == "binary"
        else ["mse", "mae"]
    )
    if label.numel() == 0:
        return out, {k: "no labelled row" for k in names}
    has_truth = not torch.isnan(truth).any()
    if not has_truth and task.truth:
        missing = int(torch.isnan(truth).sum())
        undefined.update(
            {
                f"oracle_{k}": f"truth missing on {missing:,} row(s)"
                for k in names
                if k != "calibration"
            }
        )
    if task.kind == "binary":
        _binary_metrics(pred, label, truth if has_truth else None, group, out, undefined)
    else:
        err = pred.double() - label.double()
        out["mse"] = float(err.square().mean())
        out["mae"] = float(err.abs().mean())
        if has_truth:
            terr = truth.double() - label.double()
            out["oracle_mse"] = float(terr.square().mean())
            out["oracle_mae"] = float(terr.abs().mean())
    bad_preds = int((~torch.isfinite(pred)).sum())
    if bad_preds:  # a diverged model: AUC of NaN scores is not a figure of anything
        for k in [*names, "pred_mean"]:
            if out.pop(k, None) is not None or k in names:
                undefined[k] = f"{bad_preds:,} prediction(s) not finite"
    for k, v in list(out.items()):  # a non-finite figure (a diverged model) is not a value
        if not math.isfinite(v):
            del out[k]
            undefined[k] = f"not finite ({v})"
    return out, undefined


def compute_metrics(
    tasks: list[TaskSpec],
    preds: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    truth: torch.Tensor,
    group: torch.Tensor | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """``preds, labels, mask, truth``: this rank's ``[N, T]`` (``group`` ``[N]`` for GAUC);
    returns ``({task: {metric: value}}, {task: {metric: why undefined}})`` over all ranks'
    rows (every rank gets the same; see :func:`task_metrics`)."""
    # gathered on their device (nccl needs CUDA tensors), measured on the CPU
    preds, labels, mask, truth = (gather_rows(t).cpu() for t in (preds, labels, mask, truth))
    group = gather_rows(group).cpu() if group is not None else None
    values, undefined = {}, {}
    for j, task in enumerate(tasks):
        keep = mask[:, j] > 0
        values[task.name], why = task_metrics(
            task,
            preds[keep, j],
            labels[keep, j],
            truth[keep, j],
            group[keep] if group is not None else None,
        )
        if why:
            undefined[task.name] = why
    return values, undefined


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (``null``): what
    ``json.dump(..., allow_nan=False)`` accepts. Metrics carry their reasons already; this is
    the last guard so no file this toolkit writes holds ``NaN`` / ``Infinity``, which are not
    JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented, strict JSON (see :func:`json_safe`), written whole or not at all."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    with written_whole(path) as tmp:
        tmp.write_text(text)


def format_table(
    tasks: list[TaskSpec],
    metrics: dict[str, dict[str, float]],
    undefined: dict[str, dict[str, str]] | None = None,
) -> str:
    """Human-readable per-task table: model vs oracle. An undefined metric reads ``n/a`` with
    its reason; regression rows name their unit."""
    lines = [
        f"{'task':<14}{'kind':<12}{'rows':>9}  {'metric':<12}{'model':>9}{'oracle':>9}{'gap':>9}"
    ]
    for t in tasks:
        m = metrics[t.name]
        why = (undefined or {}).get(t.name, {})
        pairs = (
            [("auc", "oracle_auc"), ("gauc", "oracle_gauc"), ("logloss", "oracle_logloss")]
            + [("calibration", "")]
            if t.kind == "binary"
            else [("mse", "oracle_mse"), ("mae", "oracle_mae")]
        )
        shown = [(k, ok) for k, ok in pairs if k in m or k in why]
        for i, (k, ok) in enumerate(shown):
            head = f"{t.name:<14}{t.kind:<12}{int(m['count']):>9}" if i == 0 else " " * 35
            model, oracle = m.get(k), m.get(ok)
            cells = [f"{model:>9.4f}" if model is not None else f"{'n/a':>9}"]
            missing = "n/a" if ok in why else "-"  # undefined, or no truth at all
            cells.append(f"{oracle:>9.4f}" if oracle is not None else f"{missing:>9}")
            gap = abs(oracle - model) if model is not None and oracle is not None else None
            cells.append(f"{gap:>9.4f}" if gap is not None else f"{'-':>9}")
            reasons: dict[str, list[str]] = {}
            for key in (k, ok):
                if key in why:
                    reasons.setdefault(why[key], []).append(key)
            notes = [f"{' and '.join(keys)} undefined: {r}" for r, keys in reasons.items()]
            if t.kind == "regression":
                notes.insert(0, f"unit: {label_unit(t)}" + ("^2" if k == "mse" else ""))
            note = f"   ({'; '.join(notes)})" if notes else ""
            lines.append(f"{head}  {k:<12}{''.join(cells)}{note}")
    return "\n".join(lines)
