"""Benchmark: the reader alone against a plain pyarrow read, and the training loop end to end.

``python -m mtl_dist.tools.bench.training --config configs/default.toml`` (or ``mtl-bench``) prints, from one
run on one machine:

* reader rows/s (Parquet → KJT + dense + labels batches) beside pyarrow's own read + decode of
  the same files and columns (the baseline);
* training samples/s under ``torchrun`` for each ``--nproc`` (validation time excluded);
* the ratio reader rows/s ÷ the rows/s one rank consumes while training — the reader keeps up
  when this is well above 1 (target ≥ 5);
* with ``--monitor-cost``: training samples/s with gate health every step (plus step timing)
  against monitoring off (target: within 5%), and with the non-finite guard against
  ``train.on_nonfinite = off`` (target: within the noise), alternated over ``--repeats``
  rounds.

Figures are printed and written as JSON; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.dataset as ds
import torch

from mtl_dist.config import load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader, list_parquet_files
from mtl_dist.files import read_json


def bench_reader(config: str, overrides: list[str], repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` rows/s of our reader and of a plain pyarrow.dataset scan."""
    cfg = load_config(["--config", config, *overrides])
    files = list_parquet_files(cfg.data.train_path)
    conv = ArrowBatchConverter(
        cfg.features.sparse, cfg.features.dense, cfg.tasks, dense_nan=cfg.data.dense_nan,
        hash_seed=cfg.data.hash_seed,
    )  # fmt: skip
    B = cfg.train.batch_size
    ours, base, rows = 0.0, 0.0, 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(b.batch_size for b in ParquetBatchReader(files, conv, B, drop_last=False))
        ours = max(ours, n / (time.perf_counter() - t))
        t = time.perf_counter()
        scan = ds.dataset(files, format="parquet").to_batches(columns=conv.columns, batch_size=B)
        rows = sum(rb.num_rows for rb in scan)
        base = max(base, rows / (time.perf_counter() - t))
    return {"rows": rows, "reader_rows_per_s": ours, "pyarrow_rows_per_s": base}


def run_training(
    config: str,
    overrides: list[str],
    nproc: int,
    threads: int = 0,
    timeout: float | None = None,
    output_dir: str | None = None,
) -> dict:
    """Run the real entry point under torchrun (``threads`` per process, default cores / nproc)
    in a scratch run dir (or ``output_dir``, kept: its checkpoints); returns its metrics.json."""
    with contextlib.ExitStack() as stack:
        out = output_dir or stack.enter_context(tempfile.TemporaryDirectory())
        threads = threads or max(1, (os.cpu_count() or 1) // nproc)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mtl_dist.train", "--config", config, "--train.threads", str(threads), *overrides,
            "--train.output_dir", out, "--train.progress_bar", "false",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"training run failed ({nproc} procs x {threads} threads):\n{proc.stderr[-3000:]}"
            )
        return read_json(os.path.join(out, "metrics.json"), "run's metrics", "mtl_dist.train")


def bench_training(
    config: str, overrides: list[str], nproc: int, max_steps: int
) -> dict[str, float]:
    """Training samples/s of ``max_steps`` steps at ``nproc`` processes."""
    result = run_training(config, [*overrides, "--train.max_steps", str(max_steps)], nproc)
    return {
        "nproc": nproc,
        "samples_per_s": result["samples_per_s"],
        "steady_samples_per_s": result["steady_samples_per_s"],
        "steps": result["steps"],
    }


def monitor_cost(args: argparse.Namespace, overrides: list[str]) -> None:
    """Samples/s with gate health every step vs monitoring off, and with the non-finite guard
    vs without it; the three set-ups alternated, best of each."""
    nproc = int(args.nproc.split(",")[-1])
    quiet = ["--monitor.gate_every", "0", "--monitor.step_timing", "false"]
    setups = {
        "monitoring off": [*quiet, "--train.on_nonfinite", "stop"],
        "gate health every step": [
            "--monitor.gate_every",
            "1",
            "--monitor.step_timing",
            "true",
            "--train.on_nonfinite",
            "stop",
        ],  # fmt: skip
        "no non-finite guard": [*quiet, "--train.on_nonfinite", "off"],
    }
    common = [*overrides, "--monitor.attribution", "false", "--monitor.heatmap_every", "0"]
    rates: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(args.repeats):  # a round runs every set-up once, back to back
        for name, flags in setups.items():
            r = bench_training(args.config, [*common, *flags], nproc, args.max_steps)
            rates[name].append(r["steady_samples_per_s"] or r["samples_per_s"])
    print(f"{cpu_line()}\ntraining, {nproc} procs, {args.max_steps} steps, samples/s after the "
          f"first 10 steps; {args.repeats} rounds, set-ups alternated")  # fmt: skip
    for k, runs in rates.items():
        print(f"  {k:<24}median {statistics.median(runs):>9,.0f}  (runs: "
              f"{', '.join(f'{x:,.0f}' for x in runs)})")  # fmt: skip

    def cost(slow: str, fast: str) -> str:
        """Median over rounds of 1 - slow / fast (paired: a noisy round slows both)."""
        pairs = [1 - a / b for a, b in zip(rates[slow], rates[fast])]
        return f"{statistics.median(pairs):.1%} (rounds: {', '.join(f'{x:+.1%}' for x in pairs)})"

    print(f"  gate health every step costs {cost('gate health every step', 'monitoring off')}")
    print(f"  the non-finite guard costs {cost('monitoring off', 'no non-finite guard')}")


def cpu_line() -> str:
    """The CPU model and the ISA flags that decide matmul speed, for every printed figure."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"CPU: {model}, {os.cpu_count()} cores, ISA: {' '.join(isa) or 'none of avx2/avx512/amx'}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument(
        "--nproc", default="1,2", help="comma-separated process counts for the training runs"
    )
    p.add_argument("--max-steps", type=int, default=100, help="training steps per run")
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument(
        "--monitor-cost",
        action="store_true",
        help="only: gate monitoring every step vs off, and the non-finite guard vs off",
    )
    p.add_argument("--repeats", type=int, default=3, help="--monitor-cost: pairs of runs")
    args, overrides = p.parse_known_args(argv)
    if args.monitor_cost:
        monitor_cost(args, overrides)
        return

    reader = bench_reader(args.config, overrides)
    runs = [
        bench_training(args.config, overrides, int(n), args.max_steps)
        for n in args.nproc.split(",")
    ]
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"reader (1 process):  {reader['reader_rows_per_s']:>10,.0f} rows/s  (Parquet -> KJT batches)"
    )
    print(
        f"pyarrow baseline:    {reader['pyarrow_rows_per_s']:>10,.0f} rows/s  (read + decode only)"
    )
    print(f"  reader / pyarrow = {reader['reader_rows_per_s'] / reader['pyarrow_rows_per_s']:.2f}")
    for r in runs:
        per_rank = r["samples_per_s"] / r["nproc"]
        r["reader_headroom"] = reader["reader_rows_per_s"] / per_rank
        print(
            f"training, {r['nproc']} proc(s): {r['samples_per_s']:>10,.0f} samples/s "
            f"({per_rank:,.0f} per rank); reader / rank consumption = {r['reader_headroom']:.1f}x (target >= 5x)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reader": reader, "training": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
