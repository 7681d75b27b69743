"""A comparison's results over seeds: per head, task and metric a :class:`Stat` (values, the
oracle, the gap to it), the CSV rows of a summary and the paired advantage of one head over
another."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl_dist.config import TaskSpec

# metric keys that describe the data, not the model: left out of the comparison
NOT_COMPARED = {"count", "label_mean", "pred_mean"}
HIGHER_IS_BETTER = {"auc", "gauc"}


@dataclass
class Stat:
    """One metric of one head and task over seeds.

    Only the seeds where the metric is defined count (a one-class validation set has no AUC:
    it is left out, never averaged in as a number); ``seeds`` is how many runs there were.
    """

    values: list[float]  # per seed where the metric is defined
    oracle: float  # mean over those seeds of the oracle's value (NaN without truth)
    gap: float  # mean over seeds with both of |oracle - model| (NaN without)
    seeds: int = 0  # runs in all (0: as many as values)
    reasons: tuple[str, ...] = ()  # why the metric is undefined in the other runs

    @property
    def defined(self) -> bool:
        return bool(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample std over seeds (ddof = 1); 0 for a single seed."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def partial(self) -> bool:
        return 0 < len(self.values) < self.seeds


Summary = dict[str, dict[str, dict[str, Stat]]]  # head -> task -> metric -> Stat


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def task_main_metric(task: TaskSpec) -> str:
    """The metric a task is judged by in tables and charts: AUC (binary), MSE (regression)."""
    return "auc" if task.kind == "binary" else "mse"


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def summarize(results: dict[str, list[dict]], tasks: list[TaskSpec]) -> Summary:
    """Per head, task and metric: values over seeds, oracle, gap (see :class:`Stat`).

    Metric keys are read generically: every numeric key of a task's metrics in any seed except
    the data's own (count, label/pred mean) and the ``oracle_*`` keys, which pair with their
    metric. A seed where a metric is undefined (absent, its reason under metrics.json's
    ``undefined_metrics``) adds no value; its reason is kept.
    """
    summary: Summary = {}
    for head, runs in results.items():
        summary[head] = {}
        for t in tasks:
            per_seed = [r["metrics"].get(t.name, {}) for r in runs]
            why = [r.get("undefined_metrics", {}).get(t.name, {}) for r in runs]
            keys = [k for m in per_seed for k, v in m.items() if is_number(v)]
            keys += [k for w in why for k in w]
            keys = [k for k in dict.fromkeys(keys) if k not in NOT_COMPARED]
            stats = {}
            for k in [k for k in keys if not k.startswith("oracle_")]:
                values = [float(m[k]) for m in per_seed if is_number(m.get(k))]
                oracles = [
                    float(m[f"oracle_{k}"]) for m in per_seed if is_number(m.get(f"oracle_{k}"))
                ]
                gaps = [
                    abs(float(m[f"oracle_{k}"]) - float(m[k]))
                    for m in per_seed
                    if is_number(m.get(k)) and is_number(m.get(f"oracle_{k}"))
                ]
                reasons = tuple(dict.fromkeys(w[k] for w in why if k in w))
                stats[k] = Stat(values, _mean(oracles), _mean(gaps), len(runs), reasons)
            summary[head][t.name] = stats
    return summary


def summary_rows(summary: Summary, results: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One flat row per head (the CSV): ``<task>/<metric>_{mean,std,oracle,gap,seeds}``
    columns; an undefined metric's cells stay empty."""
    rows = []
    for head, tasks in summary.items():
        runs = results[head]
        row: dict[str, Any] = {"head": head, "seeds": len(runs)}
        for task, stats in tasks.items():
            for k, s in stats.items():
                if not s.defined:
                    continue
                row.update({f"{task}/{k}_mean": s.mean, f"{task}/{k}_std": s.std})
                row[f"{task}/{k}_seeds"] = len(s.values)
                if not math.isnan(s.oracle):
                    row.update({f"{task}/{k}_oracle": s.oracle, f"{task}/{k}_gap": s.gap})
        row["samples_per_s"] = float(np.mean([r["samples_per_s"] for r in runs]))
        row["train_s"] = float(np.mean([r["train_s"] for r in runs]))
        rows.append(row)
    return rows


def format_stat(s: Stat) -> str:
    """``mean ± std``, ``(k of n seeds)`` when some seeds leave it undefined, ``n/a`` when all do."""
    if not s.defined:
        return "n/a"
    return f"{s.mean:.4f} ± {s.std:.4f}" + (
        f" ({len(s.values)} of {s.seeds} seeds)" if s.partial else ""
    )


def advantage(head: list[dict], base: list[dict], task: str, k: str) -> Stat:
    """``head`` − ``base`` on metric ``k``, oriented so positive = ``head`` is better, paired by
    seed (same seed: same data order)."""
    sign = 1.0 if k in HIGHER_IS_BETTER else -1.0
    pairs = [(h["metrics"][task].get(k), b["metrics"][task].get(k)) for h, b in zip(head, base)]
    diffs = [sign * (x - y) for x, y in pairs if is_number(x) and is_number(y)]
    return Stat(diffs, math.nan, math.nan, len(pairs))
