"""Plan the embedding sharding for a cluster you do not have: ``mtl-plan`` / ``python -m mtl_dist.tools.plan``.

Runs TorchRec's ``EmbeddingShardingPlanner`` for a topology given on the command line, with the
config's tables resized to the row counts you state, and prints what the training job would get:
each table's sharding type, compute kernel and ranks, the estimated memory per rank against its
capacity, and TorchRec's estimated step time for the embeddings (the slowest rank's sum of
forward/backward compute and comms estimates, in ms). The tables live on the ``meta`` device:
planning 10^9 rows allocates nothing, and planning for GPUs needs no GPU.

Example::

    python -m mtl_dist.tools.plan --config configs/default.toml --nodes 8 --gpus-per-node 8 \\
        --hbm-gb 80 --rows item_id=1e9 --rows user_id=2e8
    python -m mtl_dist.tools.plan --config configs/default.toml --device cpu --nodes 4 \\
        --procs-per-node 2 --ddr-gb 256 --rows 1e8

Exit status 0 with a plan; 1 with a message naming the tables and the memory shortfall when they
cannot fit; 2 on a bad command line or config.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, replace

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Stats, Storage
from torchrec.distributed.types import ModuleSharder

from mtl_dist.config import ConfigError, JobConfig, load_config
from mtl_dist.data.source import check_filters
from mtl_dist.distributed.sharding import sharders_for, sharding_constraints
from mtl_dist.models.build import build_ranker
from mtl_dist.observe.telemetry import quiet_third_party_logs

GB = 1024**3
RESERVED_FRACTION = 0.15  # TorchRec's default margin (HeuristicalStorageReservation)


@dataclass(frozen=True)
class ClusterSpec:
    """The topology to plan for: ``nodes`` hosts × ``local_world_size`` ranks, per-rank memory."""

    nodes: int
    local_world_size: int
    device: str  # "cuda" | "cpu"
    hbm_bytes: int
    ddr_bytes: int
    intra_host_gbps: float | None = None
    inter_host_gbps: float | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.local_world_size

    def topology(self) -> Topology:
        kwargs = {}
        if self.intra_host_gbps:
            kwargs["intra_host_bw"] = self.intra_host_gbps * GB / 1000  # bytes/ms
        if self.inter_host_gbps:
            kwargs["inter_host_bw"] = self.inter_host_gbps * GB / 1000
        return Topology(
            world_size=self.world_size,
            local_world_size=self.local_world_size,
            compute_device=self.device,
            hbm_cap=self.hbm_bytes if self.device == "cuda" else 0,
            ddr_cap=self.ddr_bytes,
            **kwargs,
        )


class _KeepBestPlan(Stats):
    """A planner ``Stats`` hook that keeps the chosen sharding options (shards with ranks,
    storage and perf estimates) so they can be printed our way."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
            num_plans, run_time, best_plan, *args, **kwargs) -> None:  # fmt: skip
        self.best_plan = list(best_plan)


def parse_count(text: str) -> int:
    """``1e9``, ``2_000_000``, ``5000`` → int."""
    value = float(text.replace("_", ""))
    if value <= 0 or value != int(value):
        raise ValueError(f"not a positive row count: {text!r}")
    return int(value)


def resize_tables(cfg: JobConfig, rows: list[str]) -> JobConfig:
    """Set the row count of the tables named in ``rows`` (``TABLE=N``), or of all (``N``)."""
    tables = {f.table_name for f in cfg.features.sparse}
    sizes: dict[str, int] = {}
    for item in rows:
        if "=" in item:
            name, count = item.split("=", 1)
            if name not in tables:
                raise ConfigError(f"--rows {item}: no table {name!r} (tables: {sorted(tables)})")
            sizes[name] = parse_count(count)
        else:
            sizes.update(dict.fromkeys(tables - set(sizes), parse_count(item)))
    cfg.features.sparse = [
        replace(f, vocab_size=sizes[f.table_name], hash_buckets=0) if f.table_name in sizes else f
        for f in cfg.features.sparse
    ]
    return cfg


def _storage(options: list[ShardingOption], world_size: int) -> list[Storage]:
    per_rank = [Storage(0, 0) for _ in range(world_size)]
    for so in options:
        for shard in so.shards:
            if shard.rank is not None and shard.storage is not None and shard.rank >= 0:
                per_rank[shard.rank] += shard.storage
    return per_rank


