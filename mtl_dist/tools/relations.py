"""Task relations from the labels alone: how related are a job's tasks before any training?

For every pair of tasks, on the rows where BOTH labels exist (non-null, non-NaN):

* Pearson correlation of the labels as the model sees them (regression ``transform = "log1p"``
  applied);
* mutual information (nats) of the discretised labels: binary labels as they are, regression
  labels cut into ``bins`` quantile bins first (MI of continuous values needs a discretisation;
  quantile bins are invariant to the log1p transform and robust to the heavy tail).

Only the label columns are read (pyarrow column projection), so this is cheap even on a large
training set.

Example::

    cfg = load_config(["--config", "configs/default.toml"])
    rows = task_relations(cfg.data.train_path, cfg.tasks)
    print(format_markdown(rows))  # | task_a | task_b | rows | pearson | mutual_info |
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow.dataset as ds

from mtl_dist.config import TaskSpec
from mtl_dist.data.reader import list_parquet_files

RELATION_COLUMNS = ["task_a", "task_b", "rows", "pearson", "mutual_info"]


def read_labels(path: str, tasks: list[TaskSpec], max_rows: int = 0) -> dict[str, np.ndarray]:
    """Each task's label column as float64 ``[N]``, NaN where missing, transform applied.

    ``path``: a directory, glob or comma-separated files (as ``data.train_path``); ``max_rows``
    > 0 reads only the first rows.
    """
    columns = sorted({t.label for t in tasks})
    dataset = ds.dataset(list_parquet_files(path), format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{path}: no label column(s) {missing} (have {dataset.schema.names})")
    table = dataset.head(max_rows, columns=columns) if max_rows else dataset.to_table(columns)
    out = {}
    for t in tasks:
        col = table.column(t.label)
        # nulls become NaN: the one "missing" marker from here on
        y = col.cast("float64").to_numpy(zero_copy_only=False).astype(np.float64)
        y[np.isin(y, t.missing_values)] = np.nan  # sentinels such as -1 mean "no label"
        if t.kind == "regression" and t.transform == "log1p":
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.log1p(y)
        y[~np.isfinite(y)] = np.nan  # ±inf (or log1p of a value <= -1) is no label either
        out[t.name] = y
    return out


def discretise(y: np.ndarray, kind: str, bins: int) -> np.ndarray:
    """Integer codes ``[N]``: binary labels as they are, regression labels by quantile bin.

    Tied quantile edges (e.g. many zero watch times) merge into one bin.
    """
    if kind == "binary":
        return y.astype(np.int64)
    edges = np.unique(np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, y, side="right")


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI (nats) of two integer code arrays ``[N]`` from their contingency table.

    Same definition as scikit-learn's ``mutual_info_score`` (a dev-only dependency here).
    """
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log(joint[nz] / outer[nz])).sum()))


def task_relations(
    path: str, tasks: list[TaskSpec], bins: int = 10, max_rows: int = 0
) -> list[dict[str, object]]:
    """One row per task pair: ``{task_a, task_b, rows, pearson, mutual_info}``.

    ``rows`` counts the rows where both labels exist; the figures are NaN when fewer than two
    such rows exist or a label is constant on them.
    """
    labels = read_labels(path, tasks, max_rows)
    result = []
    for ta, tb in itertools.combinations(tasks, 2):
        a, b = labels[ta.name], labels[tb.name]
        both = ~np.isnan(a) & ~np.isnan(b)
        a, b = a[both], b[both]
        pearson = mi = float("nan")
        if a.size >= 2 and a.std() > 0 and b.std() > 0:
            pearson = float(np.corrcoef(a, b)[0, 1])
            mi = mutual_information(discretise(a, ta.kind, bins), discretise(b, tb.kind, bins))
        row = {"task_a": ta.name, "task_b": tb.name, "rows": int(both.sum())}
        result.append({**row, "pearson": pearson, "mutual_info": mi})
    return result


def format_markdown(rows: list[dict[str, object]]) -> str:
    """The relations as a Markdown table (also readable as plain text)."""
    lines = [
        "| task_a | task_b | rows (both labelled) | Pearson | MI (nats) |",
        "|---|---|---:|---:|---:|",
    ]
    fmt = lambda x: "n/a" if math.isnan(x) else f"{x:.4f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['task_a']} | {r['task_b']} | {r['rows']} | {fmt(r['pearson'])} | {fmt(r['mutual_info'])} |"
        )
    if any(math.isnan(r["pearson"]) for r in rows):
        lines.append(
            "\nn/a: a label is constant (or < 2 rows) where both exist, e.g. click = 1 wherever"
            " conversion is labelled."
        )
    return "\n".join(lines)
