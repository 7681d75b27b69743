"""Train a multi-task ranker: ``torchrun --nproc_per_node N -m mtl_dist.train --config X.toml``.

The recipe: config → process group → data → model → sharding (DMP) → optimizers → train loop
with periodic validation → metrics out → clean exit. ``--help`` lists every config key.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from mtl_dist.checkpoint.rundir import (
    clear_finished,
    open_run_dir,
    record_finished,
    release_run_dirs,
    run_ended,
)
from mtl_dist.checkpoint.store import (
    checkpoint_dir,
    latest_target,
    load_checkpoint,
    point,
    save_checkpoint,
)
from mtl_dist.config import DataConfig, JobConfig, load_config, to_dict
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import (
    ParquetBatchReader,
    describe,
    list_parquet_files,
    overlap_warning,
    require_selected,
)
from mtl_dist.data.source import RowFilter, check_filters
from mtl_dist.distributed.setup import DistInfo, destroy, init_distributed
from mtl_dist.distributed.sharding import describe_plan, shard_model
from mtl_dist.loop import preempt
from mtl_dist.loop.losses import build_model_with_loss
from mtl_dist.loop.optim import build_optimizer, dense_optimizer
from mtl_dist.loop.precision import LossScaler, Precision, resolve_precision, set_head_precision
from mtl_dist.loop.preempt import Preempted
from mtl_dist.loop.schedule import LRSchedule
from mtl_dist.loop.selection import BestTracker, fmt_metric
from mtl_dist.loop.step import StepRunner, TrainStep
from mtl_dist.models.ranker import build_ranker
from mtl_dist.observe.attribution import attribution_figure, feature_attribution, write_attribution
from mtl_dist.observe.metrics import (
    compute_metrics,
    format_table,
    gather_rows,
    metric_units,
    write_json,
)
from mtl_dist.observe.telemetry import Monitor, Telemetry, peak_memory_mb, quiet_third_party_logs


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


def validation_loader(reader: ParquetBatchReader, cfg: DataConfig) -> StatefulDataLoader:
    """A loader over the whole validation set, from its first row."""
    reader.rewind()
    return build_loader(reader, cfg)


def build_readers(cfg: JobConfig, info: DistInfo) -> tuple[ParquetBatchReader, ParquetBatchReader]:
    """Training reader (drops ragged batches; reads sample weights, not the oracle's truth) and
    validation reader (pads them so every row counts; reads truth and the GAUC group column,
    not sample weights). A file needs only the columns its reader uses."""

    def reader(path: str, training: bool) -> ParquetBatchReader:
        converter = ArrowBatchConverter(
            cfg.features.sparse, cfg.features.dense, cfg.tasks,
            group_by="" if training else cfg.train.gauc_by, dense_nan=cfg.data.dense_nan,
            sample_weights=training, truth=not training, hash_seed=cfg.data.hash_seed,
        )  # fmt: skip
        return ParquetBatchReader(
            list_parquet_files(path), converter, cfg.train.batch_size, info.rank, info.world_size,
            cfg.data.num_workers, drop_last=training, row_filter=_row_filter(cfg, training),
        )  # fmt: skip

    return reader(cfg.data.train_path, True), reader(cfg.data.val_path, False)


def _row_filter(cfg: JobConfig, training: bool) -> RowFilter | None:
    text = cfg.data.train_filter if training else cfg.data.val_filter
    return (
        RowFilter.parse(text, "data.train_filter" if training else "data.val_filter")
        if text
        else None
    )


def check_splits(cfg: JobConfig, val_reader: ParquetBatchReader, info: DistInfo) -> None:
    """Start-up checks of the two splits, before anything trains: a validation set that keeps
    no row raises ``ValueError`` naming the path, the filter and the partitions found (on every
    rank alike); rows both splits keep (overlapping filters, or the same files) are counted in a
    warning on rank 0."""
    if val_reader.total_rows == 0:
        require_selected(cfg.data.val_path, _row_filter(cfg, False))  # names path and partitions
        raise ValueError(f"{cfg.data.val_path}: no validation row")
    if info.rank == 0:
        warning = overlap_warning(
            cfg.data.train_path, _row_filter(cfg, True), cfg.data.val_path, _row_filter(cfg, False)
        )
        if warning:
            print(f"[data] warning: {warning}", flush=True)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, cfg: JobConfig, loader: StatefulDataLoader, device: torch.device
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Whole validation set on every rank (equal, padded batch counts) → metrics over all ranks
    and the reasons of the undefined ones (see :func:`mtl_dist.observe.metrics.compute_metrics`)."""
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
    """TensorBoard scalars (only defined metrics are in ``metrics``)."""
    return {f"{prefix}/{task}/{k}": v for task, m in metrics.items() for k, v in m.items()}


def report_attribution(
    cfg: JobConfig,
    ranker: torch.nn.Module,
    val_reader: ParquetBatchReader,
    info: DistInfo,
    monitor: Monitor,
    step: int,
) -> None:
    """Per-task feature attribution on the first validation batches: ``attribution.csv`` and a
    heatmap image ``attribution`` in TensorBoard (rank 0)."""
    loader = validation_loader(val_reader, cfg.data)
    batches = itertools.islice(loader, cfg.monitor.attribution_batches)
    features, attr = feature_attribution(ranker, batches, info.device)
    if info.is_main:
        tasks = [t.name for t in cfg.tasks]
        write_attribution(Path(cfg.train.output_dir) / "attribution.csv", features, tasks, attr)
        monitor.figure("attribution", attribution_figure(features, tasks, attr), step)


def check_writable(path: str) -> None:
    """Fail at start-up, on every rank, when the run directory cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"train.output_dir {path!r} is not writable: {e}") from None


def set_up_precision(
    cfg: JobConfig, loss_module: nn.Module, step: TrainStep, device: torch.device
) -> Precision:
    """Resolve ``train.precision`` for this device (see :mod:`mtl_dist.loop.precision`) and apply it:
    the head's autocast dtype, a loss scaler for fp16, TF32 for fp32 matmuls on CUDA (per
    ``train.allow_tf32``)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    precision = resolve_precision(cfg.train.precision, device.type, cap)
    if device.type == "cuda":
        tf32 = cfg.train.allow_tf32 and precision.name == "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    set_head_precision(loss_module.model.head, precision)
    set_head_precision(loss_module.model.interaction, precision)  # an Identity: ignored
    if precision.loss_scaling:  # fp16: dynamic loss scaling over dense and fused table updates
        step.switch.scaler = LossScaler(device)
    return precision


