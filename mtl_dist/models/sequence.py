"""Behaviour sequences: un-pooled lookups in an ``EmbeddingCollection`` and target attention from
the candidate's embedding over them, pooled to one vector per row that joins the head's input.

- :class:`DINAttention`: DIN's local activation unit (Zhou et al., "Deep Interest Network for
  Click-Through Rate Prediction", KDD 2018, §4.3): ``w_i = MLP([q, k_i, q − k_i, q ⊙ k_i])``,
  not normalised by a softmax, 0 on padding; output ``Σ_i w_i · k_i``.
- :class:`MultiHeadTargetAttention`: the candidate as the single query of multi-head scaled
  dot-product attention (``torch.nn.functional.scaled_dot_product_attention``) with the padding
  mask; an empty history gives 0.
- :class:`MeanPooling`: the masked mean (the pooled baseline).
- :class:`FloatSide`: a sequence's float side columns (``[B, L, C]``, e.g. seconds since the
  event) transformed (``log1p``) and projected to the keys' width, added to the keys.
- :class:`SequenceLookup`: the EC holding the shared tables (sharded by DMP from outside, like
  the EBC), the candidates' rows taken from it, each sequence padded to ``max_len`` and pooled.

Legend: ``B`` batch, ``L`` max_len, ``D`` the table's embedding width, ``N`` ids in a batch,
``C`` a sequence's float side columns, ``P`` its id lists (ids and side columns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl_dist.config import SequenceFeature, SparseFeature
from mtl_dist.config.sequence import SequencePart, sequence_parts


@torch.fx.wrap
def padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int):
    """Jagged rows → ``(keys [B, L, D], mask [B, L] bool)``, each row's ids left-aligned and its
    padding zero (lengths above ``L`` keep their first ``L``; the reader already clipped them).

    Args:
        values: ``[N, D]`` the ids' embeddings, row after row.
        lengths: ``[B]`` ids per row.

    Example::

        keys, mask = padded(torch.ones(3, 2), torch.tensor([2, 0, 1]), 2)
        mask  # [[True, True], [False, False], [True, False]]
    """
    lengths = lengths.long()
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(max_len, device=values.device)
    mask = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    # index N (an appended zero row) for padding: no gather outside values, no grad to it
    index = torch.where(mask, starts.unsqueeze(1) + pos, values.shape[0])
    table = torch.cat([values, values.new_zeros(1, values.shape[1])])
    return table[index], mask


class DINAttention(nn.Module):
    """DIN's local activation unit (KDD 2018): weights ``w [B, L]`` from an MLP over
    ``[q, k, q − k, q ⊙ k]`` (hidden layers with one PReLU slope each, linear output), not softmax-normalised,
    multiplied by the mask (padding: weight 0, gradient 0); output ``Σ_i w_i k_i`` ``[B, D]``.

    Example::

        att = DINAttention(8, [16])
        out, w = att(torch.randn(4, 8), torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool))
        out.shape, w.shape  # [4, 8], [4, 5]
    """

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, need_weights=True):
        """``q [B, D]``, ``keys [B, L, D]``, ``mask [B, L]`` → ``(pooled [B, D], w [B, L])``."""
        qe = q.unsqueeze(1).expand_as(keys)
        w = self.mlp(torch.cat([qe, keys, qe - keys, qe * keys], dim=-1)).squeeze(-1)
        w = w * mask.to(w.dtype)
        return torch.einsum("bl,bld->bd", w, keys), w


class MultiHeadTargetAttention(nn.Module):
    """The candidate as one query over the sequence: ``heads`` heads of width ``D / heads``,
    query / key / value / output projections, ``scaled_dot_product_attention`` with the padding
    mask. An empty history (no valid key) gives 0 (not SDPA's NaN). ``w`` (the attention
    weights averaged over heads, ``[B, L]``, rows summing to 1 or 0) only with
    ``need_weights``: it costs a second softmax.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, keys, mask, need_weights: bool = False):
        """``q [B, D]``, ``keys [B, L, D]``, ``mask [B, L]`` → ``(pooled [B, D], w | None)``."""
        B, L, D = keys.shape
        h = self.heads
        any_ = mask.any(dim=1, keepdim=True)  # [B, 1]
        first = torch.arange(L, device=mask.device).unsqueeze(0) == 0
        ok = mask | (~any_ & first)  # an empty row attends to its padding; zeroed below
        qh = self.q(q).view(B, h, 1, D // h)
        kh = self.k(keys).view(B, L, h, D // h).transpose(1, 2)
        vh = self.v(keys).view(B, L, h, D // h).transpose(1, 2)
        att = ok.view(B, 1, 1, L)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=att)  # [B, h, 1, D/h]
        pooled = self.out(o.reshape(B, D)) * any_.to(o.dtype)
        w = None
        if need_weights:
            s = (qh @ kh.transpose(-1, -2)).squeeze(2) / (D // h) ** 0.5  # [B, h, L]
            w = s.masked_fill(~ok.unsqueeze(1), float("-inf")).softmax(-1).mean(1)
            w = w * mask.to(w.dtype)
        return pooled, w


class MeanPooling(nn.Module):
    """The masked mean of the sequence ``[B, D]`` (0 for an empty history); ``w [B, L]`` is
    ``1 / length`` on the true positions."""

    def forward(self, q, keys, mask, need_weights: bool = True):
        m = mask.to(keys.dtype)
        w = m / m.sum(1, keepdim=True).clamp(min=1)
        return torch.einsum("bl,bld->bd", w, keys), w


class PerTaskQueries(nn.Module):
    """Per-task attention: each task ``t`` its own query ``q_t = q W_t + b_t`` (``W_t``
    initialised to the identity) in front of one attention ``pool``, run once for all tasks on
    the batch stacked ``T`` times. Output ``[B, T · D]`` (task by task), weights ``[T, B, L]``.
    """

    def __init__(self, pool: nn.Module, tasks: int, dim: int) -> None:
        super().__init__()
        self.pool, self.tasks = pool, tasks
        self.weight = nn.Parameter(torch.eye(dim).repeat(tasks, 1, 1))  # [T, D, D]
        self.bias = nn.Parameter(torch.zeros(tasks, 1, dim))

    def forward(self, q, keys, mask, need_weights: bool = False):
        B, L, D = keys.shape
        T = self.tasks
        # [T, B, D] as an elementwise product summed (no einsum: the export keeps B free)
        qt = (q.unsqueeze(0).unsqueeze(-1) * self.weight.unsqueeze(1)).sum(2) + self.bias
        reps = (T,) + (1,) * (keys.dim() - 1)  # repeat copies: no contiguity test on B
        pooled, w = self.pool(
            qt.view(T * B, D), keys.repeat(reps), mask.repeat(T, 1), need_weights=need_weights
        )
        W = pooled.shape[1]  # no -1 in the views, no permute: the export keeps B free
        pooled = torch.cat(list(pooled.view(T, B, W).unbind(0)), dim=1)  # [B, T·W]
        return pooled, (w.view(T, B, L) if w is not None else None)


class FloatSide(nn.Module):
    """A sequence's float side columns as a key offset: ``values [B, L, C]`` →
    ``transform(values) W + b`` ``[B, L, D · P]`` (one ``Linear(C, D · P)``), times the mask, so
    padded positions add 0 and their values get no gradient. Added to the keys (the ids' and
    side ids' embeddings concatenated) before the pooling; the candidate's query is unchanged.

    Example::

        side = FloatSide(1, 8, "log1p")
        side(torch.rand(4, 5, 1) * 3600, torch.ones(4, 5, dtype=torch.bool)).shape  # [4, 5, 8]
    """

    def __init__(self, columns: int, width: int, transform: str = "log1p") -> None:
        super().__init__()
        self.transform = transform
        self.proj = nn.Linear(columns, width)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``values [B, L, C]`` (as read: ``float_transform`` applies here), ``mask [B, L]``
        bool → ``[B, L, width]``."""
        x = torch.log1p(values) if self.transform == "log1p" else values
        return self.proj(x) * mask.unsqueeze(-1).to(x.dtype)


def build_pooling(s: SequenceFeature, dim: int, tasks: int = 1) -> nn.Module:
    """The pooling ``s.pooling`` names over embeddings of width ``dim``; with ``s.per_task``,
    behind :class:`PerTaskQueries` for ``tasks`` tasks (``mean`` has no query: refused at
    parse)."""
    if s.pooling == "din":
        pool = DINAttention(dim, s.din_hidden)
    elif s.pooling == "mha":
        pool = MultiHeadTargetAttention(dim, s.heads)
    else:
        return MeanPooling()
    return PerTaskQueries(pool, tasks, dim) if s.per_task else pool


def float_blocks(floats: torch.Tensor, sequences: list[SequenceFeature]) -> dict[str, torch.Tensor]:
    """:class:`~mtl_dist.data.batch.Batch`'s ``floats`` ``[B, Σ L · C]`` split by sequence:
    ``{name: [B, L, C]}`` (views, dtype kept) for each sequence with ``float_side_columns``, in
    order (``L = max_len``, ``C`` its columns, position-major as the reader lays them out)."""
    out, at = {}, 0
    for s in sequences:
        if s.float_side_columns:
            L, C = s.max_len, len(s.float_side_columns)
            out[s.name] = floats[:, at : at + L * C].unflatten(1, (L, C))
            at += L * C
    return out


class SequenceLookup(nn.Module):
    """The shared tables' EC and the sequences' poolings: KJT → ``[B, Σ widths]``, the
    candidates' embeddings (``candidates``, the single-hot features of those tables; 0 for an
    empty bag) then each sequence's pooled vector, in the order of :attr:`names`.

    Args:
        ec: the EmbeddingCollection (plain, or sharded by DMP); its features are the
            candidates and the sequences.
        candidates: the sparse features looked up here (single-hot).
        sequences: the sequences, each pooled by :func:`build_pooling`.
        queries: per sequence, the candidate whose embedding is its query.

    Example::

        lookup = build_sequence_lookup(cfg.features.sparse, cfg.features.sequence, "cpu")
        lookup(batch.sparse).shape  # [B, D · (candidates + sequences)]
    """

    def __init__(
        self,
        ec: EmbeddingCollection,
        candidates: list[str],
        sequences: list[SequenceFeature],
        parts: list[list[SequencePart]],
        dim: int,
        tasks: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.ec = ec
        self.candidates = list(candidates)
        self.sequences = list(sequences)
        self.parts = [list(ps) for ps in parts]
        self.dim = dim
        self.tasks = list(tasks or [])
        self.poolings = nn.ModuleList(
            [build_pooling(s, dim * len(ps), len(self.tasks)) for s, ps in zip(sequences, parts)]
        )
        self.float_sides = nn.ModuleDict(
            {
                str(i): FloatSide(len(s.float_side_columns), dim * len(ps), s.float_transform)
                for i, (s, ps) in enumerate(zip(sequences, parts))
                if s.float_side_columns
            }
        )

    @property
    def queries(self) -> list[str]:
        """Each sequence's query feature (the candidate of its ids' table)."""
        return [ps[0].query for ps in self.parts]

    @property
    def names(self) -> list[str]:
        """The output's blocks: the candidates, then the sequences."""
        return self.candidates + [s.name for s in self.sequences]

    @property
    def widths(self) -> list[int]:
        """Each block's width, in :attr:`names` order: ``D`` per candidate, ``D · (1 + side
        columns)`` per sequence (times the tasks with ``per_task``)."""
        return [self.dim] * len(self.candidates) + [
            self.dim * len(ps) * (len(self.tasks) if s.per_task else 1)
            for s, ps in zip(self.sequences, self.parts)
        ]

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        weights: bool = False,
        floats: torch.Tensor | None = None,
    ):
        """``sparse`` (a KJT with at least the EC's keys) → ``([B, Σ widths]`` float32, with
        ``weights`` ``{sequence: (w [B, L], lengths [B])}`` detached, else None). A sequence
        with side columns attends with keys ``[k_ids, k_side…]`` and query ``[q_ids, q_side…]``
        (each part's embedding from its table, concatenated: ``[B, L, D · P]``); one with
        float side columns adds :class:`FloatSide` of its block of ``floats`` (``[B, Σ L · C]``,
        :class:`~mtl_dist.data.batch.Batch`'s ``floats``) to those keys.

        Raises:
            ValueError: a sequence has float side columns and ``floats`` is None."""
        jts = self.ec(sparse)
        cand = {}
        for name in self.candidates:
            jt = jts.get(name)  # .get: a sharded EC's output is an awaitable of the dict
            keys, mask = padded(jt.values().float(), jt.lengths(), 1)
            cand[name] = keys[:, 0] * mask.to(keys.dtype)
        out = [cand[name] for name in self.candidates]
        seen = {}
        blocks_of = float_blocks(floats, self.sequences) if floats is not None else {}
        for i, (s, ps, pool) in enumerate(zip(self.sequences, self.parts, self.poolings)):
            blocks, mask, lengths = [], None, None
            for p in ps:  # the side lists align with the ids: one mask (the ids')
                jt = jts.get(p.key)
                keys, m = padded(jt.values().float(), jt.lengths(), s.max_len)
                blocks.append(keys)
                mask, lengths = (m, jt.lengths()) if mask is None else (mask, lengths)
            q = torch.cat([cand[p.query] for p in ps], dim=1)
            keys = torch.cat(blocks, dim=2)
            if s.float_side_columns:
                if floats is None:
                    raise ValueError(f"sequence {s.name}: float_side_columns need the floats")
                block = blocks_of[s.name].float()  # [B, L, C]
                keys = keys + self.float_sides[str(i)](block, mask)
            pooled, w = pool(q, keys, mask, need_weights=weights)
            out.append(pooled)
            if weights and s.per_task:  # one set per task: <sequence>/<task>
                seen.update(
                    {f"{s.name}/{t}": (w[i].detach(), lengths) for i, t in enumerate(self.tasks)}
                )
            elif weights:
                seen[s.name] = (w.detach(), lengths.detach())
        return torch.cat(out, dim=1), (seen if weights else None)


