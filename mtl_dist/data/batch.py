"""The model's input: one batch of dense features, sparse ids (a KJT) and per-task labels.

Shapes (legend: B batch, Dd dense features, T tasks)::

    dense   [B, Dd] float32
    sparse  KeyedJaggedTensor, keys = sparse feature names, one bag per (feature, row)
    labels  [B, T]  float32, 0 where missing
    mask    [B, T]  float32, 1 where the label exists (0 for missing labels and padding rows)
    truth   [B, T]  float32, the true probability / expected value where the data has it, else NaN

:class:`ArrowBatchConverter` turns a ``pyarrow.Table`` of B rows into a :class:`Batch`, checking
ids against the schema so bad data fails with the column named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from mtl_dist.config import SparseFeature, TaskSpec


@dataclass
class Batch(Pipelineable):
    """One training / validation batch; ``position`` is the reader position after it.

    ``position`` is ``(global_worker, rows_consumed)``: saving the position of the last batch
    actually trained (not the last one read) is what makes resume exact under a pipelined trainer.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor
    position: tuple[int, int] = field(default=(0, 0))

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def _map(self, fn) -> Batch:
        """A Batch with ``fn`` applied to every tensor (and the KJT); the position is kept."""
        return Batch(
            dense=fn(self.dense),
            sparse=fn(self.sparse),
            labels=fn(self.labels),
            mask=fn(self.mask),
            truth=fn(self.truth),
            position=self.position,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.sparse, self.labels, self.mask, self.truth):
            t.record_stream(stream)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