def _perf(options: list[ShardingOption], world_size: int) -> list[float]:
    per_rank = [0.0] * world_size
    for so in options:
        for shard in so.shards:
            if shard.rank is not None and shard.perf is not None and shard.rank >= 0:
                per_rank[shard.rank] += shard.perf.total
    return per_rank


def _gb(n: float) -> str:
    return f"{n / GB:.3f} GB"


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` → ``0-3,7``."""
    ranks = sorted(set(ranks))
    spans: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(spans)


def format_plan(best: list[ShardingOption], spec: ClusterSpec, available: Storage) -> str:
    """Tables (type, kernel, ranks, size), memory per rank vs capacity, estimated step time."""
    mem = "hbm" if spec.device == "cuda" else "ddr"
    lines = [
        f"plan for {spec.nodes} node(s) x {spec.local_world_size} {spec.device} rank(s) = "
        f"world {spec.world_size}; per rank: HBM {_gb(spec.hbm_bytes if spec.device == 'cuda' else 0)}, "
        f"DDR {_gb(spec.ddr_bytes)} ({_gb(getattr(available, mem))} {mem.upper()} left for "
        f"embeddings after TorchRec's reservation for dense parts, inputs and a "
        f"{RESERVED_FRACTION:.0%} margin)",
        "",
        f"{'table':<28} {'rows':>14} {'dim':>4} {'sharding':<18} {'kernel':<18} {'shards':>6}  ranks",
    ]
    for so in sorted(best, key=lambda s: s.name):
        rows, dim = so.tensor.shape
        ranks = [s.rank for s in so.shards if s.rank is not None]
        lines.append(
            f"{so.name:<28} {rows:>14,} {dim:>4} {so.sharding_type:<18} {so.compute_kernel:<18} "
            f"{len(so.shards):>6}  {_ranks(ranks) if ranks else '-'}"
        )
    storage, perf = _storage(best, spec.world_size), _perf(best, spec.world_size)
    used = [s.hbm if spec.device == "cuda" else s.ddr for s in storage]
    cap = spec.hbm_bytes if spec.device == "cuda" else spec.ddr_bytes
    lines += ["", f"estimated embedding memory per rank ({mem.upper()}, capacity {_gb(cap)}):"]
    rows_out: list[tuple[list[int], str]] = []  # consecutive ranks with the same line merge
    for rank in range(spec.world_size):
        extra = (
            f" + DDR {_gb(storage[rank].ddr)}"
            if spec.device == "cuda" and storage[rank].ddr
            else ""
        )
        text = f"{_gb(used[rank]):>12} ({used[rank] / cap:6.1%}){extra}  perf {perf[rank]:9.3f} ms"
        if rows_out and rows_out[-1][1] == text:
            rows_out[-1][0].append(rank)
        else:
            rows_out.append(([rank], text))
    lines += [f"  rank {_ranks(ranks):>9}: {text}" for ranks, text in rows_out]
    slowest = max(range(spec.world_size), key=lambda r: perf[r])
    lines += [
        "",
        f"max memory per rank: {_gb(max(used))} of {_gb(cap)} ({max(used) / cap:.1%}); "
        f"total {_gb(sum(used))}",
        f"estimated embedding step time (TorchRec perf model, slowest rank {slowest}): "
        f"{perf[slowest]:.3f} ms; mean over ranks {sum(perf) / len(perf):.3f} ms",
    ]
    return "\n".join(lines)


def explain_no_fit(
    enumerator: EmbeddingEnumerator,
    model: torch.nn.Module,
    sharders: list[ModuleSharder],
    spec: ClusterSpec,
    available: Storage,
) -> str:
    """Why nothing fits: each table's smallest option against what the cluster has left."""
    have = Storage(available.hbm * spec.world_size, available.ddr * spec.world_size)

    def load(st: Storage) -> float:  # share of the scarcer memory this storage takes
        share = [
            need / cap if cap > 0 else (float("inf") if need > 0 else 0.0)
            for need, cap in ((st.hbm, have.hbm), (st.ddr, have.ddr))
        ]
        return max(share)

    smallest: dict[str, tuple[Storage, ShardingOption]] = {}
    for so in enumerator.enumerate(module=model, sharders=sharders):
        total = sum((s.storage for s in so.shards if s.storage is not None), Storage(0, 0))
        if so.name not in smallest or load(total) < load(smallest[so.name][0]):
            smallest[so.name] = (total, so)
    need = sum((t for t, _ in smallest.values()), Storage(0, 0))
    short = [
        f"{kind} short by {_gb(n - h)} (need {_gb(n)}, have {_gb(h)})"
        for kind, n, h in (("HBM", need.hbm, have.hbm), ("DDR", need.ddr, have.ddr))
        if n > h
    ]
    lines = [
        f"the embedding tables do not fit on {spec.world_size} {spec.device} rank(s) "
        f"({spec.nodes} node(s) x {spec.local_world_size}; per rank after TorchRec's "
        f"reservation: HBM {_gb(available.hbm)}, DDR {_gb(available.ddr)}):",
        "  even each table's smallest sharding: "
        + ("; ".join(short) if short else "fits in total but not rank by rank (shards too big)"),
    ]
    for name, (total, so) in sorted(smallest.items(), key=lambda kv: -load(kv[1][0]))[:5]:
        rows, dim = so.tensor.shape
        biggest = max(
            (s.storage.hbm + s.storage.ddr for s in so.shards if s.storage is not None), default=0
        )
        lines.append(
            f"  table {name}: {rows:,} rows x {dim} needs {_gb(total.hbm)} HBM + "
            f"{_gb(total.ddr)} DDR at least ({so.sharding_type}, {so.compute_kernel}, "
            f"{len(so.shards)} shard(s), largest {_gb(biggest)})"
        )
    lines.append(
        "  fix: more ranks (--nodes / --gpus-per-node), more memory per rank (--hbm-gb / "
        "--ddr-gb), fewer rows (--rows) or a smaller embedding_dim"
    )
    return "\n".join(lines)


def plan(cfg: JobConfig, spec: ClusterSpec, batch_size: int | None = None) -> tuple[int, str]:
    """Plan ``cfg``'s tables on ``spec``; returns (exit code, text to print)."""
    topology = spec.topology()
    model = build_ranker(cfg, device="meta", world_size=topology.world_size)
    constraints = sharding_constraints(model, cfg.sharding)
    sharders = sharders_for(cfg.sharding)
    batch_size = batch_size or cfg.train.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)
    keep = _KeepBestPlan()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=reservation,
        constraints=constraints,
        stats=[keep],
        debug=False,
    )
    try:
        planner.plan(model, sharders)
    except PlannerError as err:
        reserved = reservation.last_reserved_topology
        if reserved is None:  # the reservation itself failed: dense + inputs exceed a rank
            return 1, f"no plan: {err}"
        available = reserved.devices[0].storage
        enumerator = EmbeddingEnumerator(topology, batch_size, constraints)
        return 1, explain_no_fit(enumerator, model, sharders, spec, available)
    available = reservation.last_reserved_topology.devices[0].storage  # type: ignore[union-attr]
    return 0, format_plan(keep.best_plan, spec, available)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-plan",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="job TOML (its tables, dims and sharding types)")
    p.add_argument("--nodes", type=int, default=1, help="hosts")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per host on cuda")
    p.add_argument(
        "--procs-per-node",
        type=int,
        default=0,
        help="ranks per host (any device; overrides --gpus-per-node)",
    )
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="compute device of the ranks"
    )
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per rank (cuda)")
    p.add_argument(
        "--ddr-gb",
        type=float,
        default=128.0,
        help="host memory per rank (cpu: where the tables live; cuda: UVM)",
    )
    p.add_argument(
        "--intra-host-gbps",
        type=float,
        default=None,
        help="GB/s between ranks of a host (TorchRec default if unset)",
    )
    p.add_argument(
        "--inter-host-gbps",
        type=float,
        default=None,
        help="GB/s between hosts (TorchRec default if unset)",
    )
    p.add_argument("--rows", action="append", default=[], metavar="[TABLE=]N",
                   help="rows of TABLE (or of every table), e.g. item_id=1e9; repeatable")  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=0, help="per-rank batch (default: train.batch_size)"
    )
    p.add_argument(
        "overrides", nargs="*", help="config overrides: --section.key value ... (after --)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    quiet_third_party_logs()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    local = args.procs_per_node or (args.gpus_per_node if args.device == "cuda" else 1)
    try:
        cfg = resize_tables(
            check_filters(load_config(["--config", args.config, *args.overrides])), args.rows
        )
        spec = ClusterSpec(
            nodes=args.nodes,
            local_world_size=local,
            device=args.device,
            hbm_bytes=int(args.hbm_gb * GB),
            ddr_bytes=int(args.ddr_gb * GB),
            intra_host_gbps=args.intra_host_gbps,
            inter_host_gbps=args.inter_host_gbps,
        )
    except (ConfigError, ValueError) as err:
        print(f"mtl-plan: {err}", file=sys.stderr)
        sys.exit(2)
    code, text = plan(cfg, spec, args.batch_size or None)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
