"""The ranking model: embedding lookups + dense features → multi-task head → ``[B, T]``.

Single-process and parallelism-free; ``mtl_dist.distributed.sharding`` shards its
``EmbeddingBagCollection`` from outside. Built on the ``meta`` device, the tables take no memory
until the planner has placed their shards.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mtl_dist.config import JobConfig, ModelConfig, SparseFeature, task_parents
from mtl_dist.data.batch import Batch
from mtl_dist.models.collision import feature_remappings, managed_ebc, managed_rows
from mtl_dist.models.dependent import DependentTowers
from mtl_dist.models.experts import ExpertStyle
from mtl_dist.models.funnel import AITM
from mtl_dist.models.heads import PLE, STEM, MoE, SharedBottom, Towers
from mtl_dist.models.interaction import FeatureDropout, build_interaction
from mtl_dist.models.outputs import NO_PROBES, RankerOutput, model_body
from mtl_dist.models.pepnet import PEPNet
from mtl_dist.models.ple import MixedExperts
from mtl_dist.models.sequence import SequenceLookup, build_sequence_lookup, sequence_tables


def embedding_bag_configs(
    features: list[SparseFeature],
    init_scale: float = 0.05,
    table_suffix: str = "",
    data_type: str = "fp32",
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table; features naming the same table share it.
    ``data_type``: the tables' storage, fp32 | fp16."""
    by_table: dict[str, list[SparseFeature]] = defaultdict(list)
    for f in features:
        by_table[f.table_name].append(f)
    return [
        EmbeddingBagConfig(
            name=table + table_suffix,
            num_embeddings=fs[0].num_rows,
            embedding_dim=fs[0].embedding_dim,
            feature_names=[f.name for f in fs],
            pooling=PoolingType.MEAN if fs[0].pooling == "mean" else PoolingType.SUM,
            weight_init_min=-init_scale,
            weight_init_max=init_scale,
            data_type=DataType.FP16 if data_type == "fp16" else DataType.FP32,
        )
        for table, fs in by_table.items()
    ]


