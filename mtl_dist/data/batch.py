"""The model's input: one batch of dense features, sparse ids (a KJT) and per-task labels.

Shapes (legend: B batch, Dd dense features, T tasks)::

    dense   [B, Dd] float32
    sparse  KeyedJaggedTensor, keys = sparse feature names, one bag per (feature, row)
    labels  [B, T]  float32, 0 where missing
    mask    [B, T]  float32, the row's loss weight for the task: 1 (or its sample weight) where
                    the label counts, 0 for missing / invalid / unconditioned labels and padding
    truth   [B, T]  float32, the true probability / expected value where the data has it, else NaN
    group   [B]     int64, the GAUC group id (``train.gauc_by``), else 0
    floats  [B, W]  float32, the sequences' float side columns (``float_side_columns``), each
                    sequence's block ``L · C`` wide (position-major, left-aligned as its ids,
                    0 on padding), in config order; None when no sequence has any

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

from mtl_dist.config import SequenceFeature, SparseFeature, TaskSpec
from mtl_dist.config.sequence import sequence_parts
from mtl_dist.data.admission import admit
from mtl_dist.data.ids import sparse_ids
from mtl_dist.data.schema import check_schema
from mtl_dist.data.sequence import aligned_floats, aligned_ids


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
    group: torch.Tensor
    position: tuple[int, int] = field(default=(0, 0))
    floats: torch.Tensor | None = None

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
            group=fn(self.group),
            position=self.position,
            floats=fn(self.floats) if self.floats is not None else None,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.sparse, self.labels, self.mask, self.truth, self.group):
            t.record_stream(stream)
        if self.floats is not None:
            self.floats.record_stream(stream)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


@dataclass
class Columns:
    """Decoded host columns of n rows, cut into batches by :meth:`slice` without copying.

    ``ids[f]`` holds feature f's flat ids and ``offsets[f]`` ``[n + 1]`` indexes into it (row i's
    bag is ``ids[f][offsets[f][i]:offsets[f][i + 1]]``); dense ``[n, Dd]``; labels, mask, truth
    ``[n, T]``; group ``[n]``; floats ``[n, W]`` (the sequences' float side columns, W = 0
    without). Decoding a chunk of many batches at once pays Arrow's per-call costs once.
    """

    ids: list[np.ndarray]
    offsets: list[np.ndarray]
    dense: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    truth: np.ndarray
    group: np.ndarray
    floats: np.ndarray

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
            self.group[start:stop],
            self.floats[start:stop],
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
        return Columns(
            ids,
            offsets,
            *(cat(name) for name in ("dense", "labels", "mask", "truth", "group", "floats")),
        )


class ArrowBatchConverter:
    """Turns Arrow rows into a :class:`Batch` following the configured schema.

    Single-hot columns hold integer ids (a null is an empty bag); multi-hot columns hold
    ``list<int64>``. With ``hash_buckets`` ids are taken modulo the bucket count. Otherwise an id
    outside ``[0, vocab_size)`` (and, for every feature, a null inside a list) is handled by the
    feature's ``invalid_ids``: ``error`` raises ``ValueError`` naming the column, an example and
    the count; ``clip`` clamps into ``[0, vocab_size - 1]``; ``hash`` takes ``id mod vocab_size``;
    ``drop`` removes the id from its bag. Nulls inside lists are dropped by all but ``error``.

    Dense: nulls read as 0; NaN / ±inf raise ``ValueError`` naming the column, or read as 0 with
    ``dense_nan = "zero"``. A column of the wrong type (strings as ids or dense values, floats as
    ids) raises naming the column.

    Labels: null, NaN and the task's ``missing_values`` are masked; a label outside the task's
    domain (binary not 0/1, an infinite target, log1p of a value ≤ -1) raises ``ValueError``
    naming the column, or is masked with ``on_invalid = "mask"``. A task with a ``condition``
    counts only where that task's label is 1; ``sample_weight`` scales the row's mask.
    ``sequences``: list columns joining the KJT after the sparse features (data/sequence.py).

    Example::

        conv = ArrowBatchConverter([SparseFeature("item", vocab_size=10)], ["price"],
                                   [TaskSpec("click", label="click")])
        batch = conv(pa.table({"item": [1, 2], "price": [0.5, 1.0], "click": [0, 1]}))
        batch.dense.shape  # torch.Size([2, 1])
    """

    def __init__(
        self,
        sparse: list[SparseFeature],
        dense: list[str],
        tasks: list[TaskSpec],
        group_by: str = "",
        dense_nan: str = "error",
        sample_weights: bool = True,
        truth: bool = True,
        hash_seed: int = 0,
        admitted: dict[str, np.ndarray] | None = None,
        sequences: list[SequenceFeature] | None = None,
    ) -> None:
        self.sparse = sparse
        self.admitted = dict(admitted or {})  # admission: feature → [id_rows] bool (kept rows)
        self.sequences = list(sequences or [])
        self.tables = {f.table_name: f for f in reversed(sparse)}  # a table's first feature
        self.parts = [sequence_parts(s, sparse) for s in self.sequences]
        self.dense = dense
        self.dense_nan = dense_nan
        self.tasks = tasks
        self.group_by = group_by
        self.use_sample_weights = sample_weights
        self.use_truth = truth
        self.hash_seed = hash_seed
        self.keys = [f.name for f in sparse] + [p.key for ps in self.parts for p in ps]
        names = [t.name for t in tasks]
        self.conditions = [names.index(t.condition) if t.condition else -1 for t in tasks]

    @property
    def columns(self) -> list[str]:
        """The Parquet columns this converter reads."""
        cols = [f.name for f in self.sparse] + [p.column for ps in self.parts for p in ps]
        cols += [c for s in self.sequences for c in s.float_side_columns]
        cols += list(self.dense)
        for t in self.tasks:
            cols.append(t.label)
            cols += [t.truth] if t.truth and self.use_truth else []
            cols += [t.sample_weight] if t.sample_weight and self.use_sample_weights else []
        cols += [self.group_by] if self.group_by else []
        return list(dict.fromkeys(cols))

    def check_schema(self, schema: pa.Schema) -> None:
        """Raise ``ValueError`` naming the first column whose Arrow type this converter rejects
        (see :func:`mtl_dist.data.schema.check_schema`)."""
        check_schema(self, schema)

    def _ids(self, f: SparseFeature, col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids and per-row bag lengths of one sparse column (see :func:`sparse_ids`), rare
        ids on the shared row where the feature has admission (:func:`admit`)."""
        ids, lengths = sparse_ids(f, col, self.hash_seed)
        return (admit(ids, self.admitted[f.name]) if f.name in self.admitted else ids), lengths

    def decode(self, table: pa.Table) -> Columns:
        """Arrow rows → host :class:`Columns` (one pass per column; errors name the column)."""
        n = table.num_rows
        ids, offsets = [], []
        for f in self.sparse:
            flat, lens = self._ids(f, table.column(f.name))
            ids.append(flat)
            offsets.append(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))
        floats = [np.zeros((n, 0), dtype=np.float32)]
        for s, ps in zip(self.sequences, self.parts):
            for flat, lens in aligned_ids(s, ps, self.tables, table, self.hash_seed):
                ids.append(flat)
                offsets.append(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))
            if s.float_side_columns:  # lens: the ids' kept lengths (the last part's equal them)
                floats.append(aligned_floats(s, table, lens))
        dense = np.zeros((n, len(self.dense)), dtype=np.float32)
        for j, name in enumerate(self.dense):
            dense[:, j] = _numbers(table.column(name), name, 0.0)
        bad = ~np.isfinite(dense)
        if bad.any():  # NaN, ±inf, or a float64 beyond float32's range
            if self.dense_nan == "error":
                j = int(bad.any(axis=0).argmax())
                stored = _numbers(table.column(self.dense[j]), self.dense[j], 0.0, np.float64)
                raise ValueError(
                    f"column '{self.dense[j]}': {int(bad[:, j].sum())} dense value(s) not finite "
                    f"in float32, e.g. {float(stored[bad[:, j]][0])!r} (fix the data or set "
                    "data.dense_nan = 'zero')"
                )
            dense[bad] = 0.0
        t = len(self.tasks)
        labels = np.zeros((n, t), dtype=np.float32)
        observed = np.zeros((n, t), dtype=bool)
        truth = np.full((n, t), np.nan, dtype=np.float32)
        for j, task in enumerate(self.tasks):
            labels[:, j], observed[:, j] = self._labels(task, table.column(task.label))
            if task.truth and self.use_truth:
                truth[:, j] = self._truth(task, table.column(task.truth))
        mask = observed.astype(np.float32)
        for j, (task, c) in enumerate(zip(self.tasks, self.conditions)):
            if c >= 0:  # e.g. conversion counts only where click == 1
                mask[:, j] *= observed[:, c] & (labels[:, c] == 1)
            if task.sample_weight and self.use_sample_weights:
                mask[:, j] *= self._sample_weights(table.column(task.sample_weight), task)
        group = (
            _numbers(table.column(self.group_by), self.group_by, 0, np.int64, integer=True)
            if self.group_by
            else np.zeros(n, dtype=np.int64)
        )
        return Columns(ids, offsets, dense, labels, mask, truth, group, np.concatenate(floats, 1))

    @staticmethod
    def _labels(task: TaskSpec, col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """One task's labels ``[n]`` as float32 (0 where not observed, log1p applied) and
        observed ``[n]``.

        Invalid: binary not 0/1; regression not finite, ≤ -1 under log1p, or beyond float32's
        range after the transform (a finite float64 such as 1e39 would become inf in training).
        """
        y = _numbers(col, task.label, np.nan, np.float64)
        observed = ~np.isnan(y)
        for v in task.missing_values:
            observed &= y != v
        if task.kind == "binary":
            invalid = observed & (y != 0) & (y != 1)
            target = y
        else:
            invalid = observed & ~np.isfinite(y)
            if task.transform == "log1p":
                invalid |= observed & (y <= -1)
            with np.errstate(invalid="ignore", divide="ignore"):
                target = np.log1p(y) if task.transform == "log1p" else y
            invalid |= observed & ~invalid & ~_fits_float32(target)
        if invalid.any():
            if task.on_invalid == "error":
                bad = y[invalid]
                domain = "0 or 1" if task.kind == "binary" else "a finite number"
                if task.kind == "regression" and task.transform == "log1p":
                    domain += " > -1 (log1p)"
                if task.kind == "regression":
                    domain += f" within float32's range (|y| <= {FLOAT32_MAX:.3g} after transform)"
                raise ValueError(
                    f"column '{task.label}' (task {task.name}): {bad.size} label(s) are not "
                    f"{domain}, e.g. {float(bad[0])!r} (fix the data, list the value in "
                    "missing_values, or set on_invalid = 'mask')"
                )
            observed &= ~invalid
        return np.where(observed, target, 0.0).astype(np.float32), observed

    @staticmethod
    def _sample_weights(col: pa.ChunkedArray, task: TaskSpec) -> np.ndarray:
        """Per-row loss weights ``[n]``: finite, ≥ 0 and within float32's range, else an error."""
        w = _numbers(col, task.sample_weight, np.nan, np.float64)
        bad = ~(np.isfinite(w) & (w >= 0) & _fits_float32(w))
        if bad.any():
            raise ValueError(
                f"column '{task.sample_weight}' (sample weights of task {task.name}): "
                f"{int(bad.sum())} value(s) null, negative, not finite or beyond float32's range, "
                f"e.g. {float(w[bad][0])!r}"
            )
        return w.astype(np.float32)

    @staticmethod
    def _truth(task: TaskSpec, col: pa.ChunkedArray) -> np.ndarray:
        """The true probability / expected value ``[n]`` (NaN where null) for the oracle
        metrics; a value that is not finite in float32 (or, for a binary task, outside [0, 1])
        raises naming the column."""
        t = _numbers(col, task.truth, np.nan, np.float64)
        known = ~np.isnan(t)
        ok = _fits_float32(t) & ((t >= 0) & (t <= 1) if task.kind == "binary" else True)
        bad = known & ~ok
        if bad.any():
            domain = "a probability in [0, 1]" if task.kind == "binary" else "finite in float32"
            raise ValueError(
                f"column '{task.truth}' (truth of task {task.name}): {int(bad.sum())} value(s) "
                f"not {domain}, e.g. {float(t[bad][0])!r}"
            )
        return t.astype(np.float32)

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
            group=torch.from_numpy(np.pad(cols.group, (0, pad)) if pad else cols.group.copy()),
            position=position,
            floats=rows(cols.floats, 0.0) if cols.floats.shape[1] else None,
        )

    def __call__(
        self, table: pa.Table, pad_to: int = 0, position: tuple[int, int] = (0, 0)
    ) -> Batch:
        """Convert ``table`` (n rows) into a Batch of ``max(n, pad_to)`` rows; pad rows are masked."""
        return self.to_batch(self.decode(table), pad_to, position)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fits_float32(x: np.ndarray) -> np.ndarray:
    """Where float64 ``x`` stays finite when cast to float32 (NaN: False)."""
    with np.errstate(invalid="ignore"):
        return np.abs(x) <= FLOAT32_MAX


def _numbers(
    col: pa.ChunkedArray,
    name: str,
    null: float,
    dtype: type = np.float32,
    integer: bool = False,
) -> np.ndarray:
    """A numeric column as a numpy array ``[n]``, nulls as ``null``; other types name the column."""
    ok = pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)
    if not (ok or (pa.types.is_floating(col.type) and not integer)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"column '{name}': expected {kind}, got {col.type}")
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: callers check
        out = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if col.null_count:
        out = out.copy()
        out[~col.is_valid().to_numpy(zero_copy_only=False)] = null
    return out
