"""The end-to-end benchmark's runs: the peers' workload (generated or reused), ours under
torchrun at a layout (timed, or profiled), each installed peer through its own API, and rounds of
them all taking turns."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mtl_dist.data.synth import generate
from mtl_dist.tools.bench import sequences as seq
from mtl_dist.tools.bench.peers import PEERS, peers_installed, run_peer
from mtl_dist.tools.bench.training import run_training

TASKS = ("click", "purchase")
CONFIG = str(Path(__file__).resolve().parents[3] / "configs" / "peers.toml")


def dataset(
    root: str, rows: int, test_rows: int, seed: int, workload: str = "peers"
) -> tuple[str, dict]:
    """``mtl-datagen --workload <workload>`` (default the peers') with ``rows`` training rows
    under ``root`` (reused when present)."""
    path = os.path.join(root, f"{workload}_{rows}_{test_rows}_s{seed}")
    files = max(4, rows // 200_000)  # several files: ranks and workers split them evenly
    meta = generate(
        path, rows, test_rows, files=files, seed=seed, workload=workload, val_files=2, verbose=True
    )
    return path, meta


def layout(spec: str) -> tuple[int, int]:
    """``"2x1"`` → (2 processes, 1 thread each)."""
    try:
        procs, threads = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--ours: {spec!r} is not PROCSxTHREADS (e.g. 1x2)") from None
    return procs, threads


@dataclass(frozen=True)
class Ours:
    """One training of ours: where its data is, its layout (``procs`` processes × ``threads``
    threads each), the overrides on top of the benchmark's, its precision, its config and the
    config's task names (the AUCs of the row).

    Example::

        >>> Ours("data/peers_400000_100000_s0", 2, 1).layout
        '2x1'
    """

    data: str
    procs: int
    threads: int
    extra: tuple[str, ...] = ()
    precision: str = "fp32"
    config: str = CONFIG
    tasks: tuple[str, ...] = TASKS

    @property
    def layout(self) -> str:
        return f"{self.procs}x{self.threads}"


def train_ours(run: Ours, args: argparse.Namespace) -> dict[str, object]:
    """One torchrun training of ``run`` (the benchmark's batch, seed and timeout from ``args``);
    its metrics. Raises ``RuntimeError`` when the training fails (:func:`run_training`)."""
    overrides = [
        "--data.train_path", f"{run.data}/train", "--data.val_path", f"{run.data}/val",
        "--train.batch_size", str(args.batch), "--train.seed", str(args.seed),
        "--checkpoint.at_end", "false", "--train.precision", run.precision, *run.extra,
    ]  # fmt: skip
    return run_training(run.config, overrides, run.procs, run.threads, timeout=args.timeout)


def run_ours(run: Ours, args: argparse.Namespace) -> dict[str, object]:
    """One epoch of ``run``; the row of the table. Raises as :func:`train_ours`."""
    t0 = time.perf_counter()
    m = train_ours(run, args)
    val = m["metrics"]
    return {
        "system": "mtl-dist",
        "precision": run.precision,
        "layout": run.layout,
        "procs": run.procs,
        "threads": run.threads,
        "samples_per_s": m["samples_per_s"],
        "steady_samples_per_s": m["steady_samples_per_s"],  # after 10 warm-up steps
        "train_s": m["train_s"],
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": max(m["peak_memory_mb_by_rank"]),
        # None where undefined (one class among the validated rows): 'undefined', never a number
        "auc": {t: val.get(t, {}).get("auc") for t in run.tasks},
        "oracle_auc": {t: val.get(t, {}).get("oracle_auc") for t in run.tasks},
    }


def profile_ours(
    data: str, procs: int, threads: int, args: argparse.Namespace
) -> dict[str, object]:
    """Rank 0's step profile over ``--profile-steps`` steps after 10 warm-up steps."""
    after = 10
    extra = [
        "--monitor.profile_steps", str(args.profile_steps),
        "--monitor.profile_after", str(after),
        "--train.max_steps", str(after + args.profile_steps),
        "--train.val_max_batches", "1", "--monitor.attribution", "false",
    ]  # fmt: skip
    profile = train_ours(Ours(data, procs, threads, tuple(extra)), args)["profile"]
    if not profile:
        raise RuntimeError(
            f"{procs}x{threads}: an epoch of {args.rows} rows is shorter than the {after} warm-up "
            f"+ {args.profile_steps} profiled steps; lower --profile-steps or add --rows"
        )
    return profile


def run_peers(data: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """Each selected, installed peer once (``--peers``); missing ones are reported, not run."""
    wanted = (
        PEERS if args.peers in ("auto", "all") else tuple(p for p in args.peers.split(",") if p)
    )
    if args.peers == "none":
        return []
    installed = peers_installed()
    rows = []
    for system in wanted:
        if system not in installed:
            raise ValueError(f"--peers: unknown system {system!r} (known: {', '.join(PEERS)})")
        if not installed[system]:
            if args.peers != "auto":
                raise RuntimeError(f"{system} is not installed: pip install -e .[bench]")
            print(f"[e2e] {system} not installed (pip install -e .[bench]): its column is left out")
            continue
        r = run_peer(system, data, args.batch, 1, args.threads, args.seed, timeout=args.timeout)
        rows.append({**r, "layout": f"1x{args.threads}", "procs": 1, "precision": "fp32"})
    return rows


def best_of_rounds(
    data: str, layouts: list[tuple[int, int]], args: argparse.Namespace
) -> list[dict[str, object]]:
    """``--repeats`` rounds of every system, taking turns so a noisy neighbour slows them alike;
    each row is its fastest round (the AUCs are the same every round: same seed)."""
    rounds: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    reduced = [p for p in args.precision_list if p != "fp32"]  # at the first layout
    for _ in range(args.repeats):
        ours = [run_ours(Ours(data, procs, threads), args) for procs, threads in layouts]
        ours += [run_ours(Ours(data, *layouts[0], precision=p), args) for p in reduced]
        for r in ours + run_peers(data, args):
            rounds.setdefault((r["system"], r["layout"], r["precision"]), []).append(r)
    return [
        {**max(rs, key=lambda r: r["samples_per_s"]), "rounds": [r["samples_per_s"] for r in rs]}
        for rs in rounds.values()
    ]


LEVERS = {  # name: overrides of our defaults, each measured alone against the defaults
    "defaults": [],
    "no TrainPipelineSparseDist": ["--sharding.pipeline", "false"],
    "reader in 1 worker process": ["--data.num_workers", "1"],
    "monitoring off": ["--monitor.gate_every", "0", "--monitor.step_timing", "false"],
    "tables data_parallel": ["--sharding.force", "data_parallel"],
    "tables table_wise": ["--sharding.force", "table_wise"],
    "DDP buckets of 1 MiB": ["--sharding.ddp_bucket_cap_mb", "1"],
    "DDP buckets of 4 MiB": ["--sharding.ddp_bucket_cap_mb", "4"],
}


def sequence_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """Ours on the ``sequences`` workload at ``--sequence-layout``, for each ``max_len`` of
    ``--sequences``: the data regenerated with histories of up to ``max_len`` items
    (:func:`mtl_dist.tools.bench.sequences.sequence_data`, ``--rows`` / ``--test-rows``), then
    one epoch of ``configs/sequences.toml`` without its sequence (pooling ``"none"``, the
    baseline) and with it at each of ``--sequence-poolings``, taking turns over ``--repeats``
    rounds; each row is its fastest round, with ``max_len``, ``pooling`` and
    ``speed_vs_no_sequence`` (its samples/s over the baseline's on the same rows). Raises
    ``ValueError`` on a malformed list, ``RuntimeError`` when a training fails."""
    try:
        max_lens = [int(x) for x in args.sequences.split(",") if x]
    except ValueError:
        raise ValueError(
            f"--sequences: {args.sequences!r} is not a list of max_len, e.g. 20,50,200"
        ) from None
    poolings = ["none", *(p for p in args.sequence_poolings.split(",") if p)]
    unknown = [p for p in poolings[1:] if p not in seq.POOLINGS]
    if unknown or not max_lens or min(max_lens) < 1:
        raise ValueError(f"--sequences {args.sequences!r} / --sequence-poolings "
                         f"{args.sequence_poolings!r}: max_len >= 1, poolings of {seq.POOLINGS}")  # fmt: skip
    procs, threads = layout(args.sequence_layout)
    jobs = Path(args.out, "sequence_jobs")
    jobs.mkdir(parents=True, exist_ok=True)
    rows = []
    for max_len in max_lens:
        name = f"sequences_{args.rows}_{args.test_rows}_L{max_len}_s{args.seed}"
        data = seq.sequence_data(Path(args.data_root, name), args.rows, args.test_rows, max_len,
                                 args.seed)  # fmt: skip
        runs = {}
        for p in poolings:
            config = jobs / f"{p}_{max_len}.toml"
            config.write_text(seq.job_toml(p, max_len))
            runs[p] = Ours(str(data), procs, threads, config=str(config), tasks=seq.TASKS)
        rounds: dict[str, list[dict[str, object]]] = {p: [] for p in poolings}
        for _ in range(args.repeats):
            for p in poolings:
                rounds[p].append(run_ours(runs[p], args))
        best = {p: max(rs, key=lambda r: r["samples_per_s"]) for p, rs in rounds.items()}
        for p, rs in rounds.items():
            rows.append({
                **best[p], "workload": "sequences", "max_len": max_len, "pooling": p,
                "rounds": [r["samples_per_s"] for r in rs],
                "speed_vs_no_sequence": best[p]["samples_per_s"] / best["none"]["samples_per_s"],
            })  # fmt: skip
        print(f"[e2e] sequences max_len {max_len}: "
              + ", ".join(f"{p} {best[p]['samples_per_s']:,.0f}" for p in poolings), flush=True)  # fmt: skip
    return rows
