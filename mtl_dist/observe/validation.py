"""Validation: the whole validation set on every rank → metrics over all ranks
(:func:`evaluate`), their TensorBoard names, and the per-task feature attribution report."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mtl_dist.config import JobConfig
from mtl_dist.data.loaders import validation_loader
from mtl_dist.data.reader import ParquetBatchReader
from mtl_dist.distributed.setup import DistInfo
from mtl_dist.observe.attribution import attribution_figure, feature_attribution, write_attribution
from mtl_dist.observe.metrics import compute_metrics
from mtl_dist.observe.telemetry import Monitor


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
