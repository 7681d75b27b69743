"""The correlation sweep's tables and chart: correlation × head → each task's main metric and
its advantage over the baseline head."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mtl_dist.config import TaskSpec
from mtl_dist.tools.compare_summary import (
    Stat,
    advantage,
    format_stat,
    summarize,
    task_main_metric,
)


def sweep_tables(
    per_rho: dict[float, dict[str, list[dict]]], tasks: list[TaskSpec], baseline: str
) -> tuple[list[dict[str, Any]], str]:
    """Rows (correlation × head: main metric per task, advantage over ``baseline``) and the
    Markdown of the sweep."""
    rows = []
    mains = {t.name: task_main_metric(t) for t in tasks}
    metric_cols = [f"{t.name} {mains[t.name]}" for t in tasks]
    md = [
        "Main metric per task, mean ± sample std over seeds (gap = mean |oracle − model|):\n",
        "| correlation | head | " + " | ".join(f"{c} | gap" for c in metric_cols) + " |",
        "|---:|---" + "|---:|---:" * len(tasks) + "|",
    ]
    adv_md = [
        f"\nAdvantage over {baseline} (positive = better; AUC: head − base, MSE: base − head), "
        "mean ± sample std of the per-seed differences:\n",
        "| correlation | head | " + " | ".join(metric_cols) + " |",
        "|---:|---" + "|---:" * len(tasks) + "|",
    ]
    for rho, results in per_rho.items():
        summary = summarize(results, tasks)
        for head, runs in results.items():
            row: dict[str, Any] = {"correlation": rho, "head": head, "seeds": len(runs)}
            cells, adv_cells = [], []
            for t in tasks:
                k = mains[t.name]
                s = summary[head][t.name].get(k, Stat([], math.nan, math.nan, len(runs)))
                if s.defined:
                    row.update({f"{t.name}/{k}_mean": s.mean, f"{t.name}/{k}_std": s.std})
                    if not math.isnan(s.gap):
                        row[f"{t.name}/{k}_gap"] = s.gap
                gap = "" if math.isnan(s.gap) else f"{s.gap:.4f}"
                cells.append(f"{format_stat(s)} | {gap}")
                if head != baseline and baseline in results:
                    a = advantage(runs, results[baseline], t.name, k)
                    if a.defined:
                        row.update(
                            {f"{t.name}/{k}_adv_mean": a.mean, f"{t.name}/{k}_adv_std": a.std}
                        )
                    adv_cells.append(f"{a.mean:+.4f} ± {a.std:.4f}" if a.defined else "n/a")
            rows.append(row)
            md.append(f"| {rho:g} | {head} | " + " | ".join(cells) + " |")
            if adv_cells:
                adv_md.append(f"| {rho:g} | {head} | " + " | ".join(adv_cells) + " |")
    return rows, "\n".join(md + adv_md) + "\n"


def plot_sweep(
    path: Path, rows: list[dict[str, Any]], tasks: list[TaskSpec], baseline: str
) -> None:
    """Per task: each head's advantage over the baseline against the task correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        col = next((c for c in rows[0] if c.startswith(f"{t.name}/") and c.endswith("_mean")), "")
        k = col[len(t.name) + 1 : -len("_mean")]
        for head in dict.fromkeys(r["head"] for r in rows):
            pts = [r for r in rows if r["head"] == head and f"{t.name}/{k}_adv_mean" in r]
            if pts:
                ax.errorbar(
                    [r["correlation"] for r in pts],
                    [r[f"{t.name}/{k}_adv_mean"] for r in pts],
                    yerr=[r[f"{t.name}/{k}_adv_std"] for r in pts],
                    marker="o",
                    capsize=4,
                    label=head,
                )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("task correlation")
        ax.set_title(f"{t.name}: {k} advantage over {baseline}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
