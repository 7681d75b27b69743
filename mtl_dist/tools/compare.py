"""Compare multi-task heads on the same data over seeds: ``python -m mtl_dist.tools.compare``.

One command (also ``mtl-compare``):

1. reports the task relations of the training labels (:mod:`mtl_dist.tools.relations`) before any
   training, written as ``OUT/task_relations.{csv,md}`` (``--relations-only`` stops here);
2. trains every head of ``--heads`` (``shared_bottom,omoe,mmoe,ple,stem``, and each ``+esmm``
   when the config has the ESMM tasks; with ``--balancers fixed,famo`` each head once per loss
   balancer, labelled ``mmoe+famo``) with every seed of ``--seeds``, each run a ``torchrun``
   subprocess of :mod:`mtl_dist.train` writing into ``OUT/<head>/seed<k>/`` (its ``metrics.json``,
   TensorBoard events under ``tb/`` and its whole output in ``train.log``), so
   ``tensorboard --logdir OUT`` shows every run;
3. prints and writes ``OUT/compare.{csv,md,png}``: per task and metric, the mean ± std over
   seeds (sample std, ddof = 1), the oracle and the gap to it — the mean over seeds of
   |oracle − model| (absolute, so it reads the same for AUC and for losses) — one row per head.

``--correlations 0.9,0.5,0.0`` turns it into the MMoE paper's experiment: synthetic data
(:func:`mtl_dist.data.synth.generate`) per task correlation, the heads (default shared_bottom,
mmoe) trained on each, and ``OUT/sweep.{csv,md,png}``: correlation × head → main metric, and
each head's advantage over ``--baseline`` per task (positive = better than the baseline).

A run whose ``metrics.json`` already holds the same config is reused, not retrained (``--force``
retrains), so an interrupted comparison resumes where it stopped.

Example::

    python -m mtl_dist.tools.compare --config configs/default.toml --out runs/compare \\
        --heads mmoe,ple,mmoe+esmm --seeds 0,1,2 --set train.max_steps=300
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_dist.config import BALANCERS, ConfigError, JobConfig, TaskSpec, load_config, to_dict
from mtl_dist.data.source import check_filters
from mtl_dist.observe.metrics import label_unit
from mtl_dist.tools.relations import RELATION_COLUMNS, format_markdown, task_relations

HEADS = ["shared_bottom", "omoe", "mmoe", "ple", "stem"]
SWEEP_HEADS = ["shared_bottom", "mmoe"]
# metric keys that describe the data, not the model: left out of the comparison
NOT_COMPARED = {"count", "label_mean", "pred_mean"}
HIGHER_IS_BETTER = {"auc", "gauc"}


class CompareError(RuntimeError):
    """A comparison cannot go on; the message names the run (and its log) at fault."""


# --------------------------------------------------------------------------- runs


def head_args(label: str) -> list[str]:
    """Training overrides of a head label: ``mmoe``, ``mmoe+esmm``, ``mmoe+famo`` (a loss
    balancer of ``loss.balancer``) or both, ``mmoe+esmm+famo``."""
    base, *mods = label.split("+")
    unknown = [m for m in mods if m != "esmm" and m not in BALANCERS]
    if unknown:
        raise CompareError(
            f"--heads: {label!r}: unknown modifier {unknown[0]!r} (known: esmm, "
            f"{', '.join(BALANCERS)})"
        )
    args = ["--model.head", base, "--model.esmm", "true" if "esmm" in mods else "false"]
    return args + [a for m in mods if m in BALANCERS for a in ("--loss.balancer", m)]


def with_balancers(heads: list[str], balancers: list[str]) -> list[str]:
    """Every head label once per balancer (``mmoe+famo``); the labels alone without any."""
    return [f"{h}+{b}" for h in heads for b in balancers] if balancers else heads


def has_esmm_tasks(cfg: JobConfig) -> bool:
    kinds = {t.name: t.kind for t in cfg.tasks}
    return all(kinds.get(n) == "binary" for n in (cfg.model.esmm_ctr_task, cfg.model.esmm_cvr_task))


def default_heads(cfg: JobConfig) -> list[str]:
    return HEADS + ([f"{h}+esmm" for h in HEADS] if has_esmm_tasks(cfg) else [])


@dataclass(frozen=True)
class Run:
    """One training run: a head with a seed, its arguments and the config they resolve to."""

    head: str
    seed: int
    dir: Path
    argv: list[str]  # mtl_dist.train arguments
    config: dict[str, Any]  # to_dict of the resolved config, as metrics.json stores it

    @property
    def name(self) -> str:
        return f"{self.head}/seed{self.seed}"


def plan_runs(
    config: str, overrides: list[str], heads: list[str], seeds: list[int], out: Path
) -> list[Run]:
    """Every (head, seed) run, each config loaded and validated now: a bad head or override
    stops the command before any training, naming the run."""
    runs = []
    for head in heads:
        for seed in seeds:
            run_dir = out / head / f"seed{seed}"
            argv = [
                "--config", config, *overrides, *head_args(head), "--train.seed", str(seed),
                "--train.output_dir", str(run_dir), "--train.progress_bar", "false",
            ]  # fmt: skip
            try:
                cfg = check_filters(load_config(argv))
            except ConfigError as e:
                raise CompareError(f"run {head}/seed{seed}: {e}") from None
            # through JSON, as metrics.json holds it (tuples become lists)
            resolved = json.loads(json.dumps(to_dict(cfg)))
            runs.append(Run(head, seed, run_dir, argv, resolved))
    return runs


def _error_line(log: str) -> str:
    """The last ``SomeError: message`` line of a run's output (torchrun's own excluded)."""
    found = re.findall(r"\b(\w*(?:Error|Exception): .+)", log)
    found = [f for f in found if not f.startswith("ChildFailedError")]
    return found[-1].strip() if found else "(no exception message in the log)"


def execute(run: Run, nproc: int, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Train ``run`` under ``torchrun --nproc_per_node nproc``, its output in
    ``<run dir>/train.log``; returns its ``metrics.json`` and whether a finished run with the
    same config was reused instead (unless ``force``)."""
    metrics_path = run.dir / "metrics.json"
    if not force and metrics_path.exists():
        try:
            old = json.loads(metrics_path.read_text())
        except ValueError:
            old = {}
        if old.get("config") == run.config:
            return old, True
    metrics_path.unlink(missing_ok=True)
    shutil.rmtree(run.dir / "tb", ignore_errors=True)  # no stale events beside the new ones
    run.dir.mkdir(parents=True, exist_ok=True)
    log = run.dir / "train.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "mtl_dist.train", *run.argv,
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not metrics_path.exists():
        raise CompareError(
            f"run {run.name} failed (exit code {proc.returncode}): "
            f"{_error_line(log.read_text(errors='replace'))}\n  full log: {log}"
        )
    return json.loads(metrics_path.read_text()), False


