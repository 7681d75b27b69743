"""The two readers of a job and their loaders: the training reader (ragged batches dropped,
sample weights read) and the validation reader (padded, every row counted, truth and the GAUC
group read), each rank's contiguous share of the rows; and the start-up checks of the splits.
"""

from __future__ import annotations

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mtl_dist.config import DataConfig, JobConfig
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import (
    ParquetBatchReader,
    list_parquet_files,
    overlap_warning,
    require_selected,
)
from mtl_dist.data.source import RowFilter
from mtl_dist.distributed.setup import DistInfo


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


def build_readers(
    cfg: JobConfig, info: DistInfo, admitted: dict[str, np.ndarray] | None = None
) -> tuple[ParquetBatchReader, ParquetBatchReader]:
    """Training reader (drops ragged batches; reads sample weights, not the oracle's truth) and
    validation reader (pads them so every row counts; reads truth and the GAUC group column,
    not sample weights). A file needs only the columns its reader uses. ``admitted``: feature
    admission's masks (:func:`mtl_dist.data.admission.admitted_masks`), both readers map by."""

    def reader(path: str, training: bool) -> ParquetBatchReader:
        converter = ArrowBatchConverter(
            cfg.features.sparse, cfg.features.dense, cfg.tasks,
            group_by="" if training else cfg.train.gauc_by, dense_nan=cfg.data.dense_nan,
            sample_weights=training, truth=not training, hash_seed=cfg.data.hash_seed,
            admitted=admitted,
            sequences=cfg.features.sequence,
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
