"""The ranking model: embedding lookups + dense features → multi-task head → ``[B, T]``.

Single-process and parallelism-free; ``mtl_dist.distributed.sharding`` shards its
``EmbeddingBagCollection`` from outside. Built on the ``meta`` device, the tables take no memory
until the planner has placed their shards.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mtl_dist.config import JobConfig, SparseFeature
from mtl_dist.data.batch import Batch
from mtl_dist.models.heads import MMoE


def embedding_bag_configs(
    features: list[SparseFeature], init_scale: float = 0.05
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table; features naming the same table share it."""
    by_table: dict[str, list[SparseFeature]] = defaultdict(list)
    for f in features:
        by_table[f.table_name].append(f)
    return [
        EmbeddingBagConfig(
            name=table,
            num_embeddings=fs[0].num_rows,
            embedding_dim=fs[0].embedding_dim,
            feature_names=[f.name for f in fs],
            pooling=PoolingType.MEAN if fs[0].pooling == "mean" else PoolingType.SUM,
            weight_init_min=-init_scale,
            weight_init_max=init_scale,
        )
        for table, fs in by_table.items()
    ]


class Ranker(nn.Module):
    """Pooled embeddings ``[B, F·D]`` ⊕ dense ``[B, Dd]`` → head → outputs ``[B, T]``.

    Args:
        ebc: the EmbeddingBagCollection (plain, or sharded by DMP).
        num_dense: Dd.
        head: maps ``[B, Din]`` to ``([B, T], gates [B, T, E])``.
        dense_batch_norm: batch-normalise raw dense features.

    Example::

        cfg = load_config(["--config", "configs/default.toml"])
        model = build_ranker(cfg, device=torch.device("cpu"))
        out, gates = model(batch)   # [B, T], [B, T, E]
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        num_dense: int,
        head: nn.Module,
        dense_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.dense_norm = (
            nn.BatchNorm1d(num_dense) if dense_batch_norm and num_dense else nn.Identity()
        )
        self.head = head

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.ebc(batch.sparse).values()  # [B, sum of table dims per feature]
        x = torch.cat([pooled, self.dense_norm(batch.dense)], dim=1)  # [B, Din]
        out = self.head(x)  # indexed, not unpacked: TorchRec's pipeline FX-traces this forward
        return out[0], out[1]


def build_ranker(cfg: JobConfig, device: torch.device | str = "meta") -> Ranker:
    """Build the model of ``cfg``; embedding tables on ``device`` (``meta`` before sharding).

    Dense parameters are created on the CPU with the current RNG (seed first for determinism)
    and moved by DMP.
    """
    ebc = EmbeddingBagCollection(
        tables=embedding_bag_configs(cfg.features.sparse), device=torch.device(device)
    )
    emb_dim = sum(f.embedding_dim for f in cfg.features.sparse)
    in_dim = emb_dim + len(cfg.features.dense)
    m = cfg.model
    head = MMoE(
        in_dim=in_dim,
        num_tasks=len(cfg.tasks),
        num_experts=m.num_experts,
        expert_hidden=m.expert_hidden,
        tower_hidden=m.tower_hidden,
        gate_temperature=m.gate_temperature,
    )
    return Ranker(ebc, len(cfg.features.dense), head, m.dense_batch_norm)