def train(cfg: JobConfig, info: DistInfo) -> dict[str, object]:
    """Train per ``cfg`` on this rank; returns the final validation metrics (same on all ranks)."""
    seed_everything(cfg.train.seed)
    log = print if info.is_main else (lambda *a, **k: None)
    check_writable(cfg.train.output_dir)

    # --- the run directory: this job's alone; what to resume from, decided before any write
    ckpt_root = checkpoint_dir(cfg)
    resumed = open_run_dir(cfg, ckpt_root, log)
    # a run that ended (early stop, max_steps, all epochs) stays ended when relaunched with the
    # same command (a scheduler's retry): nothing is trained, nothing written
    finished, ended = run_ended(cfg, ckpt_root)
    if finished:
        how = f"[resume] run ended at step {finished.get('step')} ({finished.get('reason')})"
        if ended:
            log(
                f"{how}: nothing to do (checkpoint.continue_finished = true, or a larger "
                "train.max_steps / train.epochs, trains on)"
            )
            return {"ended": finished}
        log(f"{how}: training on (checkpoint.continue_finished or a larger budget)")
    clear_finished(ckpt_root)  # it trains: not ended until it ends again

    # --- data: each rank reads its own contiguous share of the rows
    train_reader, val_reader = build_readers(cfg, info)
    log(f"[data] train: {describe(train_reader)}\n[data] val:   {describe(val_reader)}")
    check_splits(cfg, val_reader, info)

    # --- model: tables on meta, sharded by the planner; dense part under DDP
    loss_module = build_model_with_loss(build_ranker(cfg, "meta", info.world_size), cfg)
    step_fn = TrainStep(loss_module, cfg.train.on_nonfinite)  # the guard's gate goes in here
    precision = set_up_precision(cfg, loss_module, step_fn, info.device)
    log(
        f"[precision] dense {precision.name} ({precision.reason}); tables {cfg.embedding.data_type}"
    )
    if cfg.optim.embedding_weight_decay and info.device.type != "cuda":
        raise ValueError(
            "optim.embedding_weight_decay: fbgemm's CPU kernels ignore weight decay (measured in "
            "tests/distributed/test_embedding_weight_decay.py); use model.embedding_l2 on CPU"
        )
    model, plan = shard_model(loss_module, cfg.sharding, cfg.optim, info)
    log(
        f"[model] world {info.world_size} on {info.device} ({info.backend}); sharding plan:\n{describe_plan(plan)}"
    )
    optimizer = build_optimizer(cfg.optim, model, step_fn.switch)
    loss_module.balancer.attach(dense_optimizer(optimizer))
    dict(optimizer.optimizers)["dense"].before_step.append(loss_module.balancer.before_step)
    runner = StepRunner(model, optimizer, info.device, step_fn, cfg.sharding.pipeline)

    # --- resume: the newest verified checkpoint of this run (or the one named), any world size
    step, epoch0, run_id = 0, 0, uuid.uuid4().hex  # a fresh run gets a new run id
    steps_per_epoch = len(train_reader)  # a full pass
    if resumed is not None:
        r = load_checkpoint(resumed, model, optimizer, cfg)
        step, epoch0, run_id = r.step, r.epoch, r.run_id or run_id
        # a checkpoint taken at an epoch's end holds no position: the next epoch starts afresh
        exact = train_reader.resume_pass(r.positions) if any(r.positions) else True
        log(
            f"[resume] {resumed} at step {step}, epoch {epoch0}: saved by {r.saved_world_size} "
            f"ranks, {'continuing each reader exactly' if exact else 're-splitting the rows not yet trained'}"
        )
        if r.table_dtype != cfg.embedding.data_type:
            log(f"[resume] tables saved as {r.table_dtype}, loaded as {cfg.embedding.data_type}")
        log(f"[data] train: {describe(train_reader)}")

    # --- loop: segments end at validation / checkpoint steps and at epoch ends
    total = step + (train_reader.steps_left() if resumed is not None else steps_per_epoch)
    total += steps_per_epoch * (cfg.train.epochs - epoch0 - 1)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.train_path}: fewer rows than one batch per rank "
            f"({train_reader.total_rows} rows, batch {cfg.train.batch_size}, world {info.world_size})"
        )
    val_every = cfg.train.val_every or steps_per_epoch
    ckpt_every = cfg.checkpoint.every
    telemetry = Telemetry(cfg, info, total - step, model, loss_module, step_fn, optimizer, step)
    schedule = LRSchedule(cfg.optim, optimizer, total)  # a function of the step: resumes exactly
    schedule.apply(step + 1)
    tracker = BestTracker(cfg.train)  # train.best_metric, early_stop_patience
    metrics, undefined, history = {}, {}, []
    if resumed is not None:
        tracker.load(r.loop_state.get("best", {}))
        history = list(r.loop_state.get("history", []))
        if finished.get("reason") == "early stop":  # continued: patience starts over
            tracker.since = 0

    def save(at: int, epoch_after: int, done: bool) -> Path:
        """A checkpoint of step ``at`` (``done``: an epoch's end, so no reader position)."""
        position = {} if done else train_reader.position(runner.trained)
        loop_state = {"best": tracker.state(), "history": history}
        path = save_checkpoint(
            ckpt_root, step=at, epoch=epoch_after, model=model, optimizer=optimizer,
            reader_position=position, cfg=cfg, keep=cfg.checkpoint.keep, run_id=run_id,
            loop_state=loop_state,
        )  # fmt: skip
        log(f"[checkpoint] step {at}: {path}")
        return path

    def validate(at: int, epoch_after: int, done: bool, saved: Path | None) -> bool:
        """Validate at step ``at``; track the best (a checkpoint of a new best, ``best``
        pointing at it); returns whether to stop early."""
        nonlocal metrics, undefined
        metrics, undefined = evaluate(
            model, cfg, validation_loader(val_reader, cfg.data), info.device
        )
        telemetry.monitor.scalars(at, flat_metrics(metrics), main_only=True)
        history.append({"step": at, "metrics": metrics, "undefined": undefined})
        if cfg.monitor.attribution:
            report_attribution(cfg, loss_module.model, val_reader, info, telemetry.monitor, at)
        if tracker.enabled and tracker.update(at, metrics):
            tracker.checkpoint = f"step_{at:08d}"
            saved = saved or save(at, epoch_after, done)
            if info.is_main:
                point(ckpt_root, saved.name, "best")
            log(f"[best] {tracker.name} = {fmt_metric(tracker.value)} at step {at}: {saved}")
        elif tracker.enabled and (note := tracker.undefined_note(at, metrics, undefined)):
            log(note)  # one class in validation, ...: no improvement, never a number
        if tracker.stop:
            log(
                f"[early stop] {tracker.name} has not improved in "
                f"{tracker.since} validations (best {tracker.describe_best()})"
            )
            if cfg.checkpoint.at_end and saved is None:
                save(at, epoch_after, done)
        return tracker.stop

    # a checkpoint written before its validation ran (a failed validation, a preemption
    # between them): validate that step now, as the uninterrupted run did
    stop = False
    if (
        resumed is not None
        and step % val_every == 0
        and step
        and (not history or history[-1]["step"] < step)
    ):
        stop = validate(step, epoch0, False, resumed)
    t0 = time.perf_counter()
    for epoch in range(epoch0, cfg.train.epochs):
        if step >= total or stop:
            break
        if epoch != epoch0 or resumed is None:
            train_reader.start_pass()
        pass_end = step + train_reader.steps_left()  # this epoch's last step
        epoch_end = min(pass_end, total)
        batches = iter(build_loader(train_reader, cfg.data))
        while step < epoch_end and not stop:
            boundaries = [epoch_end, (step // val_every + 1) * val_every]
            if ckpt_every:
                boundaries.append((step // ckpt_every + 1) * ckpt_every)
            segment_end = min(boundaries)
            segment_start = step
            segment = telemetry.batches(itertools.islice(batches, segment_end - step))
            for out in runner.run(segment):
                step += 1
                telemetry.step(step, out, flush=step == segment_end)
                schedule.apply(step + 1)  # the rates of the next step
                if telemetry.preempted:  # SIGTERM on some rank: every rank stops after this step
                    break
            if step == segment_start:
                raise RuntimeError(
                    f"training data ended early at step {step} (expected {segment_end})"
                )
            telemetry.pause(step)
            done = step == pass_end  # a finished epoch resumes at the next one's start
            # saved before validating: a failing validation costs only the validation
            ckpt_due = (ckpt_every and step % ckpt_every == 0) or (
                step == total and cfg.checkpoint.at_end
            )
            saved = save(step, epoch + done, done) if ckpt_due or telemetry.preempted else None
            if telemetry.preempted:
                telemetry.close()
                raise Preempted(step, str(saved))
            if step % val_every == 0 or step == epoch_end:
                stop = validate(step, epoch + done, done, saved)
            telemetry.resume()
    if not metrics:  # resumed at the very end: report the final model all the same
        metrics, undefined = evaluate(
            model, cfg, validation_loader(val_reader, cfg.data), info.device
        )
    elapsed = time.perf_counter() - t0
    telemetry.close()
    if stop:
        end_reason = "early stop"
    elif cfg.train.max_steps and step >= cfg.train.max_steps:
        end_reason = "max_steps"
    else:
        end_reason = "all epochs"

    result = {
        "steps": step,
        "world_size": info.world_size,
        "samples_per_s": telemetry.global_rate,
        "steady_samples_per_s": telemetry.steady_rate,  # after the first 10 steps (0: shorter)
        "elapsed_s": elapsed,
        "train_s": telemetry.train_s,
        "metrics": metrics,  # {task: {metric: value}}: defined metrics only
        "best": tracker.summary() if tracker.enabled else None,
        "early_stopped": stop,
        "ended_by": end_reason,  # early stop | max_steps | all epochs
        "undefined_metrics": undefined,  # {task: {metric: why}}: AUC with one class, ...
        "metric_units": metric_units(cfg.tasks),  # {regression task: unit of MAE / sqrt(MSE)}
        "history": history,
        "plan": describe_plan(plan),
        "last_trained_position": runner.trained_position,  # (global worker, rows consumed) of rank 0
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
    if info.is_main:
        write_json(os.path.join(cfg.train.output_dir, "metrics.json"), result)
        # the run has ended: a relaunch of the same command finds it so and does nothing
        record_finished(ckpt_root, {
            "reason": end_reason, "step": step, "epochs": cfg.train.epochs,
            "max_steps": cfg.train.max_steps, "latest": latest_target(ckpt_root),
            "run_id": run_id, "metrics": "metrics.json",
        })  # fmt: skip
        log(
            f"\n[done] {step} steps in {elapsed:.1f}s ({telemetry.train_s:.1f}s training, {result['samples_per_s']:.0f} "
            f"samples/s over {info.world_size} ranks)"
        )
        log(
            f"validation (model vs oracle, the best achievable on this data):\n{format_table(cfg.tasks, metrics, undefined)}"
        )
        log(f"TensorBoard: tensorboard --logdir {os.path.join(cfg.train.output_dir, 'tb')}")
    return result


def main(argv: list[str] | None = None) -> None:
    quiet_third_party_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --resume: shorthand for --checkpoint.resume latest (a checkpoint must exist)
    argv = [
        a for x in argv for a in (["--checkpoint.resume", "latest"] if x == "--resume" else [x])
    ]
    cfg = check_filters(load_config(argv))  # every key checked before any process group
    preempt.install()  # SIGTERM: stop at a step every rank agrees on, save, exit 75
    info = init_distributed(cfg.train.device, cfg.train.threads)
    code = 0
    try:
        train(cfg, info)
        torch.distributed.barrier()  # every rank done before any tears the group down
    except Preempted as e:
        if info.is_main:
            print(f"[preempt] {e}; exiting with {preempt.REQUEUE_EXIT_CODE} (requeue me)")
        code = preempt.REQUEUE_EXIT_CODE
    finally:
        release_run_dirs()
        destroy()
    # Everything is written and closed. Skip the interpreter's C++ static teardown: now and then
    # (about 1 run in 50 here) a library thread still joinable there ends a finished run in
    # "terminate called without an active exception" (SIGABRT), failing the whole job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
