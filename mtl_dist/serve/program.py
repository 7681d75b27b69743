"""The ranker as a self-contained program for serving: raw ids and dense values in, each task's
served value out, with nothing of TorchRec, fbgemm or mtl_dist needed to run it.

:func:`build_served` turns a trained :class:`~mtl_dist.loop.losses.ModelWithLoss` into a
:class:`ServedRanker` of plain modules — every TorchRec table (STEM's per-task ones too) copied
into an ``nn.EmbeddingBag`` (or, for ``int8``, a :class:`RowwiseInt8Bag`), the dense
normalisation and head as trained, then what :func:`mtl_dist.loop.losses.task_predictions` and
``mtl_dist.serve.score`` do on the way out: the sigmoid, the negative-downsampling correction, ESMM's
pCTR × pCVR and the label transforms' inverses (``log1p`` → ``expm1``). :func:`export_program`
runs ``torch.export`` over it with a dynamic batch (and bag) size; :func:`write_package` stores
the program (eager, or compiled with AOTInductor) with :func:`metadata` as
``extra/mtl_dist.json`` in one ``.pt2`` archive.

Inputs of the program (flat, in this order; F sparse features in config order)::

    dense        [B, Dd] float32, the dense columns in metadata order
    values[f]    [N_f] int64, feature f's ids, bag after bag (strings already hashed)
    offsets[f]   [B + 1] int64, bag i is values[f][offsets[f][i]:offsets[f][i + 1]]

Output: ``[B, T]`` float32, task by task in metadata order.

What a client does and what the program does with ids is split so that the program never sees
a string: the client hashes string ids (``xxh3_64(utf-8 bytes, seed) mod hash_buckets``, the
rule in the metadata), drops nulls and empty strings (or refuses them under
``invalid_ids = "error"``) and refuses integer ids outside ``[0, vocab_size)`` for features
whose policy is ``error``; the program's :class:`IdRemap` applies every integer rule training
applies (``mod hash_buckets``, ``clip``, ``hash``, ``drop``). A later remapping (managed
collisions) replaces :class:`IdRemap` alone.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mtl_dist.config import JobConfig, SparseFeature, TaskSpec
from mtl_dist.data.batch import Batch
from mtl_dist.data.ids import RAW_ID_SPACE
from mtl_dist.files import check_archive
from mtl_dist.loop.losses import ModelWithLoss, task_predictions
from mtl_dist.models.collision import managed_rows
from mtl_dist.models.heads import MoE

FORMAT = "mtl-dist-serving/1"
METADATA = "mtl_dist.json"  # stored as extra/mtl_dist.json in the .pt2 archive
EMBEDDING_DTYPES = ("fp32", "fp16", "int8")


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

    Args:
        features: the sparse features, in input order.
        pads: each feature's padding row (its table's trained row count).
        managed: per managed feature name, its table's ``(sorted raw ids [N], rows [N])``.
        buckets: the world size managed tables were trained at.

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
    ) -> None:
        super().__init__()
        self.rules = [_rule(f) for f in features]
        self.pads = list(pads)
        self.buckets = buckets
        for i, f in enumerate(features):
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
        return out


def _rule(f: SparseFeature) -> tuple[str, int]:
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


class ServedRanker(nn.Module):
    """Raw inputs → each task's served value ``[B, T]``: the trained ranker end to end.

    ``forward(dense [B, Dd], values: [N_f] per feature, offsets: [B + 1] per feature)``: ids
    through :class:`IdRemap`, the shared (and STEM's per-task) lookups, the dense normalisation,
    interaction and head in eval mode, then :func:`mtl_dist.loop.losses.task_predictions`
    (probabilities on the true scale, ESMM's product) and ``expm1`` for ``log1p`` tasks — the numbers
    ``mtl_dist.serve.score`` writes. Build it with :func:`build_served`.
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
    ) -> None:
        super().__init__()
        self.remap = remap
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
        rows = self.remap(values)
        if self.zero_nonfinite_dense:  # data.dense_nan = "zero"
            dense = torch.where(torch.isfinite(dense), dense, torch.zeros_like(dense))
        x = torch.cat([self.shared(rows, offsets), self.dense_norm(dense)], dim=1)  # [B, Din]
        x = self.interaction(x)
        if self.per_task is None:
            out = self.head(x)[0]
        else:  # STEM: each task's own tables, [T, B, Dt]
            own = torch.stack([lookup(rows, offsets) for lookup in self.per_task])
            out = self.head(x, own)[0]
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
    features = cfg.features.sparse
    ebcs = [e for e in (ranker.ebc, _managed_tables(ranker)) if e is not None]
    pads = [_table_rows(ebcs, f.name) for f in features]
    shared = PooledEmbeddings(ebcs, features, ranker.feature_order, embedding_dtype)
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
        IdRemap(features, pads, _remappings(ranker), ranker.managed_buckets),
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
    modules = ranker.mc_ebc._managed_collision_collection._managed_collision_modules
    return {
        f: (modules[cfg.name]._mch_sorted_raw_ids, modules[cfg.name]._mch_remapped_ids_mapping)
        for cfg in ranker.mc_ebc._embedding_module.embedding_bag_configs()
        for f in cfg.feature_names
    }


def metadata(cfg: JobConfig, embedding_dtype: str, compiled: str) -> dict[str, Any]:
    """What a client needs to build the program's inputs and read its output, as plain JSON.

    ``compiled``: ``eager`` (a ``torch.export`` program) or ``aoti-cpu`` / ``aoti-cuda``.
    """
    names = [f.name for f in cfg.features.sparse]
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "program": compiled,
        "embedding_dtype": embedding_dtype,
        "head": cfg.model.head + (" + esmm" if cfg.model.esmm else ""),
        "inputs": ["dense", *[f"values/{n}" for n in names], *[f"offsets/{n}" for n in names]],
        "output": "[B, T] float32, one column per task in tasks order",
        "tasks": [
            {
                "name": t.name,
                "kind": t.kind,
                "value": _served_value(t),
            }
            for t in cfg.tasks
        ],
        "dense": {
            "columns": list(cfg.features.dense),
            "dtype": "float32",
            "null": 0.0,
            "nonfinite": cfg.data.dense_nan,  # error: refuse the row; zero: read as 0
        },
        "hashing": {
            "function": "xxh3_64",
            "seed": cfg.data.hash_seed,
            "encoding": "utf-8",
            "applies_to": "string and binary ids (binary: its own bytes)",
            "row": "xxh3_64(bytes, seed) mod the feature's string_id_mod, by the client",
        },
        "sparse": [
            {
                "name": f.name,
                "multi_hot": f.multi_hot,
                "pooling": f.pooling,
                "hash_buckets": f.hash_buckets,
                "vocab_size": f.vocab_size,
                "invalid_ids": f.invalid_ids,
                "client": _client_rule(f),
                "string_id_mod": RAW_ID_SPACE if f.collision == "managed" else f.hash_buckets,
                "program": {
                    "managed": "raw id mod {n}, then the trained managed-collision remapping",
                    "mod": "id mod {n}",
                    "clip": "clamp(id, 0, {n} - 1)",
                    "drop": "ids outside [0, {n}) dropped",
                }[_rule(f)[0]].format(n=_rule(f)[1]),
            }  # fmt: skip
            for f in cfg.features.sparse
        ],
    }


