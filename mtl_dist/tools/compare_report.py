"""A comparison's report: ``compare.{csv,md,png}`` of a summary (a Markdown table per task, a bar
chart per task) and ``task_relations.{csv,md}`` of the training labels."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtl_dist.config import JobConfig, TaskSpec
from mtl_dist.observe.metrics import label_unit
from mtl_dist.tools.compare_summary import (
    HIGHER_IS_BETTER,
    Stat,
    Summary,
    format_stat,
    summary_rows,
    task_main_metric,
)
from mtl_dist.tools.relations import RELATION_COLUMNS, format_markdown, task_relations


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rows as CSV; columns: ``columns`` or the union of the rows' keys, first-seen order."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def summary_markdown(summary: Summary, tasks: list[TaskSpec], seeds: int) -> str:
    """One table per task: a row per head (mean ± std over seeds, gap to the oracle), then the
    oracle's row."""
    heads = list(summary)
    out = [
        f"Mean ± sample std over {seeds} seed(s); gap = mean over seeds of |oracle − model| "
        "(the oracle scores the data's true probabilities / expected values)."
    ]
    for t in tasks:
        keys = list(dict.fromkeys(k for h in heads for k in summary[h].get(t.name, {})))
        if not keys:
            continue
        with_oracle = [
            k for k in keys if any(not math.isnan(summary[h][t.name][k].oracle) for h in heads)
        ]
        header = ["head"] + [
            c for k in keys for c in ([k, f"gap {k}"] if k in with_oracle else [k])
        ]
        lines = [f"\n### {t.name} ({t.kind})\n", "| " + " | ".join(header) + " |"]
        lines.append("|---" + "|---:" * (len(header) - 1) + "|")
        for h in heads:
            stats = summary[h].get(t.name, {})
            cells = [h]
            for k in keys:
                s = stats.get(k)
                cells.append(format_stat(s) if s else "")
                if k in with_oracle:
                    cells.append(f"{s.gap:.4f}" if s and not math.isnan(s.gap) else "")
            lines.append("| " + " | ".join(cells) + " |")
        oracle = ["oracle"]
        for k in keys:
            o = [summary[h][t.name][k].oracle for h in heads if k in summary[h].get(t.name, {})]
            o = [x for x in o if not math.isnan(x)]
            oracle += [f"{np.mean(o):.4f}" if o else "", ""] if k in with_oracle else [""]
        lines.append("| " + " | ".join(oracle) + " |")
        notes = {
            f"{k}: {r}"
            for h in heads
            for k, s in summary[h].get(t.name, {}).items()
            for r in s.reasons
        }
        if notes:
            lines.append(
                "\nUndefined in some runs (left out of the mean): " + "; ".join(sorted(notes))
            )
        if t.kind == "regression" and t.transform == "log1p":
            lines.append(f"\nMSE / MAE in {label_unit(t)} units.")
        out += lines
    return "\n".join(out) + "\n"


def plot_summary(path: Path, summary: Summary, tasks: list[TaskSpec]) -> None:
    """Per task: each head's main metric as a bar (mean, error bar = std over seeds) and the
    oracle as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        k = task_main_metric(t)
        stats = [summary[h][t.name].get(k, Stat([], math.nan, math.nan)) for h in heads]
        if not any(s.defined for s in stats):
            ax.set_title(f"{t.name}: {k} undefined")
            continue
        means = np.array([s.mean for s in stats])  # NaN (no bar) where undefined
        stds = np.array([s.std for s in stats])
        ax.bar(range(len(heads)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        known = [s.oracle for s in stats if not math.isnan(s.oracle)]
        oracle = float(np.mean(known)) if known else math.nan
        lo, hi = float(np.nanmin(means - stds)), float(np.nanmax(means + stds))
        if not math.isnan(oracle):
            ax.axhline(oracle, color="black", linestyle="--", label=f"oracle {oracle:.4f}")
            lo, hi = min(lo, oracle), max(hi, oracle)
            ax.legend(loc="best", fontsize="small")
        pad = 0.15 * (hi - lo) or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        better = "higher" if k in HIGHER_IS_BETTER else "lower"
        ax.set_title(f"{t.name}: {k} ({better} is better)")
        ax.set_xticks(range(len(heads)), heads, rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    out: Path, summary: Summary, results: dict[str, list[dict]], tasks: list[TaskSpec], seeds: int
) -> str:
    """Write ``compare.{csv,md,png}`` under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", summary_rows(summary, results))
    md = summary_markdown(summary, tasks, seeds)
    (out / "compare.md").write_text(md)
    plot_summary(out / "compare.png", summary, tasks)
    return md


def report_relations(cfg: JobConfig, out: Path, bins: int, max_rows: int) -> str:
    """Task relations of ``cfg``'s training labels, written as ``task_relations.{csv,md}``."""
    t = time.perf_counter()
    rows = task_relations(cfg.data.train_path, cfg.tasks, bins, max_rows)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "task_relations.csv", rows, RELATION_COLUMNS)
    md = (
        f"Task relations of {cfg.data.train_path} (rows where both labels exist; regression "
        f"labels after their transform; MI on {bins} quantile bins for regression labels):\n\n"
        + format_markdown(rows)
        + f"\n\n({time.perf_counter() - t:.1f}s)\n"
    )
    (out / "task_relations.md").write_text(md)
    return md