def sequence_tables(sparse: list[SparseFeature], sequences: list[SequenceFeature]) -> set[str]:
    """The tables the EC holds: those a sequence's ids or side columns are looked up in."""
    return {p.table for s in sequences for p in sequence_parts(s, sparse)}


def build_sequence_lookup(
    sparse: list[SparseFeature],
    sequences: list[SequenceFeature],
    device: torch.device | str = "meta",
    tasks: list[str] | None = None,
    init_scale: float = 0.05,
    data_type: str = "fp32",
) -> SequenceLookup:
    """The EC of the sequences' tables (one ``EmbeddingConfig`` per table: its sparse features,
    then the sequences sharing it) and the poolings, on ``device`` (``meta`` before sharding).
    ``sparse`` / ``sequences``: a validated config's (``features.sparse`` / ``.sequence``)."""
    tables = sequence_tables(sparse, sequences)
    parts = [sequence_parts(s, sparse) for s in sequences]
    candidates = [f for f in sparse if f.table_name in tables]
    configs = []
    for table in sorted(tables):
        fs = [f for f in candidates if f.table_name == table]
        configs.append(
            EmbeddingConfig(
                name=table,
                num_embeddings=fs[0].num_rows,
                embedding_dim=fs[0].embedding_dim,
                feature_names=[f.name for f in fs]
                + [p.key for ps in parts for p in ps if p.table == table],
                weight_init_min=-init_scale,
                weight_init_max=init_scale,
                data_type=DataType.FP16 if data_type == "fp16" else DataType.FP32,
            )
        )
    ec = EmbeddingCollection(tables=configs, device=torch.device(device))
    order = [f for c in configs for f in c.feature_names if f in {x.name for x in candidates}]
    return SequenceLookup(ec, order, sequences, parts, candidates[0].embedding_dim, tasks)
