"""Multi-epoch training against one epoch: ``train.multi_epoch`` on the peers' workloads.

``python -m mtl_dist.tools.bench.multi_epoch [--workload peers | interactions] [--rows 400000]
[--epochs 3] [--seeds 0,1,2]``

For each training seed (the data fixed, generated with seed 0): one run per
``--variants`` entry (``none``, ``meda``), each ``--epochs`` epochs at the peers' model size
(``configs/peers.toml``: 16-dim tables, MMoE 4 × (256, 128), towers (64,)), ``--procs``
processes × ``--batch`` rows, validating at each epoch's end. The rows of the table:

* ``1 epoch``: the first validation of the ``none`` runs (the schedules are constant, so the
  first epoch of a longer run is a one-epoch run);
* ``none × E`` / ``meda × E``: the last epoch's validation of each run; ``none × E, best
  epoch``: the best epoch by click AUC (what ``train.best_metric`` keeps);
* ``admit`` / ``admit+meda``: the same with ``admit_min_count = --admit`` on the three
  large-vocabulary features (``admit, 1 epoch``: its first validation);
* ``l2`` / ``l2freq``: ``model.embedding.l2 = --l2``, flat or with ``l2_frequency``.

Prints AUC mean ± std per task over the seeds and the mean samples/s of each row, with the
CPU; writes ``multi_epoch.json`` (every run's history) and ``multi_epoch.md``. A difference is
a lead only where it exceeds both rows' stds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mtl_dist.tools.bench.e2e_runs import CONFIG, TASKS, dataset
from mtl_dist.tools.bench.training import cpu_line, run_training

VARIANTS = {"none": [], "meda": ["--train.multi_epoch", "meda"], "admit": [],
            "admit+meda": ["--train.multi_epoch", "meda"], "l2": [], "l2freq": []}  # fmt: skip
ADMITTED = ("user_id", "item_id", "author_id")  # the 200k / 100k / 50k-id features


def admission_config(out: Path, n: int) -> str:
    """``configs/peers.toml`` with ``admit_min_count = n`` on :data:`ADMITTED`; its path."""
    text = Path(CONFIG).read_text()
    for name in ADMITTED:
        head = f'name = "{name}"\n'
        if head not in text:
            raise ValueError(f"{CONFIG}: no feature {name!r} to admit")
        text = text.replace(head, head + f"admit_min_count = {n}\n")
    path = out / f"peers_admit{n}.toml"
    path.write_text(text)
    return str(path)


def train_variant(args: argparse.Namespace, data: str, variant: str, seed: int) -> dict:
    """One run: its per-epoch validation AUCs ``[[click, purchase], …]`` and samples/s."""
    overrides = [
        "--data.train_path", f"{data}/train", "--data.val_path", f"{data}/val",
        "--train.batch_size", str(args.batch), "--train.seed", str(seed),
        "--train.epochs", str(args.epochs), "--checkpoint.at_end", "false",
        "--train.precision", "fp32", *VARIANTS[variant],
    ]  # fmt: skip
    if variant in ("l2", "l2freq"):  # measured alone: the same λ, flat or by frequency
        overrides += ["--model.embedding.l2", str(args.l2)]
        overrides += ["--model.embedding.l2_frequency", "true"] if variant == "l2freq" else []
    config = admission_config(Path(args.out), args.admit) if "admit" in variant else CONFIG
    m = run_training(config, overrides, args.procs, 1, timeout=args.timeout)
    aucs = [[h["metrics"][t]["auc"] for t in TASKS] for h in m["history"]]
    return {"variant": variant, "seed": seed, "auc": aucs, "samples_per_s": m["samples_per_s"]}


def rows_of(runs: list[dict], epochs: int) -> dict[str, list[tuple[list[float], float]]]:
    """Table rows → per seed ``([auc per task], samples/s)``."""
    out: dict[str, list[tuple[list[float], float]]] = {}
    for r in runs:
        if r["variant"] in ("admit", "l2", "l2freq"):
            row = f"{r['variant']}, 1 epoch"
            out.setdefault(row, []).append((r["auc"][0], r["samples_per_s"]))
        if r["variant"] == "none":
            out.setdefault("1 epoch", []).append((r["auc"][0], r["samples_per_s"]))
            best = max(r["auc"], key=lambda a: a[0])
            out.setdefault(f"none x {epochs}, best epoch", []).append((best, r["samples_per_s"]))
        out.setdefault(f"{r['variant']} x {epochs}", []).append((r["auc"][-1], r["samples_per_s"]))
    return out


def render(runs: list[dict], args: argparse.Namespace, oracle: dict) -> str:
    def cell(xs: list[float]) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.4f} ± {sd:.4f}"

    lines = [
        f"{cpu_line()}; {args.workload} workload, {args.rows} training rows, {args.procs} ranks x "
        f"{args.batch}, seeds {args.seeds}",
        "",
        "| row | " + " | ".join(f"{t} AUC" for t in TASKS) + " | samples/s |",
        "|---|" + "---|" * (len(TASKS) + 1),
    ]
    for name, per_seed in rows_of(runs, args.epochs).items():
        aucs = [cell([a[i] for a, _ in per_seed]) for i in range(len(TASKS))]
        speed = statistics.mean(s for _, s in per_seed)
        lines.append(f"| {name} | " + " | ".join(aucs) + f" | {speed:,.0f} |")
    lines.append("| oracle | " + " | ".join(f"{oracle.get(t, float('nan')):.4f}" for t in TASKS)
                 + " | |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000, help="training rows")
    p.add_argument("--val-rows", type=int, default=50_000, help="validation rows")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--variants", default="none,meda", help=f"of {', '.join(VARIANTS)}")
    p.add_argument(
        "--workload",
        default="peers",
        choices=("peers", "interactions"),
        help="mtl-datagen workload (the peers' columns and tasks)",
    )
    p.add_argument(
        "--admit",
        type=int,
        default=2,
        help=f"admit variants: admit_min_count on {', '.join(ADMITTED)}",
    )
    p.add_argument("--l2", type=float, default=1e-3, help="l2 / l2freq: model.embedding.l2")
    p.add_argument("--procs", type=int, default=2, help="torchrun processes (1 thread each)")
    p.add_argument("--batch", type=int, default=1024, help="per-rank batch")
    p.add_argument("--data-root", default="data/bench")
    p.add_argument("--out", default="runs/bench_multi_epoch")
    p.add_argument("--timeout", type=int, default=3600)
    args = p.parse_args(argv)
    data, meta = dataset(args.data_root, args.rows, args.val_rows, 0, args.workload)
    oracle = {t: meta["splits"]["val"]["oracle"][f"{t}_auc"] for t in TASKS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            runs.append(train_variant(args, data, variant, seed))
            (out / "multi_epoch.json").write_text(json.dumps(runs, indent=1))
            print(runs[-1], flush=True)
    table = render(runs, args, oracle)
    (out / "multi_epoch.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
