"""Building the ranker from the config: the embedding collections (plain, managed-collision,
STEM's per-task tables, the sequences' EmbeddingCollection), the interaction stage, the head and
the optional extras (feature dropout, id counts, ESCM2-DR's imputation tower).

:func:`build_ranker` is what training, export and the tools call; :func:`build_head` builds a
head alone. The model they build is :class:`mtl_dist.models.ranker.Ranker`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mtl_dist.config import JobConfig, ModelConfig, SparseFeature, task_parents
from mtl_dist.models.admission import IdCounts
from mtl_dist.models.collision import managed_ebc
from mtl_dist.models.dependent import DependentTowers
from mtl_dist.models.experts import ExpertStyle
from mtl_dist.models.funnel import AITM
from mtl_dist.models.heads import PLE, STEM, MoE, SharedBottom, Towers
from mtl_dist.models.interaction import FeatureDropout, build_interaction
from mtl_dist.models.pepnet import PEPNet
from mtl_dist.models.ple import MixedExperts
from mtl_dist.models.ranker import Ranker, feature_order
from mtl_dist.models.sequence import build_sequence_lookup, sequence_tables


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


def build_ranker(
    cfg: JobConfig, device: torch.device | str = "meta", world_size: int = 1
) -> Ranker:
    """Build the model of ``cfg``; embedding tables on ``device`` (``meta`` before sharding).

    Dense parameters are created on the CPU with the current RNG (seed first for determinism)
    and moved by DMP. ``world_size``: the ranks managed-collision tables will be sharded over.
    """
    ebc, mc_ebc, sequences = build_lookups(cfg, device, world_size)
    # the pooled widths in the order the ranker concatenates them (its feature_order)
    dims = {f.name: f.embedding_dim for f in cfg.features.sparse}
    dims.update(dict(zip(sequences.names, sequences.widths)) if sequences else {})
    order = feature_order(ebc, mc_ebc) + (sequences.names if sequences else [])
    widths = [dims[name] for name in order]
    raw_dim = sum(widths) + len(cfg.features.dense)  # x: the pooled embeddings, dense values
    interaction, in_dim = build_interaction(cfg.model.interaction, widths, len(cfg.features.dense))
    task_names = [t.name for t in cfg.tasks]
    task_ebcs, task_dim = build_task_tables(cfg, device)
    binary = [t.name for t in cfg.tasks if t.kind == "binary"]
    layout = [(f, dims[f]) for f in order] + [(d, 1) for d in cfg.features.dense]  # raw x
    if cfg.model.interaction.kind != "none":  # concat: x, then the interaction's; replace: those
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
    freq = cfg.model.embedding.l2_frequency
    counted = [f for f in cfg.features.sparse if freq or f.admit_min_count]
    if counted:  # the training split's id counts: admission, l2_frequency
        model.id_counts = IdCounts(counted)
        model.l2_frequency = freq
        column_feature = [j for j, w in enumerate(widths) for _ in range(w)]  # [Σ w_f]
        model.register_buffer("feature_of_column", torch.tensor(column_feature), persistent=False)
    if cfg.model.esmm.escm2_dr > 0:
        model.imputation = Towers(1, raw_dim, cfg.model.tower.hidden)  # reads x
    return model


def build_lookups(cfg: JobConfig, device: torch.device | str, world_size: int):
    """The plain EBC, the managed-collision EBC and the sequences' lookup (an
    EmbeddingCollection holding the tables the sequences share); None for each one not needed."""
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
    return ebc, mc_ebc, sequences


def build_task_tables(cfg: JobConfig, device: torch.device | str):
    """STEM's per-task tables (one EBC per task over ``model.stem.features``, ``model.stem.dim``
    wide) and their width per task; ``(None, 0)`` for every other head."""
    dtype = cfg.embedding.data_type
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
    return task_ebcs, task_dim


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
