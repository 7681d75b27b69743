"""The served program's behaviour sequences: the trained EC table as a plain tensor, the
candidates' rows and each sequence taken as values + offsets, clipped to its last ``max_len``
ids as training's reader clips it, padded and pooled by the trained attention (eval mode).

What training sees and this module sees differ in one place: under ``invalid_ids = "drop"`` the
reader removes an out-of-range id before keeping the last ``max_len``; the program (whose
:class:`~mtl_dist.serve.lookups.IdRemap` maps it to the padding row) masks it after clipping. A
list with at most ``max_len`` ids, or without out-of-range ids, is scored alike.

A sequence's ``float_side_columns`` are inputs too (after every id input, :func:`served_floats`):
float32 values + int64 offsets each, clipped to the last ``max_len`` values as the ids are, then
the trained :class:`~mtl_dist.models.sequence.FloatSide` (its ``float_transform``) added to the
keys under the ids' mask, as training's model adds ``Batch.floats``. The program checks those
inputs itself (:meth:`ServedSequences.check_floats`: ``torch._assert_async``, kept by
``torch.export`` and AOTInductor): every value finite (and not negative under ``log1p``: the
reader's :func:`~mtl_dist.data.sequence.float_rule`), the offsets equal to the ids' offsets and
as many values as the last offset; a bad input raises ``RuntimeError`` naming it.

Legend: ``B`` batch, ``L`` max_len, ``D`` the table width, ``N_f`` ids (or values) of input f,
``C`` a sequence's float side columns.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from mtl_dist.config import SequenceFeature, SparseFeature
from mtl_dist.config.sequence import sequence_parts
from mtl_dist.data.sequence import as_sparse, float_rule
from mtl_dist.models.sequence import SequenceLookup


def served_features(
    sparse: list[SparseFeature], sequences: list[SequenceFeature]
) -> list[SparseFeature]:
    """The program's id inputs in order: the sparse features, then each sequence's id lists
    (its ids, then its side columns: :func:`~mtl_dist.config.sequence.sequence_parts`), each
    read as a multi-hot feature of its table (its id rules)."""
    tables = {f.table_name: f for f in sparse}
    return list(sparse) + [
        dataclasses.replace(as_sparse(s, tables[p.table]), name=p.key)
        for s in sequences
        for p in sequence_parts(s, sparse)
    ]


def served_floats(sequences: list[SequenceFeature]) -> list[tuple[str, str, SequenceFeature]]:
    """The program's float inputs in order (after every id input of :func:`served_features`):
    ``(key, column, sequence)`` per float side column, sequence by sequence, the key
    ``<sequence>/<column>``."""
    return [(f"{s.name}/{c}", c, s) for s in sequences for c in s.float_side_columns]


def ec_rows(lookup: SequenceLookup | None, feature: str) -> int | None:
    """Rows of the EC table ``feature`` (a candidate or a sequence) reads; None if in none."""
    for cfg in lookup.ec.embedding_configs() if lookup is not None else []:
        if feature in cfg.feature_names:
            return cfg.num_embeddings
    return None


class ServedSequences(nn.Module):
    """``(rows, offsets)`` per program input → ``[B, (C + S) · D]``: the candidates' rows (0
    for an empty bag), then each sequence pooled, as :class:`SequenceLookup` computes them.

    Args:
        lookup: the trained (unsharded) lookup; its EC's tables are copied, one zero padding row
            appended to each (the row :class:`~mtl_dist.serve.lookups.IdRemap` maps dropped
            ids to).
        inputs: the program's id input names in order (:func:`served_features`' names: a
            sequence's id lists by their KJT keys).

    The float inputs follow in :func:`served_floats`' order of ``lookup``'s sequences.
    """

    def __init__(self, lookup: SequenceLookup, inputs: list[str]) -> None:
        super().__init__()
        tables = lookup.ec.embedding_configs()
        self.table_of: dict[str, int] = {}
        for i, cfg in enumerate(tables):
            w = lookup.ec.embeddings[cfg.name].weight.detach().float()
            self.register_buffer(f"w{i}", torch.cat([w, w.new_zeros(1, w.shape[1])]))
            self.table_of.update({f: i for f in cfg.feature_names})
        self.candidates = [(inputs.index(c), self.table_of[c]) for c in lookup.candidates]
        self.cand_names = list(lookup.candidates)
        self.seqs = [
            [(inputs.index(p.key), self.table_of[p.key], p.query) for p in ps]
            for ps in lookup.parts
        ]
        self.max_lens = [s.max_len for s in lookup.sequences]
        self.poolings = copy.deepcopy(lookup.poolings).eval()
        float_inputs = served_floats(lookup.sequences)
        order = [(q.name, c) for _, c, q in float_inputs]
        self.floats = [  # per sequence: its float inputs' indices, [] without float columns
            [order.index((s.name, c)) for c in s.float_side_columns] for s in lookup.sequences
        ]
        self.float_sides = copy.deepcopy(lookup.float_sides).eval()
        # per float input (served_floats' order): its name, its ids' input, its lowest value
        # (None: none) and float_transform
        self.float_checks = [
            (key, self.seqs[lookup.sequences.index(q)][0][0], float_rule(q)[0], q.float_transform)
            for key, _, q in float_inputs
        ]

    def check_floats(self, offsets: list[torch.Tensor], floats: list[torch.Tensor],
                     float_offsets: list[torch.Tensor]) -> None:  # fmt: skip
        """Assert (in the program: ``torch._assert_async``) each float input as the reader
        would have it: ``values/<key>`` all finite, and ``>= min`` where the sequence's
        :func:`~mtl_dist.data.sequence.float_rule` has one (``log1p``: 0); ``offsets/<key>``
        equal to its sequence's ids' offsets (``offsets`` ``[B + 1]``, row by row), its last
        as many as the values.

        Raises:
            RuntimeError: at run time, the first failing check's message, naming the input
                (e.g. ``values/hist/hist_age_s: a NaN or infinite value``).
        """
        for j, (key, ids_at, low, transform) in enumerate(self.float_checks):
            v, o = floats[j], float_offsets[j]
            torch._assert_async(torch.isfinite(v).all(), f"values/{key}: a NaN or infinite value")
            if low is not None:
                torch._assert_async(  # a NaN passes here: the check above names it
                    ~(v < low).any(),
                    f"values/{key}: a value below {low:g} (float_transform = '{transform}')",
                )
            torch._assert_async(
                (o == offsets[ids_at]).all(),
                f"offsets/{key}: not the offsets of its ids' input (lists as long as the ids')",
            )
            torch._assert_async(
                o[-1] == v.shape[0], f"offsets/{key}: its last offset is not the values' count"
            )

    def _table(self, i: int) -> torch.Tensor:
        return getattr(self, f"w{i}")

    def forward(
        self,
        rows: list[torch.Tensor],
        offsets: list[torch.Tensor],
        floats: list[torch.Tensor] | None = None,
        float_offsets: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``rows`` / ``offsets``: per id input ``[N_f]`` / ``[B + 1]``; ``floats`` /
        ``float_offsets``: per float input ``[N_f]`` float32 / ``[B + 1]`` int64 (each list as
        long as its sequence's ids, row by row) → ``[B, (C + S) · D]``."""
        if self.float_checks:
            self.check_floats(offsets, floats, float_offsets)
        out = []
        for at, t in self.candidates:  # single-hot: the bag's first id, or the padding row
            ids, _ = _ids(rows[at], offsets[at], 1, self._table(t).shape[0] - 1)
            out.append(self._table(t)[ids[:, 0]])
        cand = dict(zip(self.cand_names, out))
        for i, (parts, max_len, pool) in enumerate(zip(self.seqs, self.max_lens, self.poolings)):
            keys, mask = [], None
            for at, t, _ in parts:  # side lists align with the ids: the ids' mask
                ids, m = _ids(rows[at], offsets[at], max_len, self._table(t).shape[0] - 1)
                keys.append(self._table(t)[ids])
                mask = m if mask is None else mask
            q = torch.cat([cand[query] for _, _, query in parts], dim=1)
            k = torch.cat(keys, dim=2)
            if self.floats[i]:  # [B, L, C], zeros after each list (as Batch.floats)
                block = torch.stack(
                    [_last(floats[j], float_offsets[j], max_len, 0.0)[0] for j in self.floats[i]],
                    dim=2,
                )
                k = k + self.float_sides[str(i)](block, mask)
            out.append(pool(q, k, mask, need_weights=False)[0])
        return torch.cat(out, dim=1)


def _last(values: torch.Tensor, offsets: torch.Tensor, max_len: int, fill: float):
    """Each bag's last ``max_len`` values, left-aligned: ``(kept [B, L], mask [B, L])``, the
    positions after a bag's length masked and read as ``fill``."""
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=max_len)
    pos = torch.arange(max_len, device=values.device)
    mask = pos.unsqueeze(0) < kept.unsqueeze(1)
    index = torch.where(mask, (offsets[1:] - kept).unsqueeze(1) + pos, values.shape[0])
    ext = torch.cat([values, values.new_full((1,), fill)])
    return ext[index], mask


def _ids(ids: torch.Tensor, offsets: torch.Tensor, max_len: int, pad: int):
    """:func:`_last` of rows ``[N]``: ``(rows [B, L], mask [B, L])``, padding and rows equal to
    ``pad`` (dropped ids) masked and read as ``pad``."""
    rows, mask = _last(ids, offsets, max_len, pad)
    return rows, mask & (rows != pad)
