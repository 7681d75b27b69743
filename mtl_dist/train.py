"""Train a multi-task ranker: ``torchrun --nproc_per_node N -m mtl_dist.train --config X.toml``.

The recipe (:func:`train`): config → process group → the run directory (a run that ended
stays ended) → data → model → the training step (:mod:`mtl_dist.loop.step`, where the backward
runs) → sharding (DMP) → optimizers → the checkpointer
(:class:`~mtl_dist.checkpoint.checkpointer.Checkpointer`: when to save, saving, resume) →
resume → the loop: segments of steps ending at validation / checkpoint steps and epoch ends →
metrics out → clean exit. ``--help`` lists every config key.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_dist.checkpoint.checkpointer import Checkpointer, RunStart, States
from mtl_dist.checkpoint.rundir import release_run_dirs
from mtl_dist.config import JobConfig, load_config
from mtl_dist.data.admission import admitted_masks, count_training_ids
from mtl_dist.data.loaders import build_loader, build_readers, check_splits, validation_loader
from mtl_dist.data.reader import ParquetBatchReader, describe
from mtl_dist.data.source import check_filters
from mtl_dist.distributed.setup import DistInfo, describe_binding, destroy, init_distributed
from mtl_dist.distributed.sharding import describe_plan, shard_model
from mtl_dist.loop import preempt
from mtl_dist.loop.guard import NonFiniteWatch
from mtl_dist.loop.losses import ModelWithLoss, build_model_with_loss
from mtl_dist.loop.multi_epoch import begin_epoch
from mtl_dist.loop.optim import build_optimizer, dense_optimizer
from mtl_dist.loop.polarization import react
from mtl_dist.loop.precision import set_up_precision
from mtl_dist.loop.preempt import Preempted
from mtl_dist.loop.schedule import LRSchedule
from mtl_dist.loop.selection import fmt_metric
from mtl_dist.loop.state import LoopState
from mtl_dist.loop.step import StepRunner, TrainStep
from mtl_dist.models.build import build_ranker
from mtl_dist.observe.summary import report, summarize
from mtl_dist.observe.telemetry import Telemetry, quiet_third_party_logs
from mtl_dist.observe.validation import evaluate, flat_metrics, report_attribution


def seed_everything(seed: int) -> None:
    """Same seed on every rank: dense init is identical (DDP also broadcasts rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(path: str) -> None:
    """Fail at start-up, on every rank, when the run directory cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"train.output_dir {path!r} is not writable: {e}") from None


@dataclass
class Job:
    """What the build stages made, for the loop: the readers, the model with its loss (plain
    and DMP-wrapped), the step, the optimizers and the runner."""

    cfg: JobConfig
    info: DistInfo
    train_reader: ParquetBatchReader
    val_reader: ParquetBatchReader
    loss_module: ModelWithLoss
    step_fn: TrainStep
    model: torch.nn.Module
    plan: Any
    optimizer: torch.optim.Optimizer
    runner: StepRunner
    watch: NonFiniteWatch  # the guard's host side: stops on non-finite steps, sees SIGTERM
    ckpt: Checkpointer  # when to save, saving, loading

    def log(self, *a: object) -> None:
        if self.info.is_main:
            print(*a, flush=True)


def build_job(cfg: JobConfig, info: DistInfo, start: RunStart) -> Job:
    """Data → model → step → precision → sharding → optimizers → runner → checkpointer."""
    log = print if info.is_main else (lambda *a, **k: None)
    # --- data: each rank reads its own contiguous share of the rows; feature admission's
    # counts first (the whole training split, on every rank; {} without admission)
    counts = count_training_ids(cfg)
    train_reader, val_reader = build_readers(cfg, info, admitted_masks(cfg.features.sparse, counts))
    log(f"[data] train: {describe(train_reader)}\n[data] val:   {describe(val_reader)}")
    check_splits(cfg, val_reader, info)
    # --- model: tables on meta, sharded by the planner; dense part under DDP
    loss_module = build_model_with_loss(build_ranker(cfg, "meta", info.world_size), cfg)
    if counts:  # travels in the model's state: checkpoints, export, scoring, serving
        loss_module.model.id_counts.set(counts)
    step_fn = TrainStep(loss_module, cfg.train.on_nonfinite)  # the guard's gate goes in here
    precision = set_up_precision(cfg, loss_module.model, step_fn.switch, info.device)
    log(
        f"[precision] dense {precision.name} ({precision.reason}); tables {cfg.embedding.data_type}"
    )
    if cfg.optim.embedding_weight_decay and info.device.type != "cuda":
        raise ValueError(
            "optim.embedding_weight_decay: fbgemm's CPU kernels ignore weight decay (measured in "
            "tests/distributed/test_embedding_weight_decay.py); use model.embedding.l2 on CPU"
        )
    model, plan = shard_model(loss_module, cfg.sharding, cfg.optim, info)
    log(
        f"[model] world {info.world_size} on {info.device} ({info.backend}), "
        f"{torch.get_num_threads()} threads per rank, {describe_binding(info)}; "
        f"sharding plan:\n{describe_plan(plan)}"
    )
    optimizer = build_optimizer(cfg.optim, model, step_fn.switch)
    loss_module.balancer.attach(dense_optimizer(optimizer))
    dict(optimizer.optimizers)["dense"].before_step.append(loss_module.balancer.before_step)
    runner = StepRunner(model, optimizer, info.device, step_fn, cfg.sharding.pipeline)
    # the non-finite guard's flags, read on the host only where that costs no sync
    watch = NonFiniteWatch(cfg, info, step_fn.switch, log)
    states = States(model, optimizer, train_reader, runner.trained)
    ckpt = Checkpointer(start.root, cfg, states, start, log)
    return Job(cfg, info, train_reader, val_reader, loss_module, step_fn, model,
               plan, optimizer, runner, watch, ckpt)  # fmt: skip


def validate(
    job: Job, state: LoopState, telemetry: Telemetry, at: int, epoch_after: int, done: bool,
    saved: Path | None,
) -> bool:  # fmt: skip
    """Validate at step ``at``; track the best (a checkpoint of a new best, ``best`` pointing
    at it); returns whether to stop early."""
    cfg, tracker = job.cfg, state.tracker
    loader = validation_loader(job.val_reader, cfg.data)
    state.metrics, state.undefined = evaluate(job.model, cfg, loader, job.info.device)
    telemetry.monitor.scalars(at, flat_metrics(state.metrics), main_only=True)
    state.history.append({"step": at, "metrics": state.metrics, "undefined": state.undefined})
    if cfg.monitor.attribution:
        report_attribution(cfg, job.loss_module.model, job.val_reader, job.info,
                           telemetry.monitor, at)  # fmt: skip
    if tracker.enabled and tracker.update(at, state.metrics):
        tracker.checkpoint = f"step_{at:08d}"
        saved = saved or job.ckpt.save(state, at, epoch_after, done)
        job.ckpt.mark_best(saved)
        job.log(f"[best] {tracker.name} = {fmt_metric(tracker.value)} at step {at}: {saved}")
    elif tracker.enabled and (note := tracker.undefined_note(at, state.metrics, state.undefined)):
        job.log(note)  # one class in validation, ...: no improvement, never a number
    if tracker.stop:
        job.log(
            f"[early stop] {tracker.name} has not improved in "
            f"{tracker.since} validations (best {tracker.describe_best()})"
        )
        if saved is None and job.ckpt.due(at, end=True):
            job.ckpt.save(state, at, epoch_after, done)
    return tracker.stop


def run_segment(job: Job, state: LoopState, telemetry: Telemetry, schedule: LRSchedule,
                batches, segment_end: int) -> None:  # fmt: skip
    """Train up to step ``segment_end`` (or a preemption on some rank)."""
    start = state.step
    cfg, head = job.cfg, job.loss_module.model.head
    for out in job.runner.run(telemetry.batches(itertools.islice(batches, segment_end - start))):
        state.step += 1
        flush = state.step == segment_end
        job.watch.step(state.step, out.nonfinite, out.skipped, telemetry.monitor.scalars, flush)
        alarms = telemetry.step(state.step, out, flush=flush)
        if alarms:
            react(cfg.monitor.on_polarization, alarms, telemetry.gates.dropout_acts, head, job.log)
        schedule.apply(state.step + 1)  # the rates of the next step
        if job.watch.preempted:  # SIGTERM on some rank: every rank stops after this step
            break
    if state.step == start:
        raise RuntimeError(f"training data ended early at step {start} (expected {segment_end})")


def run_epochs(job: Job, state: LoopState, telemetry: Telemetry, total: int,
               resumed: bool) -> None:  # fmt: skip
    """The loop: segments end at validation / checkpoint steps and at epoch ends; a checkpoint
    is saved before its validation (a failing validation costs only the validation)."""
    cfg, reader, ckpt = job.cfg, job.train_reader, job.ckpt
    val_every = cfg.train.val_every or len(reader)
    schedule = LRSchedule(cfg.optim, job.optimizer, total)  # a function of the step
    schedule.apply(state.step + 1)
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.step >= total or state.stop:
            break
        if epoch != state.epoch or not resumed:
            reader.start_pass()
        begin_epoch(cfg, job.model, job.optimizer, state, epoch, job.log)  # train.multi_epoch
        pass_end = state.step + reader.steps_left()  # this epoch's last step
        epoch_end = min(pass_end, total)
        batches = iter(build_loader(reader, cfg.data))
        while state.step < epoch_end and not state.stop:
            boundaries = [epoch_end, (state.step // val_every + 1) * val_every]
            if (next_save := ckpt.next_due(state.step)) is not None:
                boundaries.append(next_save)
            run_segment(job, state, telemetry, schedule, batches, min(boundaries))
            step = state.step
            telemetry.pause(step)
            done = step == pass_end  # a finished epoch resumes at the next one's start
            due = ckpt.due(step, end=step == total, preempted=job.watch.preempted)
            saved = ckpt.save(state, step, epoch + done, done) if due else None
            if job.watch.preempted:
                telemetry.close()
                raise Preempted(step, str(saved))
            if step % val_every == 0 or step == epoch_end:
                state.stop = validate(job, state, telemetry, step, epoch + done, done, saved)
            telemetry.resume()


def total_steps(job: Job, state: LoopState, resumed: bool) -> int:
    """The step the run ends at: this pass's remaining steps, whole further epochs, capped by
    ``train.max_steps``; ``ValueError`` when a rank's share is less than one batch."""
    cfg, reader = job.cfg, job.train_reader
    per_epoch = len(reader)  # a full pass
    if per_epoch == 0:
        raise ValueError(
            f"{cfg.data.train_path}: fewer rows than one batch per rank "
            f"({reader.total_rows} rows, batch {cfg.train.batch_size}, world {job.info.world_size})"
        )
    total = state.step + (reader.steps_left() if resumed else per_epoch)
    total += per_epoch * (cfg.train.epochs - state.epoch - 1)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def train(cfg: JobConfig, info: DistInfo) -> dict[str, object]:
    """Train per ``cfg`` on this rank; returns the final validation metrics (same on all ranks)."""
    seed_everything(cfg.train.seed)
    log = print if info.is_main else (lambda *a, **k: None)
    check_writable(cfg.train.output_dir)

    # --- the run directory: this job's alone; what to resume from, decided before any write.
    # A run that ended (early stop, max_steps, all epochs) stays ended when relaunched with the
    # same command (a scheduler's retry): nothing is built, trained or written
    start = Checkpointer.open_run(cfg, log)
    if start.ended:
        return {"ended": start.finished}

    # --- build: data, model, the step, sharding, optimizers, the checkpointer; then resume
    job = build_job(cfg, info, start)
    state = job.ckpt.load()
    total = total_steps(job, state, job.ckpt.resumed is not None)
    telemetry = Telemetry(cfg, info, total - state.step, job.model, job.loss_module,
                          job.step_fn, job.optimizer, state.step)  # fmt: skip

    # a checkpoint written before its validation ran (a failed validation, a preemption
    # between them): validate that step now, as the uninterrupted run did
    if job.ckpt.unvalidated(state, cfg.train.val_every or len(job.train_reader)):
        state.stop = validate(job, state, telemetry, state.step, state.epoch, False,
                              job.ckpt.resumed)  # fmt: skip

    # --- the loop
    t0 = time.perf_counter()
    run_epochs(job, state, telemetry, total, job.ckpt.resumed is not None)
    if not state.metrics:  # resumed at the very end: report the final model all the same
        loader = validation_loader(job.val_reader, cfg.data)
        state.metrics, state.undefined = evaluate(job.model, cfg, loader, info.device)
    elapsed = time.perf_counter() - t0
    telemetry.close()

    # --- out: metrics.json and the summary, the run recorded as ended (finished.json)
    result = summarize(cfg, info, state, telemetry, job.plan, job.runner.trained_position, elapsed)
    if info.is_main:
        report(cfg, state, result)
    job.ckpt.finish(state, result["ended_by"])
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
    info = init_distributed(
        cfg.train.device, cfg.train.threads, cpu_affinity=cfg.train.cpu_affinity
    )
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
