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
import sys
from pathlib import Path

from mtl_dist.config import BALANCERS, ConfigError, load_config
from mtl_dist.data.source import check_filters
from mtl_dist.tools.compare_plan import (
    HEADS,
    SWEEP_HEADS,
    CompareError,
    Run,
    default_heads,
    has_esmm_tasks,
    head_args,
    plan_runs,
    with_balancers,
)
from mtl_dist.tools.compare_report import (
    plot_summary,
    report,
    report_relations,
    summary_markdown,
    write_csv,
)
from mtl_dist.tools.compare_run import execute, execute_all
from mtl_dist.tools.compare_summary import (
    HIGHER_IS_BETTER,
    NOT_COMPARED,
    Stat,
    Summary,
    advantage,
    summarize,
    summary_rows,
    task_main_metric,
)
from mtl_dist.tools.compare_sweep import plot_sweep, sweep_tables

__all__ = [
    "HEADS",
    "HIGHER_IS_BETTER",
    "NOT_COMPARED",
    "SWEEP_HEADS",
    "CompareError",
    "Run",
    "Stat",
    "Summary",
    "advantage",
    "compare",
    "default_heads",
    "execute",
    "execute_all",
    "has_esmm_tasks",
    "head_args",
    "main",
    "parse_args",
    "plan_runs",
    "plot_summary",
    "plot_sweep",
    "report",
    "report_relations",
    "summarize",
    "summary_markdown",
    "summary_rows",
    "sweep",
    "sweep_tables",
    "task_main_metric",
    "with_balancers",
    "write_csv",
]


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
