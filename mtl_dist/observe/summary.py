"""The end of a run: ``metrics.json``'s content (:func:`summarize`, every rank) and, on rank 0,
the file, the run recorded as ended and the printed summary with the validation table
(:func:`report`)."""

from __future__ import annotations

import os
from typing import Any

import torch

from mtl_dist.config import JobConfig, to_dict
from mtl_dist.distributed.setup import DistInfo
from mtl_dist.distributed.sharding import describe_plan
from mtl_dist.loop.state import LoopState
from mtl_dist.observe.metrics import format_table, gather_rows, metric_units, write_json
from mtl_dist.observe.telemetry import Telemetry, peak_memory_mb


def summarize(
    cfg: JobConfig, info: DistInfo, state: LoopState, telemetry: Telemetry, plan: Any,
    trained_position: tuple[int, int] | None, elapsed: float,
) -> dict[str, Any]:  # fmt: skip
    """``metrics.json``'s content (the same on every rank: ``gather_rows`` runs on all), and
    why the run ended (``ended_by``). ``plan``: the sharding plan."""
    if state.stop:
        end_reason = "early stop"
    elif cfg.train.max_steps and state.step >= cfg.train.max_steps:
        end_reason = "max_steps"
    else:
        end_reason = "all epochs"
    return {
        "steps": state.step,
        "world_size": info.world_size,
        "samples_per_s": telemetry.global_rate,
        "steady_samples_per_s": telemetry.steady_rate,  # after the first 10 steps (0: shorter)
        "elapsed_s": elapsed,
        "train_s": telemetry.train_s,
        "metrics": state.metrics,  # {task: {metric: value}}: defined metrics only
        "best": state.tracker.summary() if state.tracker.enabled else None,
        "early_stopped": state.stop,
        "ended_by": end_reason,  # early stop | max_steps | all epochs
        "undefined_metrics": state.undefined,  # {task: {metric: why}}: AUC with one class, ...
        "metric_units": metric_units(cfg.tasks),  # {regression task: unit of MAE / sqrt(MSE)}
        "history": state.history,
        "plan": describe_plan(plan),
        "last_trained_position": trained_position,  # (global worker, rows) of rank 0
        # the balancer's final task weights as each rank holds them (they must agree)
        "task_weights_by_rank": gather_rows(
            torch.tensor([telemetry.weights], device=info.device)
        ).tolist(),
        # peak resident memory (CUDA: peak allocated) of every rank, MiB
        "peak_memory_mb_by_rank": gather_rows(
            torch.tensor([[peak_memory_mb(info.device)]], device=info.device)
        )
        .flatten()
        .tolist(),
        "profile": telemetry.profile,  # rank 0's step profile (monitor.profile_steps)
        "config": to_dict(cfg),
    }


def report(cfg: JobConfig, state: LoopState, result: dict[str, Any]) -> None:
    """Rank 0: ``metrics.json`` and the summary with the validation table (the run is recorded
    as ended by :meth:`mtl_dist.checkpoint.checkpointer.Checkpointer.finish`)."""
    write_json(os.path.join(cfg.train.output_dir, "metrics.json"), result)
    print(
        f"\n[done] {state.step} steps in {result['elapsed_s']:.1f}s ({result['train_s']:.1f}s training, "
        f"{result['samples_per_s']:.0f} samples/s over {result['world_size']} ranks)"
    )
    print(
        "validation (model vs oracle, the best achievable on this data):\n"
        + format_table(cfg.tasks, state.metrics, state.undefined)
    )
    print(f"TensorBoard: tensorboard --logdir {os.path.join(cfg.train.output_dir, 'tb')}")
