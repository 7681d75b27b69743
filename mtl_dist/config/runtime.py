"""The run-time sections: ``[monitor]``, ``[checkpoint]`` and ``[sharding]``, with the names their
choice keys allow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mtl_dist.config.base import one_of, opt

OnPolarization = Literal["warn", "stop", "strengthen"]
ON_POLARIZATION = get_args(OnPolarization)
SHARDING_TYPES = [
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
]


@dataclass
class MonitorConfig:
    """Gate health, alarms, probes and step telemetry (see ``mtl_dist/gate_health.py``)."""

    gate_every: int = opt(50, "gate health every N steps on every rank (0: off)")
    heatmap_every: int = opt(500, "task x expert gate-weight heatmap image every N steps (0: off)")
    polarized_threshold: float = opt(
        0.9, "a gate is polarised when its mean max weight exceeds this (per sample likewise)"
    )
    dead_threshold: float = opt(
        0.05, "an expert is unused when its utilisation is below this in every gate"
    )
    on_polarization: OnPolarization = opt(
        "warn",
        "when a gate polarises or an expert dies: "
        + one_of(
            ON_POLARIZATION,
            stop="(end the run)",
            strengthen="(raise the gates' expert dropout by 0.1, up to 0.5)",
        ),
    )
    conflict_every: int = opt(
        0, "cosine similarity of task gradients on the shared experts every N steps (0: off)"
    )
    attribution: bool = opt(
        True, "per-task feature attribution (mean |grad x input|) at each validation"
    )
    attribution_batches: int = opt(4, "validation batches per rank used for attribution")
    step_timing: bool = opt(
        True, "split step time into data / forward / backward / optimizer (syncs on CUDA)"
    )
    profile_steps: int = opt(
        0,
        "profile N training steps (torch.profiler) and split them into data / embedding / dense "
        "/ collectives / optimizer / python time: profile_rank<r>.json (0: off)",
    )
    profile_after: int = opt(10, "warm-up steps before the profiled ones")


@dataclass
class CheckpointConfig:
    """When to save, what to keep, whether to resume (see ``mtl_dist/checkpoint.py``)."""

    every: int = opt(0, "save every N steps (0: only at the end)")
    at_end: bool = opt(True, "save when training ends")
    keep: int = opt(3, "complete checkpoints kept (older ones are deleted)")
    resume: str = opt(
        "auto",
        "auto (resume from the latest checkpoint if the run has one) | latest (must exist; "
        "also --resume) | never | a checkpoint directory",
    )
    dir: str = opt("", "checkpoint directory (default: <train.output_dir>/checkpoints)")
    continue_finished: bool = opt(
        False,
        "a relaunch of a run that ended (early stop, max_steps, all epochs: recorded in "
        "<checkpoint dir>/finished.json) trains on from its last checkpoint instead of exiting "
        "with 'nothing to do' (a larger max_steps or epochs continues without it)",
    )


@dataclass
class ShardingConfig:
    sharding_types: list[str] = opt(
        SHARDING_TYPES,
        "sharding types the planner may choose from (row_wise / table_row_wise included on CPU too)",
    )
    force: str = opt(
        "", "if set, every table uses this sharding type (overrides the planner's choice)"
    )
    pipeline: bool = opt(
        True, "train with TorchRec's TrainPipelineSparseDist (overlaps input dist)"
    )
    ddp_bucket_cap_mb: int = opt(
        25,
        "DDP's gradient bucket size for the dense part, MiB (torch's and TorchRec's default 25); "
        "smaller buckets start their all-reduce earlier in the backward (TorchRec's DDP already "
        "sets gradient_as_bucket_view and static_graph)",
    )