@dataclass
class Columns:
    """Decoded host columns of n rows, cut into batches by :meth:`slice` without copying.

    ``ids[f]`` holds feature f's flat ids and ``offsets[f]`` ``[n + 1]`` indexes into it (row i's
    bag is ``ids[f][offsets[f][i]:offsets[f][i + 1]]``); dense ``[n, Dd]``; labels, mask, truth
    ``[n, T]``. Decoding a chunk of many batches at once pays Arrow's per-call costs once.
    """

    ids: list[np.ndarray]
    offsets: list[np.ndarray]
    dense: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    truth: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.dense.shape[0]

    def slice(self, start: int, stop: int) -> Columns:
        """Rows ``[start, stop)`` as views (offsets keep pointing into the same id arrays)."""
        return Columns(
            self.ids,
            [off[start : stop + 1] for off in self.offsets],
            self.dense[start:stop],
            self.labels[start:stop],
            self.mask[start:stop],
            self.truth[start:stop],
        )

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        """Rows of ``parts`` one after another (copies)."""
        if len(parts) == 1:
            return parts[0]
        ids, offsets = [], []
        for f in range(len(parts[0].ids)):
            chunks = [p.ids[f][p.offsets[f][0] : p.offsets[f][-1]] for p in parts]
            lens = np.concatenate([np.diff(p.offsets[f]) for p in parts])
            ids.append(np.concatenate(chunks))
            offsets.append(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Columns(ids, offsets, cat("dense"), cat("labels"), cat("mask"), cat("truth"))


class ArrowBatchConverter:
    """Turns Arrow rows into a :class:`Batch` following the configured schema.

    Single-hot columns hold int64 ids (a null is an empty bag); multi-hot columns hold
    ``list<int64>``. With ``hash_buckets`` ids are taken modulo the bucket count; otherwise an
    id outside ``[0, vocab_size)`` raises ``ValueError`` naming the column and the value.

    Example::

        conv = ArrowBatchConverter([SparseFeature("item", vocab_size=10)], ["price"],
                                   [TaskSpec("click", label="click")])
        batch = conv(pa.table({"item": [1, 2], "price": [0.5, 1.0], "click": [0, 1]}))
        batch.dense.shape  # torch.Size([2, 1])
    """

    def __init__(
        self, sparse: list[SparseFeature], dense: list[str], tasks: list[TaskSpec]
    ) -> None:
        self.sparse = sparse
        self.dense = dense
        self.tasks = tasks
        self.keys = [f.name for f in sparse]

    @property
    def columns(self) -> list[str]:
        """The Parquet columns this converter reads."""
        cols = [f.name for f in self.sparse] + list(self.dense)
        for t in self.tasks:
            cols += [t.label] + ([t.truth] if t.truth else [])
        return list(dict.fromkeys(cols))

    def _ids(self, f: SparseFeature, col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids and per-row bag lengths of one sparse column."""
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int32)
            flat = arr.flatten()
            if flat.null_count:
                raise ValueError(f"column '{f.name}': null id inside a list")
            ids = flat.to_numpy(zero_copy_only=False)
        elif pa.types.is_integer(arr.type):
            if arr.null_count:
                valid = arr.is_valid().to_numpy(zero_copy_only=False)
                ids = arr.drop_null().to_numpy()
                lengths = valid.astype(np.int32)
            else:
                ids = arr.to_numpy()
                lengths = np.ones(len(arr), dtype=np.int32)
        else:
            raise ValueError(
                f"column '{f.name}': expected integer ids or a list of them, got {arr.type}"
            )
        ids = ids.astype(np.int64, copy=False)
        if f.hash_buckets:
            ids = np.mod(ids, f.hash_buckets)
        elif ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= f.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"column '{f.name}': id {bad} outside [0, {f.vocab_size}) "
                    "(raise vocab_size or set hash_buckets)"
                )
        return ids, lengths

    def decode(self, table: pa.Table) -> Columns:
        """Arrow rows → host :class:`Columns` (one pass per column; errors name the column)."""
        n = table.num_rows
        ids, offsets = [], []
        for f in self.sparse:
            flat, lens = self._ids(f, table.column(f.name))
            ids.append(flat)
            offsets.append(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))
        dense = np.zeros((n, len(self.dense)), dtype=np.float32)
        for j, name in enumerate(self.dense):
            col = table.column(name)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                raise ValueError(f"column '{name}': expected a number, got {col.type}")
            dense[:, j] = pc.fill_null(col, 0).to_numpy()
        t = len(self.tasks)
        labels = np.zeros((n, t), dtype=np.float32)
        mask = np.ones((n, t), dtype=np.float32)
        truth = np.full((n, t), np.nan, dtype=np.float32)
        for j, task in enumerate(self.tasks):
            col = table.column(task.label)
            if col.null_count:
                mask[:, j] = col.is_valid().to_numpy(zero_copy_only=False)
            y = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.float32)
            labels[:, j] = (
                np.log1p(y) if task.kind == "regression" and task.transform == "log1p" else y
            )
            if task.truth:
                truth[:, j] = pc.fill_null(table.column(task.truth), np.nan).to_numpy(
                    zero_copy_only=False
                )
        return Columns(ids, offsets, dense, labels, mask, truth)

    def to_batch(self, cols: Columns, pad_to: int = 0, position: tuple[int, int] = (0, 0)) -> Batch:
        """Columns of n rows → a Batch of ``max(n, pad_to)`` rows; pad rows are masked empty bags."""
        n = cols.num_rows
        pad = max(n, pad_to) - n
        values, lengths = [], []
        for flat, off in zip(cols.ids, cols.offsets):
            values.append(flat[off[0] : off[-1]])
            lens = np.diff(off).astype(np.int32)
            lengths.append(np.pad(lens, (0, pad)) if pad else lens)
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
        )

        def rows(x: np.ndarray, fill: float) -> torch.Tensor:
            x = (
                np.pad(x, ((0, pad), (0, 0)), constant_values=fill)
                if pad
                else np.ascontiguousarray(x)
            )
            return torch.from_numpy(x)

        return Batch(
            dense=rows(cols.dense, 0.0),
            sparse=sparse,
            labels=rows(cols.labels, 0.0),
            mask=rows(cols.mask, 0.0),
            truth=rows(cols.truth, np.nan),
            position=position,
        )

    def __call__(
        self, table: pa.Table, pad_to: int = 0, position: tuple[int, int] = (0, 0)
    ) -> Batch:
        """Convert ``table`` (n rows) into a Batch of ``max(n, pad_to)`` rows; pad rows are masked."""
        return self.to_batch(self.decode(table), pad_to, position)
