"""The program's id rules and embedding lookups as plain modules: :class:`IdRemap` (raw integer
ids to table rows, training's id policies), :class:`RowwiseInt8Bag` (an int8 table) and
:class:`PooledEmbeddings` (one EmbeddingBagCollection's pooled lookups), nothing of TorchRec at
run time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mtl_dist.config import SparseFeature
from mtl_dist.data.ids import RAW_ID_SPACE
from mtl_dist.models.collision import managed_rows


class IdRemap(nn.Module):
    """Raw integer ids → table rows, feature by feature: the in-program part of each feature's
    id policy, as :func:`mtl_dist.data.ids.sparse_ids` applies it in training.

    Per feature: with ``hash_buckets`` N, ``id mod N`` (a string id arrives already hashed and
    reduced, so the modulo leaves it as it is); else by ``invalid_ids`` for ids outside
    ``[0, vocab_size)``: ``clip`` clamps, ``hash`` takes ``id mod vocab_size``, ``drop`` and
    ``error`` map the id to its table's padding row (``pad``: a zero row that pooling skips, as
    if the id were not in the bag). Under ``error`` a client refuses such ids before the program
    (see the metadata): the program never reads outside a table.

    A managed-collision feature (``collision = "managed"``) takes its raw id ``mod (2**63 - 1)``
    and maps it with :func:`mtl_dist.models.collision.managed_rows` over its table's trained
    remapping (``managed``): a kept id its row, any other the miss row of the rank that owned it.

    A feature with admission (``admit_min_count``) then maps each row id its trained counts
    did not admit to the shared row ``V`` (its id rows; the padding row is ``V + 1``), as
    training's :func:`mtl_dist.data.admission.admit` does.

    Args:
        features: the sparse features, in input order.
        pads: each feature's padding row (its table's trained row count).
        managed: per managed feature name, its table's ``(sorted raw ids [N], rows [N])``.
        buckets: the world size managed tables were trained at.
        admitted: per admitted feature name, which of its ``[V]`` row ids keep their row.

    Example::

        remap = IdRemap([SparseFeature("item", vocab_size=10, invalid_ids="drop")], [10])
        remap([torch.tensor([3, 12, -1])])   # [tensor([3, 10, 10])]
    """

    def __init__(
        self,
        features: list[SparseFeature],
        pads: list[int],
        managed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        buckets: int = 1,
        admitted: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.rules = [id_rule(f) for f in features]
        self.pads = list(pads)
        self.buckets = buckets
        self.admits = [f.name in (admitted or {}) for f in features]
        for i, f in enumerate(features):
            if self.admits[i]:
                self.register_buffer(f"admitted_{i}", torch.from_numpy(admitted[f.name]).clone())
            if f.collision == "managed":
                sorted_raw, rows = (managed or {})[f.name]
                self.register_buffer(f"sorted_raw_{i}", sorted_raw.clone())
                self.register_buffer(f"rows_{i}", rows.clone())

    def forward(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """``values``: per feature ``[N_f]`` int64 → rows ``[N_f]`` int64 in ``[0, pad]``."""
        out = []
        for i, (v, (kind, n), pad) in enumerate(zip(values, self.rules, self.pads)):
            if kind == "managed":
                raw = torch.remainder(v, n)
                sorted_raw, rows = getattr(self, f"sorted_raw_{i}"), getattr(self, f"rows_{i}")
                out.append(managed_rows(raw, sorted_raw, rows, self.buckets))
            elif kind == "mod":
                out.append(torch.remainder(v, n))
            elif kind == "clip":
                out.append(v.clamp(0, n - 1))
            else:  # drop: out-of-range ids read the zero padding row, skipped by the pooling
                out.append(torch.where((v >= 0) & (v < n), v, torch.full_like(v, pad)))
            if self.admits[i]:  # rows [0, n) not admitted: the shared row n (pad stays pad)
                rows = out[-1]
                kept = getattr(self, f"admitted_{i}")[rows.clamp(0, n - 1)]
                out[-1] = torch.where((rows < n) & ~kept, torch.full_like(rows, n), rows)
        return out


def id_rule(f: SparseFeature) -> tuple[str, int]:
    """A feature's in-program id rule: (managed | mod | clip | drop, its bound)."""
    if f.collision == "managed":
        return "managed", RAW_ID_SPACE
    if f.hash_buckets:
        return "mod", f.hash_buckets
    if f.invalid_ids == "hash":
        return "mod", f.vocab_size
    if f.invalid_ids == "clip":
        return "clip", f.vocab_size
    return "drop", f.vocab_size


