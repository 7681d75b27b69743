"""Train a multi-task ranker: ``torchrun --nproc_per_node N -m mtl_dist.train --config X.toml``.

The recipe: config → process group → data → model → sharding (DMP) → optimizers → train loop
with periodic validation → metrics out → clean exit. ``--help`` lists every config key.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from mtl_dist.config import DataConfig, JobConfig, load_config, to_dict
from mtl_dist.data.batch import ArrowBatchConverter, Batch
from mtl_dist.data.reader import ParquetBatchReader, describe, list_parquet_files
from mtl_dist.distributed.setup import DistInfo, destroy, init_distributed
from mtl_dist.distributed.sharding import describe_plan, shard_model
from mtl_dist.losses import StepOutput, build_model_with_loss
from mtl_dist.metrics import compute_metrics, format_table, gather_rows
from mtl_dist.models.ranker import build_ranker
from mtl_dist.monitoring import Monitor, quiet_third_party_logs
from mtl_dist.optim import build_optimizer


def seed_everything(seed: int) -> None:
    """Same seed on every rank: dense init is identical (DDP also broadcasts rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loader(reader: ParquetBatchReader, cfg: DataConfig) -> StatefulDataLoader:
    """Batches come pre-built from the reader (``batch_size=None``)."""
    workers = cfg.num_workers
    return StatefulDataLoader(
        reader,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_batches if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # pinned host batches copy to the GPU asynchronously
    )


def build_readers(cfg: JobConfig, info: DistInfo) -> tuple[ParquetBatchReader, ParquetBatchReader]:
    """Training reader (drops ragged batches) and validation reader (pads them: every row counts;
    it also reads the GAUC group column)."""

    def reader(path: str, drop_last: bool, group_by: str = "") -> ParquetBatchReader:
        converter = ArrowBatchConverter(
            cfg.features.sparse, cfg.features.dense, cfg.tasks, group_by
        )
        return ParquetBatchReader(
            list_parquet_files(path), converter, cfg.train.batch_size, info.rank, info.world_size,
            cfg.data.num_workers, drop_last=drop_last,
        )  # fmt: skip

    return (
        reader(cfg.data.train_path, True),
        reader(cfg.data.val_path, False, cfg.train.gauc_by),
    )


class StepRunner:
    """Runs training steps, through TorchRec's ``TrainPipelineSparseDist`` or plainly.

    The pipeline overlaps the next batch's sparse input distribution with this batch's
    forward/backward (and host→device copies on GPU). It holds batches in flight, so the reader
    position of the batch just trained is tracked here (``trained_position``), not the reader's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        pipelined: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.pipeline = (
            TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
            if pipelined
            else None
        )
        self._in_flight: list[tuple[int, int]] = []
        self.trained_position: tuple[int, int] | None = None

    def _track(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for b in batches:
            self._in_flight.append(b.position)
            yield b

    def run(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """Train on every batch of ``batches``; yields each step's output."""
        tracked = self._track(batches)
        if self.pipeline is not None:
            self.pipeline.attach(self.model)
            while True:
                try:
                    out = self.pipeline.progress(tracked)
                except StopIteration:
                    break
                self.trained_position = self._in_flight.pop(0)
                yield out
            self.pipeline.detach()  # restore plain forwards (validation calls the model directly)
            self.pipeline.reset()
        else:
            for batch in tracked:
                self.optimizer.zero_grad()
                loss, out = self.model(batch.to(self.device, non_blocking=True))
                loss.backward()
                self.optimizer.step()
                self.trained_position = self._in_flight.pop(0)
                yield out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, cfg: JobConfig, loader: StatefulDataLoader, device: torch.device
) -> dict[str, dict[str, float]]:
    """Whole validation set on every rank (equal, padded batch counts) → metrics over all ranks."""
    model.eval()
    outs = []
    batches = itertools.islice(loader, cfg.train.val_max_batches or None)
    for batch in batches:
        _, out = model(batch.to(device, non_blocking=True))
        outs.append(out)
    model.train()
    cat = lambda name: torch.cat([getattr(o, name) for o in outs])  # noqa: E731
    group = cat("group") if cfg.train.gauc_by else None
    return compute_metrics(cfg.tasks, cat("preds"), cat("labels"), cat("mask"), cat("truth"), group)


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str = "val") -> dict[str, float]:
    return {f"{prefix}/{task}/{k}": v for task, m in metrics.items() for k, v in m.items()}


