"""The served module of a trained model and its ``torch.export`` program: :func:`build_served`
copies a :class:`~mtl_dist.loop.losses.ModelWithLoss` into a :class:`ServedRanker` of plain
modules, :func:`export_program` exports it with a dynamic batch (and bag) size; the program's
inputs from random values (:func:`example_inputs`) or from a training batch
(:func:`inputs_from_batch`). The inputs and output are described in :mod:`mtl_dist.serve.program`.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mtl_dist.config import JobConfig, SequenceFeature
from mtl_dist.config.sequence import sequence_parts
from mtl_dist.data.batch import Batch
from mtl_dist.loop.losses import ModelWithLoss, task_predictions
from mtl_dist.models.collision import feature_remappings
from mtl_dist.models.heads import MoE
from mtl_dist.models.ranker import model_body
from mtl_dist.models.sequence import float_blocks
from mtl_dist.serve.lookups import IdRemap, PooledEmbeddings
from mtl_dist.serve.sequences import ServedSequences, ec_rows, served_features, served_floats

EMBEDDING_DTYPES = ("fp32", "fp16", "int8")


class ServedRanker(nn.Module):
    """Raw inputs → each task's served value ``[B, T]``: the trained ranker end to end.

    ``forward(dense [B, Dd], values: [N_f] per input, offsets: [B + 1] per input)``, the inputs
    the id lists (:func:`served_features`) then the sequences' float side columns (float32
    values, :func:`served_floats`): ids through :class:`IdRemap`, the shared (and STEM's
    per-task) lookups, the sequences, the dense normalisation, interaction and head in eval
    mode, then :func:`mtl_dist.loop.losses.task_predictions` (probabilities on the true scale,
    ESMM's product) and ``expm1`` for ``log1p`` tasks — the numbers ``mtl_dist.serve.score``
    writes. Build it with :func:`build_served`.
    """

    def __init__(
        self,
        remap: IdRemap,
        shared: PooledEmbeddings,
        per_task: nn.ModuleList | None,
        dense_norm: nn.Module,
        head: nn.Module,
        is_binary: torch.Tensor,
        negative_rate: torch.Tensor | None,
        ctcvr: tuple[int, int] | None,
        expm1: torch.Tensor,
        zero_nonfinite_dense: bool,
        interaction: nn.Module | None = None,
        sequences: ServedSequences | None = None,
    ) -> None:
        super().__init__()
        self.remap = remap
        self.sequences = sequences
        self.shared = shared
        self.per_task = per_task
        self.dense_norm = dense_norm
        self.head = head
        self.interaction = interaction if interaction is not None else nn.Identity()
        self.register_buffer("is_binary", is_binary)
        self.register_buffer("negative_rate", negative_rate)
        self.register_buffer("expm1", expm1)
        self.ctcvr = ctcvr
        self.zero_nonfinite_dense = zero_nonfinite_dense

    def forward(
        self, dense: torch.Tensor, values: list[torch.Tensor], offsets: list[torch.Tensor]
    ) -> torch.Tensor:
        ids = len(self.remap.rules)  # the id inputs; the float side columns follow
        rows = self.remap(values[:ids])
        if self.zero_nonfinite_dense:  # data.dense_nan = "zero"
            dense = torch.where(torch.isfinite(dense), dense, torch.zeros_like(dense))
        parts = [self.shared(rows, offsets)] if self.shared.order else []
        if self.sequences is not None:  # the EC's candidates and pooled sequences
            parts.append(self.sequences(rows, offsets, values[ids:], offsets[ids:]))
        x = torch.cat([*parts, self.dense_norm(dense)], dim=1)  # [B, Din]
        own = None
        if self.per_task is not None:  # STEM: each task's own tables, [T, B, Dt]
            own = torch.stack([lookup(rows, offsets) for lookup in self.per_task])
        out = model_body(self.interaction, self.head, x, own).logits  # training's, in eval mode
        preds = task_predictions(out, self.is_binary, self.negative_rate, self.ctcvr)
        return torch.where(self.expm1, torch.expm1(preds), preds)


@torch.no_grad()
def build_served(
    cfg: JobConfig, model: ModelWithLoss, embedding_dtype: str = "fp32"
) -> ServedRanker:
    """The served program of a trained model (in eval mode, on the CPU; ``model`` is not changed).

    Raises ``ValueError`` for an ``embedding_dtype`` not in fp32 | fp16 | int8.
    """
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(
            f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {embedding_dtype!r}"
        )
    ranker = model.model
    features = served_features(cfg.features.sparse, cfg.features.sequence)
    ebcs = [e for e in (ranker.ebc, _managed_tables(ranker)) if e is not None]
    names = [f.name for f in features]
    pads = [ec_rows(ranker.sequences, n) or _table_rows(ebcs, n) for n in names]
    shared = PooledEmbeddings(ebcs, features, ranker.pooled_order, embedding_dtype)
    per_task = None
    if ranker.task_ebcs is not None:
        per_task = nn.ModuleList(
            PooledEmbeddings([e], features, order, embedding_dtype)
            for e, order in zip(ranker.task_ebcs.values(), ranker.task_feature_order)
        )
    head = copy.deepcopy(ranker.head).eval()
    if isinstance(head, MoE):  # top-k: the dense compute (zeroed weights), no data-dependent branch
        head.sparse = False
    ctcvr = model.esmm if model.esmm is not None and model.esmm_ctcvr_preds else None
    served = ServedRanker(
        IdRemap(
            features,
            pads,
            _remappings(ranker),
            ranker.managed_buckets,
            ranker.id_counts.masks() if ranker.id_counts is not None else None,
        ),
        shared,
        per_task,
        copy.deepcopy(ranker.dense_norm).eval(),
        head,
        model.is_binary.clone(),
        None if model.negative_rate is None else model.negative_rate.clone(),
        ctcvr,
        torch.tensor([t.kind == "regression" and t.transform == "log1p" for t in cfg.tasks]),
        cfg.data.dense_nan == "zero",
        copy.deepcopy(ranker.interaction).eval(),
        ServedSequences(ranker.sequences, names) if ranker.sequences is not None else None,
    )
    return served.eval().requires_grad_(False)


def _table_rows(ebcs: list[EmbeddingBagCollection], feature: str) -> int:
    """Trained rows of the table ``feature`` reads (its padding row's index when served)."""
    for ebc in ebcs:
        for cfg in ebc.embedding_bag_configs():
            if feature in cfg.feature_names:
                return cfg.num_embeddings
    raise ValueError(f"feature '{feature}' is in no table of the model")


def _managed_tables(ranker: nn.Module) -> EmbeddingBagCollection | None:
    """The tables of the ranker's managed-collision features (None without any)."""
    return ranker.mc_ebc._embedding_module if ranker.mc_ebc is not None else None


def _remappings(ranker: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per managed feature, its table's trained ``(sorted raw ids, rows)``."""
    if ranker.mc_ebc is None:
        return {}
    return feature_remappings(ranker.mc_ebc)


def example_inputs(
    cfg: JobConfig, batch: int = 4, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random valid inputs of ``batch`` rows: dense ``[B, Dd]``, per id input ids ``[N_f]``
    (bags of 1–3 ids, so every N_f > 1) and offsets ``[B + 1]``, then per float side column
    values ``[N_f]`` float32 in [0, 1e4) as long as its sequence's ids, row by row."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, len(cfg.features.dense), generator=g)
    values, offsets, floats, float_offsets = [], [], [], []
    for f in cfg.features.sparse:
        lengths = torch.randint(1, 4, (batch,), generator=g)
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
        values.append(torch.randint(0, f.num_rows, (int(lengths.sum()),), generator=g))
    for s in cfg.features.sequence:  # 2 ... max_len + 2 ids: some clipped; side lists aligned
        lengths = torch.randint(2, s.max_len + 3, (batch,), generator=g)
        for p in sequence_parts(s, cfg.features.sparse):
            offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
            rows = next(f.num_rows for f in cfg.features.sparse if f.table_name == p.table)
            values.append(torch.randint(0, rows, (int(lengths.sum()),), generator=g))
        for _ in s.float_side_columns:
            floats.append(torch.rand(int(lengths.sum()), generator=g) * 1e4)
            float_offsets.append(offsets[-1].clone())  # its own input, not an alias
    return dense, values + floats, offsets + float_offsets


def export_program(cfg: JobConfig, served: ServedRanker) -> torch.export.ExportedProgram:
    """``torch.export`` of ``served`` with a dynamic batch B ≥ 1 and bag sizes N_f ≥ 0.

    Raises torch's ``UserError`` naming the guard when some operation fixes the batch size
    (a head op this module does not yet rewrite: see :class:`_BatchedMixes`).
    """
    from torch.export import Dim

    args = example_inputs(cfg)
    batch = Dim("batch", min=1, max=1 << 24)
    inputs = len(served_features(cfg.features.sparse, cfg.features.sequence)) + len(
        served_floats(cfg.features.sequence)
    )
    n = [Dim(f"n_{i}", min=0, max=1 << 30) for i in range(inputs)]
    shapes = {
        "dense": {0: batch},
        "values": [{0: d} for d in n],
        "offsets": [{0: batch + 1} for _ in n],
    }
    # size-oblivious: B = 1 and empty bags must not be special cases the program guards against
    with (
        torch.fx.experimental._config.patch(backed_size_oblivious=True),
        _BatchedMixes(),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "The tensor attributes self.head.last_")  # AITM's
        fx_log = logging.getLogger("torch.fx._symbolic_trace")  # "is_fx_tracing ..." per call
        level = fx_log.level
        fx_log.setLevel(logging.ERROR)
        try:
            return torch.export.export(served, args, dynamic_shapes=shapes, strict=False)
        finally:
            fx_log.setLevel(level)


class _BatchedMixes(TorchFunctionMode):
    """The heads' expert mixes (and the cross networks' broadcast matmuls) without einsum
    while exporting: ATen's einsum and matmul test sizes against 1 to broadcast, which would
    fix the batch at B ≠ 1 in the program. The same sums:
    ``[B, G, E] × [E, B, H] → [G, B, H]`` and ``[B, E] × [E, B, H] → [B, H]`` as ``bmm`` over
    the batch, ``[B, T, E] × [T, E, B, H] → [T, B, H]`` as a product summed over E. A reshape
    (whose view-or-copy test would fix the batch too) copies, then views."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.einsum and args[0] == "bge,ebh->gbh":
            w, x = args[1], args[2]
            return torch.bmm(w, x.permute(1, 0, 2)).permute(1, 0, 2)
        if func is torch.einsum and args[0] == "be,ebh->bh":
            w, x = args[1], args[2]
            return torch.bmm(w.unsqueeze(1), x.permute(1, 0, 2)).squeeze(1)
        if func is torch.einsum and args[0] == "bte,tebh->tbh":
            w, x = args[1], args[2]
            return (w.permute(1, 2, 0).unsqueeze(-1) * x).sum(1)
        if func is torch.matmul and args[0].dim() == 2 and args[1].dim() == 3:
            # TorchRec's cross networks: [N, M] × [B, M, 1] → [B, N, 1], as a linear map
            return torch.nn.functional.linear(args[1].squeeze(2), args[0]).unsqueeze(2)
        if func is torch.Tensor.reshape:  # tower batch norm's [B, G·H] of a transposed [G, B, H]
            return args[0].clone(memory_format=torch.contiguous_format).view(*args[1:])
        return func(*args, **kwargs)


def inputs_from_batch(
    batch: Batch, sequences: list[SequenceFeature] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A :class:`~mtl_dist.data.batch.Batch` as the program's inputs ``(dense [B, Dd], values
    [N_f], offsets [B + 1])``, features in the KJT's (the config's) order, then each float side
    column of ``sequences`` (the config's ``features.sequence``: needed when one has
    ``float_side_columns``) from ``batch.floats`` ``[B, Σ L · C]``: the kept values, the
    sequence's ids' offsets. Its ids are already mapped the way training maps them, which
    :class:`IdRemap` leaves as they are."""
    kjt = batch.sparse
    names = kjt.keys()
    jts = [kjt[k] for k in names]
    values, offsets = [jt.values() for jt in jts], [jt.offsets().long() for jt in jts]
    blocks = float_blocks(batch.floats, sequences) if sequences else {}
    for name, block in blocks.items():  # [B, L, C]
        jt = kjt[name]
        kept = torch.arange(block.shape[1]).unsqueeze(0) < jt.lengths().unsqueeze(1)  # [B, L]
        values += [block[:, :, c][kept].float() for c in range(block.shape[2])]
        offsets += [jt.offsets().long()] * block.shape[2]
    return batch.dense, values, offsets