class Ranker(nn.Module):
    """Pooled embeddings ``[B, F·D]`` ⊕ dense ``[B, Dd]`` → interaction → head → outputs
    ``[B, T]`` + aux ``[A]``.

    Args:
        ebc: the EmbeddingBagCollection (plain, or sharded by DMP); None when every table is managed.
        num_dense: Dd.
        head: maps ``[B, Din]`` to a :class:`HeadOutput` (see ``models/heads.py``).
        dense_batch_norm: batch-normalise raw dense features.
        task_ebcs: STEM only: one EBC of task-specific tables per task (in task order); the
            head then also gets their pooled outputs ``[T, B, Dt]``.
        mc_ebc: the managed-collision tables (``collision = "managed"``: see
            ``models/collision.py``), plain or sharded; None without any.
        interaction: maps the head's raw input ``[B, Din]`` to what the head reads (see
            ``models/interaction.py``); None: the identity. ``head_input`` (attribution) is
            the raw input, so attribution still ranks the input features.
        embedding_dropout: applied to the pooled embeddings ``[B, Σ w_f]`` (a
            :class:`~mtl_dist.models.interaction.FeatureDropout`); None: the identity.
        embedding_l2: λ of the L2 penalty on the looked-up rows: a training forward returns
            ``penalty = λ/2 · mean_b ||pooled_b||²`` (:class:`RankerOutput`), which
            :class:`~mtl_dist.loop.losses.ModelWithLoss` adds to the loss. Taken after the
            gradient gate, so a skipped step (or fp16's loss scale) treats it as the task losses.
        sequences: the behaviour sequences' EC and attention (``models/sequence.py``); its
            blocks (the shared tables' candidates, then each sequence's pooled vector) follow
            the EBCs' in the head input. None without ``[[features.sequence]]``.

    ``ranker.probes`` (:class:`~mtl_dist.models.outputs.Probes`, set from outside: the loop,
    the telemetry, attribution) says which extras the forwards return in their
    :class:`RankerOutput`.

    Example::

        cfg = load_config(["--config", "configs/default.toml"])
        model = build_ranker(cfg, device=torch.device("cpu"))
        out = model(batch)   # RankerOutput: logits [B, T], aux [A], ...
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection | None,
        num_dense: int,
        head: nn.Module,
        dense_batch_norm: bool = True,
        task_ebcs: nn.ModuleDict | None = None,
        mc_ebc: ManagedCollisionEmbeddingBagCollection | None = None,
        interaction: nn.Module | None = None,
        embedding_dropout: nn.Module | None = None,
        embedding_l2: float = 0.0,
        sequences: SequenceLookup | None = None,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.sequences = sequences
        self.mc_ebc = mc_ebc
        self.task_ebcs = task_ebcs
        # the head sees features in the unsharded collections' order: a sharded EBC returns them
        # grouped by sharding type, an order that changes with the plan (and the world size)
        self.feature_order = feature_order(ebc, mc_ebc) + (sequences.names if sequences else [])
        # managed tables: the world size their remapping was trained at (its miss rows), which
        # the single-process path (scoring, export) reproduces; set from the checkpoint
        self.managed_buckets = 1
        self.task_feature_order = (
            [_embedding_names(e) for e in task_ebcs.values()] if task_ebcs is not None else []
        )
        self.dense_norm = (
            nn.BatchNorm1d(num_dense) if dense_batch_norm and num_dense else nn.Identity()
        )
        self.head = head
        self.interaction = interaction if interaction is not None else nn.Identity()
        self.embedding_dropout = (
            embedding_dropout if embedding_dropout is not None else nn.Identity()
        )
        self.embedding_l2 = embedding_l2
        # the head's input, where the trainer applies its update gate from outside
        # (:func:`mtl_dist.loop.guard.apply_update_gate`: drops the gradient into the tables of a
        # step whose update the non-finite guard closed); the identity in a plain model
        self.grad_gate: nn.Module = nn.Identity()
        self.dense_names = [f"dense_{i}" for i in range(num_dense)]
        self.probes = NO_PROBES  # the extras a forward returns (set from outside)
        # ESCM2-DR (``model.esmm.escm2_dr``): a tower [B, Din] → [B, 1] imputing each exposure's
        # conversion; its logits of a training forward ([B]) feed the loss
        self.imputation: nn.Module | None = None
        # the pooled embeddings' widths, in feature_order (the head input's column blocks)
        dims = {
            f: t.embedding_dim
            for e in (ebc, mc_ebc._embedding_module if mc_ebc is not None else None)
            if e is not None
            for t in e.embedding_bag_configs()
            for f in t.feature_names
        }
        dims.update(dict(zip(sequences.names, sequences.widths)) if sequences else {})
        self.feature_widths = [dims[f] for f in self.feature_order]

    @property
    def pooled_order(self) -> list[str]:
        """The EBCs' features in ``feature_order`` (the sequences' blocks follow them)."""
        return self.feature_order[: len(self.feature_order) - len(self.sequence_names)]

    @property
    def sequence_names(self) -> list[str]:
        return self.sequences.names if self.sequences is not None else []

    def input_blocks(self) -> tuple[list[str], list[int]]:
        """The column blocks of ``head_input`` ``[B, Din]``: feature names and widths (each
        sparse feature's pooled embedding, then each dense value)."""
        names = [*self.feature_order, *self.dense_names]
        return names, [*self.feature_widths, *[1] * len(self.dense_names)]

    def forward(self, batch: Batch) -> RankerOutput:
        kts = [self.ebc(batch.sparse)] if self.ebc is not None else []
        attention = None
        if self.mc_ebc is not None:
            kts.append(self.managed_lookup(batch.sparse))
        pooled = KeyedTensor.regroup(kts, [self.pooled_order])[0] if kts else None  # [B, Σ dims]
        if self.sequences is not None:  # the EC's candidates and pooled sequences, [B, S·D]
            seq, attention = self.sequences(batch.sparse, self.probes.attention)
            pooled = seq if pooled is None else torch.cat([pooled.float(), seq], dim=1)
        pooled = self.embedding_dropout(pooled.float())  # fp16 tables: fp32 from here
        x = self.grad_gate(torch.cat([pooled, self.dense_norm(batch.dense)], dim=1))  # [B, Din]
        penalty = imputation = None
        if self.embedding_l2 and self.training:  # L2 on the looked-up rows (ModelWithLoss adds it)
            penalty = 0.5 * self.embedding_l2 * x[:, : pooled.shape[1]].square().sum(1).mean()
        if self.imputation is not None and self.training:  # no gradient into the input
            imputation = self.imputation(x.detach())[:, 0]
        own = None
        if self.task_ebcs is not None:  # STEM: each task's own tables, [T, B, Dt]
            own = self.grad_gate(
                torch.stack(
                    [
                        KeyedTensor.regroup([ebc(batch.sparse)], [order])[0].float()
                        for ebc, order in zip(self.task_ebcs.values(), self.task_feature_order)
                    ]
                )
            )
        out = model_body(self.interaction, self.head, x, own, self.probes)
        head_input = x if self.probes.head_input else None
        # indexed, not unpacked: TorchRec's pipeline FX-traces this forward
        return RankerOutput(
            out[0], out[1], penalty, imputation, out[2], out[3], out[4], head_input, attention
        )  # fmt: skip

    def managed_lookup(self, sparse: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of the managed features. Training, or sharded: the MC-EBC (which
        admits ids while training). A single-process model in eval mode maps ids with
        :func:`managed_rows` instead, so an id unknown to the table reads the miss row it
        trained with (each rank had its own) and scores equal what training saw."""
        mc = self.mc_ebc
        if self.training or not isinstance(mc, ManagedCollisionEmbeddingBagCollection):
            return mc(sparse)[0]
        ebc = mc._embedding_module
        names = _embedding_names(ebc)
        jts = sparse.to_dict()
        remap = feature_remappings(mc)
        values, lengths = [], []
        for f in names:
            values.append(managed_rows(jts[f].values(), *remap[f], self.managed_buckets))
            lengths.append(jts[f].lengths())
        kjt = KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=torch.cat(lengths))
        return ebc(kjt)


def feature_order(
    ebc: EmbeddingBagCollection | None,
    mc_ebc: ManagedCollisionEmbeddingBagCollection | None,
) -> list[str]:
    """The order of the pooled embeddings in the head's input: the plain tables' features,
    then the managed ones, each as an unsharded collection outputs them."""
    return _embedding_names(ebc) + _embedding_names(
        mc_ebc._embedding_module if mc_ebc is not None else None
    )


def _embedding_names(ebc: EmbeddingBagCollection | None) -> list[str]:
    """Feature names in the order an unsharded EBC outputs them (table by table)."""
    if ebc is None:
        return []
    return [f for table in ebc.embedding_bag_configs() for f in table.feature_names]


def build_ranker(
    cfg: JobConfig, device: torch.device | str = "meta", world_size: int = 1
) -> Ranker:
    """Build the model of ``cfg``; embedding tables on ``device`` (``meta`` before sharding).

    Dense parameters are created on the CPU with the current RNG (seed first for determinism)
    and moved by DMP. ``world_size``: the ranks managed-collision tables will be sharded over.
    """
    dtype = cfg.embedding.data_type
    shared = sequence_tables(cfg.features.sparse, cfg.features.sequence)  # into the EC
    plain = [
        f for f in cfg.features.sparse if f.collision != "managed" and f.table_name not in shared
    ]
    managed = [f for f in cfg.features.sparse if f.collision == "managed"]
    ebc = (
        EmbeddingBagCollection(
            tables=embedding_bag_configs(plain, data_type=dtype), device=torch.device(device)
        )
        if plain
        else None
    )
    mc_ebc = (
        managed_ebc(
            embedding_bag_configs(managed, data_type=dtype),
            managed,
            world_size,
            torch.device(device),
        )
        if managed
        else None
    )
    sequences = (
        build_sequence_lookup(
            cfg.features.sparse,
            cfg.features.sequence,
            device,
            [t.name for t in cfg.tasks],
            data_type=dtype,
        )  # fmt: skip
        if cfg.features.sequence
        else None
    )
    # the pooled widths in the order the ranker concatenates them (its feature_order)
    dims = {f.name: f.embedding_dim for f in cfg.features.sparse}
    dims.update(dict(zip(sequences.names, sequences.widths)) if sequences else {})
    order = feature_order(ebc, mc_ebc) + (sequences.names if sequences else [])
    widths = [dims[name] for name in order]
    raw_dim = sum(widths) + len(cfg.features.dense)  # x: the pooled embeddings, dense values
    interaction, in_dim = build_interaction(cfg.model.interaction, widths, len(cfg.features.dense))
    task_names = [t.name for t in cfg.tasks]
    task_ebcs, task_dim = None, 0
    if cfg.model.head == "stem":
        names = cfg.model.stem.features or [f.name for f in cfg.features.sparse]
        own = [
            dataclasses.replace(f, embedding_dim=cfg.model.stem.dim)
            for f in cfg.features.sparse
            if f.name in names
        ]
        task_ebcs = nn.ModuleDict(
            {
                t: EmbeddingBagCollection(
                    tables=embedding_bag_configs(own, table_suffix=f"__{t}", data_type=dtype),
                    device=torch.device(device),
                )
                for t in task_names
            }
        )
        task_dim = cfg.model.stem.dim * len(own)
    binary = [t.name for t in cfg.tasks if t.kind == "binary"]
    layout = [(f, dims[f]) for f in order] + [(d, 1) for d in cfg.features.dense]  # raw x
    if (
        cfg.model.interaction.kind != "none"
    ):  # concat: x, then the interaction's columns; replace: those
        concat = cfg.model.interaction.output == "concat"
        extra = [("interaction", in_dim - raw_dim if concat else in_dim)]
        layout = layout + extra if concat else extra
    head = build_head(cfg.model, in_dim, task_names, task_dim, binary, layout)
    dropout = (
        FeatureDropout(widths, cfg.model.embedding.dropout) if cfg.model.embedding.dropout else None
    )
    model = Ranker(
        ebc, len(cfg.features.dense), head, cfg.model.dense_batch_norm, task_ebcs, mc_ebc,
        interaction, dropout, cfg.model.embedding.l2, sequences,
    )  # fmt: skip
    model.dense_names = list(cfg.features.dense)
    if cfg.model.esmm.escm2_dr > 0:
        model.imputation = Towers(1, raw_dim, cfg.model.tower.hidden)  # reads x
    return model


def input_columns(layout: list[tuple[str, int]] | None, names: list[str]) -> list[int]:
    """The columns of the head's input that ``names`` occupy, in ``names``' order.

    Raises:
        ValueError: a name not in ``layout`` (or no layout)."""
    starts, at = {}, 0
    for name, width in layout or []:
        starts[name] = (at, width)
        at += width
    missing = [n for n in names if n not in starts]
    if missing:
        raise ValueError(f"features {missing} are not in the head's input {list(starts)}")
    return [c for n in names for c in range(starts[n][0], sum(starts[n]))]


def build_head(
    m: ModelConfig,
    in_dim: int,
    task_names: list[str],
    task_dim: int = 0,
    binary_tasks: list[str] | None = None,
    layout: list[tuple[str, int]] | None = None,
) -> nn.Module:
    """The configured multi-task head over inputs of width ``in_dim`` (STEM: + ``task_dim`` per
    task). ``binary_tasks``: AITM's default chain (default: every task). ``layout``: the input's
    column blocks in order, ``(feature, width)`` (PEPNet finds its features' columns in it).

    Raises:
        ValueError: PEPNet without a ``layout`` holding its features."""
    binary_tasks = binary_tasks if binary_tasks is not None else list(task_names)
    gate = dataclasses.replace(m.gate)  # a copy: the polarization cure raises its dropout
    style = ExpertStyle(m.experts.activation, m.experts.norm, m.experts.feature_gate_rank)
    if m.head == "pepnet":
        return PEPNet(
            in_dim, task_names, input_columns(layout, m.pepnet.domain_features),
            input_columns(layout, m.pepnet.prior_features), m.tower.hidden,
            m.pepnet.gate_hidden, style,
        )  # fmt: skip
    towers = None
    if m.head == "dbmtl":  # DBMTL: towers that read their parent tasks', over a base head
        index = {t: i for i, t in enumerate(task_names)}
        parents = task_parents(m.dbmtl.parents, task_names)
        towers = DependentTowers(
            len(task_names),
            (m.shared_bottom.hidden if m.dbmtl.base == "shared_bottom" else m.experts.hidden)[-1],
            m.tower.hidden, m.dbmtl.relation_hidden,
            {index[t]: [index[p] for p in ps] for t, ps in parents.items()},
            m.tower.dropout, m.tower.batch_norm,
        )  # fmt: skip
        m = dataclasses.replace(m, head=m.dbmtl.base)
    if m.head == "aitm":
        return AITM(
            in_dim, task_names, m.aitm.chain or binary_tasks, m.experts.hidden, m.tower.hidden,
            m.aitm.calibration, m.tower.dropout, style,
        )  # fmt: skip
    if m.head == "shared_bottom":
        return SharedBottom(
            in_dim, len(task_names), m.shared_bottom.hidden, m.tower.hidden, m.tower.dropout,
            m.tower.batch_norm, style, towers,
        )  # fmt: skip
    if m.head in ("stem", "ple"):
        mix = MixedExperts(
            m.ple.shared_experts, m.ple.task_experts,
            m.experts.hidden, m.tower.hidden, gate, m.tower.dropout, m.tower.batch_norm, style,
            m.experts.self_gate,
        )  # fmt: skip
        if m.head == "stem":
            return STEM(in_dim, task_dim, task_names, mix)
        return PLE(in_dim, task_names, m.ple.levels, mix)
    return MoE(
        in_dim, task_names, m.experts.num, m.experts.hidden, m.tower.hidden, gate,
        shared_gate=m.head == "omoe", tower_dropout=m.tower.dropout, tower_batch_norm=m.tower.batch_norm, sparse_max_fraction=m.gate.sparse_max_fraction, style=style, towers=towers,
    )  # fmt: skip