def _served_value(t: TaskSpec) -> str:
    """What task ``t``'s output column holds."""
    if t.kind == "binary":
        return "probability (true scale)"
    return "value in the label's unit" + (
        " (expm1 of the log1p model)" if t.transform == "log1p" else ""
    )


def _client_rule(f: SparseFeature) -> str:
    """What the client must do with feature ``f``'s ids before the program."""
    nulls = (
        "refuse nulls inside lists and empty strings"
        if f.invalid_ids == "error"
        else "drop nulls inside lists and empty strings"
    )
    rule = f"a null row is an empty bag; {nulls}"
    if f.collision == "managed":
        rule += f"; strings: xxh3_64 mod {RAW_ID_SPACE} (the program maps it to a row)"
    elif f.hash_buckets:
        rule += f"; strings: xxh3_64 mod {f.hash_buckets}"
    elif f.invalid_ids == "error":
        rule += f"; refuse integer ids outside [0, {f.vocab_size})"
    return rule


def example_inputs(
    cfg: JobConfig, batch: int = 4, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random valid inputs of ``batch`` rows: dense ``[B, Dd]``, per feature ids ``[N_f]``
    (bags of 1–3 ids, so every N_f > 1) and offsets ``[B + 1]``."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, len(cfg.features.dense), generator=g)
    values, offsets = [], []
    for f in cfg.features.sparse:
        lengths = torch.randint(1, 4, (batch,), generator=g)
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
        values.append(torch.randint(0, f.num_rows, (int(lengths.sum()),), generator=g))
    return dense, values, offsets


def export_program(cfg: JobConfig, served: ServedRanker) -> torch.export.ExportedProgram:
    """``torch.export`` of ``served`` with a dynamic batch B ≥ 1 and bag sizes N_f ≥ 0.

    Raises torch's ``UserError`` naming the guard when some operation fixes the batch size
    (a head op this module does not yet rewrite: see :class:`_BatchedMixes`).
    """
    from torch.export import Dim

    args = example_inputs(cfg)
    batch = Dim("batch", min=1, max=1 << 24)
    n = [Dim(f"n_{i}", min=0, max=1 << 30) for i in range(len(cfg.features.sparse))]
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
        warnings.filterwarnings("ignore", "The tensor attributes self.head.last_")  # monitoring
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


def write_package(
    out: Path | BinaryIO,
    program: torch.export.ExportedProgram,
    meta: dict[str, Any],
    aoti: bool = False,
    inductor_configs: dict[str, Any] | None = None,
) -> None:
    """Write ``program`` (or, with ``aoti``, its AOTInductor compilation for the program's
    device, with ``inductor_configs``) and ``meta`` (as ``extra/mtl_dist.json``) into the
    ``.pt2`` archive ``out`` (a path ending in .pt2, or a binary file open for writing).

    The eager package loads with ``torch.export.load(out).module()``, the compiled one with
    ``torch._inductor.aoti_load_package(out)``; both take ``(dense, values, offsets)``.
    """
    from torch.export.pt2_archive._package import package_pt2  # what torch.export.save calls

    extra = {METADATA: json.dumps(meta, indent=1)}
    if not aoti:
        package_pt2(out, exported_programs={"model": program}, extra_files=extra)
        return
    files = torch._inductor.aot_compile(
        program.module(),
        *program.example_inputs,
        options={**(inductor_configs or {}), "aot_inductor.package": True},
    )
    package_pt2(out, aoti_files={"model": files}, extra_files=extra)


def check_package(path: Path) -> None:
    """Verify a ``.pt2`` package before use: every member against its zip CRC-32
    (:func:`mtl_dist.files.check_archive`, whose errors it raises)."""
    check_archive(path, "mtl-dist serving package",
                  "python -m mtl_dist.serve.export CHECKPOINT model.pt2 --format pt2")  # fmt: skip


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a package from :func:`write_package` (``ValueError`` naming the file
    when it has none)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    check_package(path)
    with PT2ArchiveReader(str(path)) as archive:
        names = archive.get_file_names()
        name = next((n for n in names if n.endswith(f"extra/{METADATA}")), None)
        if name is None:
            raise ValueError(f"{path}: not an mtl-dist serving package (no extra/{METADATA})")
        return json.loads(archive.read_string(name))


def load_package(path: Path) -> Any:
    """The runnable program of a package: the AOTInductor model when it has one, else the
    exported program's module. Called as ``model(dense, values, offsets)`` → ``[B, T]``.

    Raises ``ValueError`` naming the file (and member) when it does not verify
    (:func:`check_package`)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    check_package(path)
    with PT2ArchiveReader(str(path)) as archive:
        compiled = any("aotinductor/" in n for n in archive.get_file_names())
    if compiled:
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(str(path)).module()


def inputs_from_batch(
    batch: Batch,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A :class:`~mtl_dist.data.batch.Batch` as the program's inputs ``(dense [B, Dd], values
    [N_f], offsets [B + 1])``, features in the KJT's (the config's) order. Its ids are already
    mapped the way training maps them, which :class:`IdRemap` leaves as they are."""
    kjt = batch.sparse
    names = kjt.keys()
    jts = [kjt[k] for k in names]
    return batch.dense, [jt.values() for jt in jts], [jt.offsets().long() for jt in jts]
