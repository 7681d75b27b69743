"""End to end against the peers: ours vs torch-rechub's and DeepCTR-Torch's MMoE, one invocation.

``python -m mtl_dist.tools.bench.e2e`` (defaults: 400k train / 100k test rows, batch 2048):

1. generates (or reuses) the peers' workload with ``mtl-datagen --workload peers``: 16
   single-hot Zipf sparse features (vocabularies 3 to 200k), 8 dense, click and purchase on
   every row, with their true probabilities;
2. trains ours for one epoch with the peers' model size (``configs/peers.toml``: 16-dim
   embeddings, MMoE of 4 experts (256, 128), towers (64,), batch 2048 per process) under
   torchrun at each ``--ours`` layout, e.g. ``1x2`` = 1 process × 2 threads;
3. trains each installed peer (``pip install -e .[bench]``) through its own training API on the
   same rows, sizes and batch (``mtl_dist.tools.bench.peers``);
4. profiles a few of our steps per layout (data / embedding / dense / collectives / optimizer);
5. with ``--memory-rows N``: ours again on an N-row dataset, to show per-process memory does
   not grow with the data;
6. with ``--sequences 20,50,200``: ours on the user-behaviour ``sequences`` workload
   (``configs/sequences.toml``, DIN over the last ``max_len`` items; ``--rows`` / ``--test-rows``
   regenerated at each ``max_len``) at ``--sequence-layout`` (1 × 2), each ``max_len`` against
   the same model without its sequence on the same rows (docs/sequences.md).

Prints one table — samples/s, its ratio to the best peer, peak RSS per process, test AUC per
task next to the oracle's — then the sequence rows, and writes it all as ``e2e.md`` and
``e2e.json`` under ``--out``.
Speed figures come from this run only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mtl_dist.models.precision import resolve_precision
from mtl_dist.tools.bench.e2e_report import (
    check_finite,
    gap,
    markdown,
    num,
    steady,
    with_ratios,
)
from mtl_dist.tools.bench.e2e_roofline import hardware_baseline, model_flops_per_sample
from mtl_dist.tools.bench.e2e_runs import (
    CONFIG,
    LEVERS,
    TASKS,
    Ours,
    best_of_rounds,
    dataset,
    layout,
    profile_ours,
    run_ours,
    run_peers,
    sequence_rows,
    train_ours,
)
from mtl_dist.tools.bench.training import cpu_line

__all__ = [
    "CONFIG",
    "LEVERS",
    "Ours",
    "TASKS",
    "best_of_rounds",
    "check_finite",
    "dataset",
    "gap",
    "hardware_baseline",
    "layout",
    "main",
    "markdown",
    "measure",
    "model_flops_per_sample",
    "num",
    "parse_args",
    "profile_ours",
    "run_ours",
    "run_peers",
    "sequence_rows",
    "steady",
    "train_ours",
    "with_ratios",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=400_000, help="training rows")
    p.add_argument("--test-rows", type=int, default=100_000, help="test rows")
    p.add_argument("--data-root", default="data", help="datasets are written (or reused) here")
    p.add_argument("--batch", type=int, default=2048, help="batch size (per process for ours)")
    p.add_argument("--threads", type=int, default=2, help="threads of the peers' process")
    p.add_argument(
        "--ours", default="1x2,1x1,2x1", help="our layouts, PROCSxTHREADS, comma-separated"
    )
    p.add_argument(
        "--peers", default="auto", help="auto (the installed ones) | none | a comma-separated list"
    )
    p.add_argument(
        "--profile-steps", type=int, default=20, help="profiled steps per layout (0: none)"
    )
    p.add_argument("--profile-layouts", default="1x2,2x1", help="layouts to profile (of --ours)")
    p.add_argument(
        "--memory-rows", type=int, default=0, help="also run ours on this many rows (0: skip)"
    )
    p.add_argument(
        "--levers", action="store_true", help="also time ours with each lever toggled alone"
    )
    p.add_argument(
        "--hw-seconds", type=float, default=3.0, help="seconds per matmul-rate measurement"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds of every system; the fastest is kept"
    )
    p.add_argument(
        "--precisions",
        default="",
        help="ours at these precisions too, at the first --ours layout (default: fp32, and bf16 "
        "where this machine computes it natively)",
    )
    p.add_argument(
        "--sequences", default="", help="also ours on the sequences workload at these max_len, "
        "comma-separated, e.g. 20,50,200 (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--sequence-poolings", default="din", help="--sequences: poolings, of mean,din,mha"
    )
    p.add_argument("--sequence-layout", default="1x2", help="--sequences: PROCSxTHREADS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    p.add_argument("--out", default="runs/bench_e2e", help="e2e.md and e2e.json go here")
    return p.parse_args(argv)


def set_precisions(args: argparse.Namespace) -> None:
    """``args.precision_list``: ``--precisions``, else fp32 and bf16 where this machine computes
    it natively."""
    if args.precisions:
        args.precision_list = args.precisions.split(",")
    else:
        auto = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu",
                                 torch.cuda.get_device_capability() if torch.cuda.is_available() else None)  # fmt: skip
        args.precision_list = ["fp32", "bf16"] if auto.name == "bf16" else ["fp32"]
        print(f"[e2e] precisions {args.precision_list} ({auto.reason})")


def measure(args: argparse.Namespace, layouts: list[tuple[int, int]]) -> dict[str, object]:
    """Every run of the benchmark (workload, roofline, rounds, profiles, levers, memory): the
    result that ``e2e.json`` holds."""
    data, meta = dataset(args.data_root, args.rows, args.test_rows, args.seed)
    hw = hardware_baseline(args.hw_seconds, tuple(args.precision_list))
    flops = model_flops_per_sample(meta)
    rows = best_of_rounds(data, layouts, args)
    result: dict[str, object] = {
        "cpu": cpu_line(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "train_rows": args.rows,
        "test_rows": args.test_rows,
        "batch": args.batch,
        "oracle_auc": {t: meta["splits"]["val"]["oracle"][f"{t}_auc"] for t in TASKS},
        "table": with_ratios(rows),
        "matmul_gflops": hw,
        "model_mflop_per_sample": flops / 1e6,
        # samples/s if every FLOP of the dense model ran at the measured matmul rate
        "roofline_samples_per_s": {k: v * 1e9 / flops for k, v in hw.items() if k != "scaling_2x1"},
    }
    by_layout = {
        r["layout"]: r for r in rows if r["system"] == "mtl-dist" and r["precision"] == "fp32"
    }
    fastest = max(r["samples_per_s"] for r in rows if r["system"] == "mtl-dist")
    result["ours_vs_peer"] = {
        r["system"]: fastest / r["samples_per_s"] for r in rows if r["system"] != "mtl-dist"
    }
    if "1x1" in by_layout and "2x1" in by_layout:
        one, two = by_layout["1x1"], by_layout["2x1"]
        result["scaling"] = two["samples_per_s"] / one["samples_per_s"]
        result["scaling_steady"] = two["steady_samples_per_s"] / one["steady_samples_per_s"]
    if args.profile_steps:
        wanted = [s for s in args.profile_layouts.split(",") if s in by_layout]
        result["profiles"] = {s: profile_ours(data, *layout(s), args) for s in wanted}
    if args.levers:
        procs, threads = layouts[0]
        result["levers"] = {
            name: run_ours(Ours(data, procs, threads, tuple(extra)), args)["samples_per_s"]
            for name, extra in LEVERS.items()
        }
        result["levers_layout"] = f"{procs}x{threads}"
    if args.memory_rows:
        big, _ = dataset(args.data_root, args.memory_rows, args.test_rows, args.seed)
        procs, threads = layouts[0]
        result["memory"] = [
            {**by_layout[f"{procs}x{threads}"], "rows": args.rows},
            {**run_ours(Ours(big, procs, threads), args), "rows": args.memory_rows},
        ]
    if args.sequences:
        result["sequences"] = sequence_rows(args)
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    layouts = [layout(s) for s in args.ours.split(",") if s]
    set_precisions(args)
    result = measure(args, layouts)
    check_finite(result)
    table = markdown(result)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "e2e.md").write_text(table)
    Path(args.out, "e2e.json").write_text(json.dumps(result, indent=2))
    print(table)
    print(f"written: {args.out}/e2e.md, {args.out}/e2e.json")
    return result


if __name__ == "__main__":
    main()