def execute_all(runs: list[Run], nproc: int, force: bool = False) -> dict[str, list[dict]]:
    """Run (or reuse) every run in order; ``{head: [metrics.json per seed]}``."""
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for i, run in enumerate(runs, 1):
        t = time.perf_counter()
        result, reused = execute(run, nproc, force)
        how = "reused" if reused else f"trained in {time.perf_counter() - t:.0f}s"
        kinds = {t["name"]: t["kind"] for t in result["config"]["tasks"]}
        main = "  ".join(
            f"{task} {k} " + (f"{m[k]:.4f}" if _number(m.get(k)) else "n/a")
            for task, m in result["metrics"].items()
            for k in ["auc" if kinds.get(task) == "binary" else "mse"]
        )
        print(f"[{i}/{len(runs)}] {run.name}: {how}, {result['steps']} steps; {main}", flush=True)
        results.setdefault(run.head, []).append(result)
    print(f"[compare] {len(runs)} runs in {time.perf_counter() - t_all:.0f}s", flush=True)
    return results


# --------------------------------------------------------------------------- summary


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


def _number(x: Any) -> bool:
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
            keys = [k for m in per_seed for k, v in m.items() if _number(v)]
            keys += [k for w in why for k in w]
            keys = [k for k in dict.fromkeys(keys) if k not in NOT_COMPARED]
            stats = {}
            for k in [k for k in keys if not k.startswith("oracle_")]:
                values = [float(m[k]) for m in per_seed if _number(m.get(k))]
                oracles = [
                    float(m[f"oracle_{k}"]) for m in per_seed if _number(m.get(f"oracle_{k}"))
                ]
                gaps = [
                    abs(float(m[f"oracle_{k}"]) - float(m[k]))
                    for m in per_seed
                    if _number(m.get(k)) and _number(m.get(f"oracle_{k}"))
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


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rows as CSV; columns: ``columns`` or the union of the rows' keys, first-seen order."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _pm(s: Stat) -> str:
    """``mean ± std``, ``(k of n seeds)`` when some seeds leave it undefined, ``n/a`` when all do."""
    if not s.defined:
        return "n/a"
    return f"{s.mean:.4f} ± {s.std:.4f}" + (
        f" ({len(s.values)} of {s.seeds} seeds)" if s.partial else ""
    )


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
                cells.append(_pm(s) if s else "")
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


# --------------------------------------------------------------------------- relations


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


# --------------------------------------------------------------------------- sweep


def advantage(head: list[dict], base: list[dict], task: str, k: str) -> Stat:
    """``head`` − ``base`` on metric ``k``, oriented so positive = ``head`` is better, paired by
    seed (same seed: same data order)."""
    sign = 1.0 if k in HIGHER_IS_BETTER else -1.0
    pairs = [(h["metrics"][task].get(k), b["metrics"][task].get(k)) for h, b in zip(head, base)]
    diffs = [sign * (x - y) for x, y in pairs if _number(x) and _number(y)]
    return Stat(diffs, math.nan, math.nan, len(pairs))


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
                cells.append(f"{_pm(s)} | {gap}")
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


# --------------------------------------------------------------------------- command line


def _csv(text: str, tp: type) -> list:
    return [tp(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="mtl-compare",
        description=__doc__.split("\n\n")[0],
        epilog="Other --section.key VALUE arguments are passed to every training run.",
    )
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--out", required=True, help="output directory (one run dir per head/seed)")
    p.add_argument(
        "--heads", default="", help="comma-separated head labels, e.g. mmoe,ple,mmoe+esmm"
    )
    p.add_argument(
        "--balancers",
        default="",
        help=f"comma-separated loss balancers, each head trained with each ({', '.join(BALANCERS)})",
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training override, e.g. train.max_steps=300 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    p.add_argument("--relations-only", action="store_true", help="report task relations, stop")
    p.add_argument("--bins", type=int, default=10, help="quantile bins of a regression label (MI)")
    p.add_argument("--relation-rows", type=int, default=0, help="read at most N rows (0: all)")
    g = p.add_argument_group("correlation sweep (the MMoE paper's synthetic experiment)")
    g.add_argument("--correlations", default="", help="e.g. 0.9,0.5,0.0: sweep mode")
    g.add_argument("--rows", type=int, default=200_000, help="training rows per dataset")
    g.add_argument("--val-rows", type=int, default=50_000, help="validation rows per dataset")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    g.add_argument("--data-dir", default="", help="generated data (default: OUT/data)")
    g.add_argument("--baseline", default="shared_bottom", help="head the advantage is taken over")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=300")
        overrides += [f"--{key.removeprefix('--')}", value]
    return args, overrides + rest


def compare(args: argparse.Namespace, overrides: list[str]) -> None:
    """Relations, then every head × seed, then the table (one dataset)."""
    out = Path(args.out)
    try:
        cfg = check_filters(load_config(["--config", args.config, *overrides]))
    except ConfigError as e:
        raise CompareError(str(e)) from None
    print(report_relations(cfg, out, args.bins, args.relation_rows), flush=True)
    if args.relations_only:
        return
    heads = with_balancers(_csv(args.heads, str) or default_heads(cfg), _csv(args.balancers, str))
    seeds = _csv(args.seeds, int)
    runs = plan_runs(args.config, overrides, heads, seeds, out)
    print(f"[compare] {len(heads)} heads x {len(seeds)} seeds -> {out}", flush=True)
    results = execute_all(runs, args.nproc, args.force)
    md = report(out, summarize(results, cfg.tasks), results, cfg.tasks, len(seeds))
    print(f"\n{md}\nwritten: {out}/compare.{{csv,md,png}}; tensorboard --logdir {out}")


def sweep(args: argparse.Namespace, overrides: list[str]) -> None:
    """Per task correlation: generate data, relations; then train the heads on each."""
    from mtl_dist.data.synth import generate

    out = Path(args.out)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    rhos = _csv(args.correlations, float)
    heads = with_balancers(_csv(args.heads, str) or SWEEP_HEADS, _csv(args.balancers, str))
    seeds = _csv(args.seeds, int)
    plans: dict[float, list[Run]] = {}
    cfg = None
    for rho in rhos:
        data = data_dir / f"rho{rho:g}"
        generate(data, args.rows, args.val_rows, seed=args.data_seed, task_correlation=rho)
        paths = ["--data.train_path", str(data / "train"), "--data.val_path", str(data / "val")]
        try:
            cfg = check_filters(load_config(["--config", args.config, *overrides, *paths]))
        except ConfigError as e:
            raise CompareError(str(e)) from None
        print(f"\n== task correlation {rho:g} ==")
        print(report_relations(cfg, out / f"rho{rho:g}", args.bins, args.relation_rows), flush=True)
        if not args.relations_only:
            plans[rho] = plan_runs(
                args.config, overrides + paths, heads, seeds, out / f"rho{rho:g}"
            )
    if args.relations_only or cfg is None:
        return
    per_rho = {}
    for rho, runs in plans.items():
        print(f"\n== training, task correlation {rho:g} ==", flush=True)
        per_rho[rho] = results = execute_all(runs, args.nproc, args.force)
        report(out / f"rho{rho:g}", summarize(results, cfg.tasks), results, cfg.tasks, len(seeds))
    rows, md = sweep_tables(per_rho, cfg.tasks, args.baseline)
    write_csv(out / "sweep.csv", rows)
    (out / "sweep.md").write_text(md)
    plot_sweep(out / "sweep.png", rows, cfg.tasks, args.baseline)
    print(f"\n{md}\nwritten: {out}/sweep.{{csv,md,png}} (per correlation: {out}/rho*/compare.*)")


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        (sweep if args.correlations else compare)(args, overrides)
    except (CompareError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"mtl-compare: {e}") from None


if __name__ == "__main__":
    main()