def train(cfg: JobConfig, info: DistInfo) -> dict[str, object]:
    """Train per ``cfg`` on this rank; returns the final validation metrics (same on all ranks)."""
    seed_everything(cfg.train.seed)
    log = print if info.is_main else (lambda *a, **k: None)
    os.makedirs(cfg.train.output_dir, exist_ok=True)

    # --- data: each rank reads its own contiguous share of the rows
    train_reader, val_reader = build_readers(cfg, info)
    log(f"[data] train: {describe(train_reader)}\n[data] val:   {describe(val_reader)}")

    # --- model: tables on meta, sharded by the planner; dense part under DDP
    model = build_model_with_loss(build_ranker(cfg, device="meta"), cfg)
    aux_names = list(model.model.head.aux_names)
    model, plan = shard_model(model, cfg.sharding, cfg.optim, info)
    log(
        f"[model] world {info.world_size} on {info.device} ({info.backend}); sharding plan:\n{describe_plan(plan)}"
    )
    optimizer = build_optimizer(cfg.optim, model)
    runner = StepRunner(model, optimizer, info.device, cfg.sharding.pipeline)

    # --- loop: segments of `val_every` steps, validation after each
    B = cfg.train.batch_size
    steps_per_epoch = len(train_reader)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    if total == 0:
        raise ValueError(
            f"{cfg.data.train_path}: fewer rows than one batch per rank "
            f"({train_reader.total_rows} rows, batch {cfg.train.batch_size}, world {info.world_size})"
        )
    val_every = cfg.train.val_every or steps_per_epoch
    monitor = Monitor(cfg.train.output_dir, info.rank, total, cfg.train.progress_bar)
    step, metrics, history = 0, {}, []
    t0 = time.perf_counter()
    eval_s = 0.0  # validation time, excluded from training throughput
    # per-task losses then the head's auxiliary losses, summed on the device (no per-step sync)
    loss_tags = [f"train/loss/{t.name}" for t in cfg.tasks] + [f"train/aux/{n}" for n in aux_names]
    loss_sum, loss_steps = torch.zeros(len(loss_tags), device=info.device), 0
    weight_tags = [f"train/weight/{t.name}" for t in cfg.tasks]
    weights: list[float] = []  # the balancer's task weights, logged whenever they change
    for _epoch in range(cfg.train.epochs):
        batches = iter(build_loader(train_reader, cfg.data))
        epoch_end = min(step + steps_per_epoch, total)
        while step < epoch_end:
            segment_end = min(epoch_end, (step // val_every + 1) * val_every)
            segment_start = step
            for out in runner.run(itertools.islice(batches, segment_end - step)):
                step += 1
                loss_sum += torch.cat([out.losses, out.aux])
                loss_steps += 1
                changing = cfg.loss.balancer != "fixed" or not weights  # fixed: log them once
                if changing and (now := out.weights.tolist()) != weights:
                    weights = now
                    monitor.scalars(step, dict(zip(weight_tags, weights)))
                if step % cfg.train.log_every == 0 or step == segment_end:
                    means = (loss_sum / loss_steps).tolist()
                    rate = step * B * info.world_size / (time.perf_counter() - t0 - eval_s)
                    scalars = dict(zip(loss_tags, means))
                    scalars.update({"train/loss": sum(means), "train/samples_per_s": rate})
                    monitor.scalars(step, scalars)
                    monitor.advance(loss_steps, {"loss": sum(means), "samples/s": rate})
                    loss_sum.zero_()
                    loss_steps = 0
            if step == segment_start:
                raise RuntimeError(
                    f"training data ended early at step {step} (expected {segment_end})"
                )
            t_eval = time.perf_counter()
            metrics = evaluate(model, cfg, build_loader(val_reader, cfg.data), info.device)
            eval_s += time.perf_counter() - t_eval
            monitor.scalars(step, flat_metrics(metrics))
            history.append({"step": step, "metrics": metrics})
        if step >= total:
            break
    elapsed = time.perf_counter() - t0
    monitor.close()

    result = {
        "steps": step,
        "world_size": info.world_size,
        "samples_per_s": step * B * info.world_size / (elapsed - eval_s),
        "elapsed_s": elapsed,
        "train_s": elapsed - eval_s,
        "metrics": metrics,
        "history": history,
        "plan": describe_plan(plan),
        "last_trained_position": runner.trained_position,  # (global worker, rows consumed) of rank 0
        # the balancer's final task weights as each rank holds them (they must agree)
        "task_weights_by_rank": gather_rows(torch.tensor([weights], device=info.device)).tolist(),
        "config": to_dict(cfg),
    }
    if info.is_main:
        with open(os.path.join(cfg.train.output_dir, "metrics.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        log(
            f"\n[done] {step} steps in {elapsed:.1f}s ({elapsed - eval_s:.1f}s training, {result['samples_per_s']:.0f} "
            f"samples/s over {info.world_size} ranks)"
        )
        log(
            f"validation (model vs oracle, the best achievable on this data):\n{format_table(cfg.tasks, metrics)}"
        )
        log(f"TensorBoard: tensorboard --logdir {os.path.join(cfg.train.output_dir, 'tb')}")
    return result


def main(argv: list[str] | None = None) -> None:
    quiet_third_party_logs()
    cfg = load_config(argv)
    info = init_distributed(cfg.train.device, cfg.train.threads)
    try:
        train(cfg, info)
    finally:
        destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