class RowwiseInt8Bag(nn.Module):
    """An embedding bag over a row-wise int8 table: row r is ``q[r] · scale[r] + bias[r]``.

    Quantised from a float table ``[V, D]`` per row over its ``[min, max]`` (255 steps): the
    rounding error of an entry is at most ``(max − min) / 510``. Pools like
    ``nn.EmbeddingBag(mode, padding_idx=pad, include_last_offset=True)``: the padding row
    (all zero) is left out of sums and of a mean's count; an empty bag pools to 0.

    Args:
        weight: the float table ``[V, D]`` (its last row the padding row).
        mode: sum | mean.
        pad: the padding row's index.

    Example::

        bag = RowwiseInt8Bag(torch.randn(11, 4), "mean", pad=10)
        bag(torch.tensor([1, 2, 10]), torch.tensor([0, 2, 3]))   # [2, 4]
    """

    def __init__(self, weight: torch.Tensor, mode: str, pad: int) -> None:
        super().__init__()
        lo = weight.min(1, keepdim=True).values
        hi = weight.max(1, keepdim=True).values
        scale = (hi - lo) / 255.0
        q = torch.round((weight - lo) / scale.clamp_min(torch.finfo(torch.float32).tiny)) - 128
        self.register_buffer("q", q.clamp(-128, 127).to(torch.int8))  # [V, D]
        self.register_buffer("scale", scale.float())  # [V, 1]
        self.register_buffer("bias", (lo + 128 * scale).float())  # [V, 1]
        self.mode = mode
        self.pad = pad

    def dequantized(self) -> torch.Tensor:
        """The table as the program reads it, ``[V, D]`` float32."""
        return self.q.float() * self.scale + self.bias

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``ids`` ``[N]``, ``offsets`` ``[B + 1]`` → pooled ``[B, D]`` float32."""
        rows = self.q[ids].float() * self.scale[ids] + self.bias[ids]  # [N, D]
        keep = (ids != self.pad).float()  # [N]
        position = torch.arange(ids.shape[0], device=ids.device)
        bag = torch.searchsorted(offsets, position, right=True) - 1  # [N]: each id's bag
        b = offsets.shape[0] - 1
        pooled = rows.new_zeros(b, rows.shape[1]).index_add(0, bag, rows * keep[:, None])
        if self.mode == "mean":
            count = keep.new_zeros(b).index_add(0, bag, keep)
            pooled = pooled / count.clamp_min(1.0)[:, None]
        return pooled


class PooledEmbeddings(nn.Module):
    """The lookups of one EmbeddingBagCollection as plain modules: one bag per table, the
    features' pooled embeddings ``[B, Σ D]`` concatenated in ``order`` (the trained head's).

    Every table gets one extra, zero, row at its end — the padding row of :class:`IdRemap`.

    Args:
        ebcs: the trained (unsharded) collections (the plain and the managed-collision tables).
        features: the program's sparse features, in input order (a superset of the ebcs').
        order: the feature names whose pooled embeddings are concatenated, in that order.
        dtype: fp32 | fp16 | int8 storage of the served tables.
    """

    def __init__(
        self,
        ebcs: list[EmbeddingBagCollection],
        features: list[SparseFeature],
        order: list[str],
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        names = [f.name for f in features]
        self.table_of: dict[str, str] = {}
        self.bags = nn.ModuleDict()
        tables = [(cfg, ebc.state_dict()) for ebc in ebcs for cfg in ebc.embedding_bag_configs()]
        for i, (cfg, state) in enumerate(tables):
            trained = state[f"embedding_bags.{cfg.name}.weight"].detach().float()  # [V, D]
            weight = torch.cat([trained, trained.new_zeros(1, trained.shape[1])])  # + padding
            mode = "mean" if cfg.pooling.name == "MEAN" else "sum"
            key = f"t{i}"  # table names may hold characters a module name may not
            self.bags[key] = _bag(weight, mode, dtype)
            for f in cfg.feature_names:
                self.table_of[f] = key
        self.index = [names.index(f) for f in order]
        self.order = list(order)

    def forward(self, rows: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """``rows``, ``offsets``: per input feature (see :class:`IdRemap`) → ``[B, Σ D]``."""
        pooled = [
            self.bags[self.table_of[name]](rows[i], offsets[i]).float()
            for name, i in zip(self.order, self.index)
        ]
        return torch.cat(pooled, dim=1)


def _bag(weight: torch.Tensor, mode: str, dtype: str) -> nn.Module:
    """An ``nn.EmbeddingBag`` (fp32 | fp16) or :class:`RowwiseInt8Bag` over ``weight`` ``[V, D]``
    whose last row is the padding row."""
    pad = weight.shape[0] - 1
    if dtype == "int8":
        return RowwiseInt8Bag(weight, mode, pad)
    w = weight.half() if dtype == "fp16" else weight
    bag = nn.EmbeddingBag(
        w.shape[0], w.shape[1], mode=mode, include_last_offset=True, padding_idx=pad,
        _weight=w.clone(),
    )  # fmt: skip
    bag.weight.requires_grad_(False)
    return bag
