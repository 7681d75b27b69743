"""Shard the model's embedding tables with TorchRec's planner and wrap it in DMP.

The stock EBC sharder offers the planner ``row_wise`` / ``table_row_wise`` only on CUDA, yet they
train on CPU with gloo too, and a row-wise plan was the fastest measured on CPU (the planner's
default ``data_parallel`` for a 200k-row table all-reduces the whole table gradient every step).
:class:`ConfiguredEBCSharder` offers exactly the configured types on every device.

Embedding tables are updated by fbgemm's fused optimizer inside backward
(``apply_optimizer_in_backward``); the dense remainder is wrapped in DDP by DMP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from mtl_dist.config import OptimConfig, ShardingConfig
from mtl_dist.distributed.fbgemm_cpu import install_cpu_eviction_reset
from mtl_dist.distributed.setup import DistInfo


class ConfiguredEBCSharder(EmbeddingBagCollectionSharder):
    """An EBC sharder that offers the planner the configured sharding types on any device."""

    def __init__(self, sharding_types: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self._types = list(sharding_types)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self._types)


class ConfiguredECSharder(EmbeddingCollectionSharder):
    """The sequences' EC sharder (``models/sequence.py``): the configured types among
    table_wise, column_wise, row_wise, on any device. Not data_parallel: TorchRec's
    data-parallel EC takes the whole KJT the ranker passes (every feature's keys) as its own
    and fails splitting it (``split_with_sizes``), where the sharded ones select their keys."""

    def __init__(self, sharding_types: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self._types = [t for t in sharding_types if t in EC_SHARDING_TYPES]

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self._types)


EC_SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")


class RowWiseMCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """The managed-collision EBC sharder on any device: row_wise with fbgemm's fused kernel (the
    only layout TorchRec's managed collision supports; the stock sharder offers it on CUDA only).
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return ["row_wise"]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]


def sharders_for(cfg: ShardingConfig) -> list[ModuleSharder]:
    """The sharders of every embedding module kind the ranker holds."""
    return [
        RowWiseMCSharder(),
        ConfiguredEBCSharder(cfg.sharding_types),
        ConfiguredECSharder(cfg.sharding_types),
    ]


def apply_embedding_optimizer(ebc: EmbeddingBagCollection, cfg: OptimConfig) -> None:
    """Register the fused (in-backward) optimizer on every table; fbgemm applies it in backward.

    ``optim.embedding_weight_decay`` reaches fbgemm's row-wise Adagrad as its ``weight_decay``
    and ``weight_decay_mode`` (fused params): only the rows a batch looks up decay, each step
    they are looked up — L2 adds ``wd · w`` to the row's gradient (inside Adagrad's scaling),
    decouple scales the row by ``1 − lr · wd`` beside the Adagrad step. fbgemm's exact Adagrad
    and SGD have no weight decay (config validation refuses the pairing).
    """
    if cfg.embedding_optimizer == "rowwise_adagrad":
        cls, kwargs = RowWiseAdagrad, {"lr": cfg.embedding_lr, "eps": cfg.embedding_eps}
        if cfg.embedding_weight_decay > 0:
            mode = {"l2": WeightDecayMode.L2, "decouple": WeightDecayMode.DECOUPLE}
            kwargs["weight_decay"] = cfg.embedding_weight_decay
            kwargs["weight_decay_mode"] = mode[cfg.embedding_weight_decay_mode]
    elif cfg.embedding_optimizer == "adagrad":
        cls, kwargs = torch.optim.Adagrad, {"lr": cfg.embedding_lr, "eps": cfg.embedding_eps}
    else:
        cls, kwargs = torch.optim.SGD, {"lr": cfg.embedding_lr}
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)


def embedding_collections(model: nn.Module) -> list[EmbeddingBagCollection | EmbeddingCollection]:
    """Every EBC in ``model`` (the shared one, and STEM's per-task ones) and the sequences' EC."""
    kinds = (EmbeddingBagCollection, EmbeddingCollection)
    return [m for m in model.modules() if isinstance(m, kinds)]


def sharding_constraints(
    model: nn.Module, cfg: ShardingConfig
) -> dict[str, ParameterConstraints] | None:
    """``sharding.force`` as the planner's constraints on every table (None: the planner picks)."""
    if not cfg.force:
        return None
    return {
        t.name: ParameterConstraints(sharding_types=[cfg.force])
        for ebc in embedding_collections(model)
        for t in (
            ebc.embedding_configs()
            if isinstance(ebc, EmbeddingCollection)
            else ebc.embedding_bag_configs()
        )
    }


def plan_sharding(
    model: nn.Module,
    cfg: ShardingConfig,
    info: DistInfo,
    sharders: list[ModuleSharder],
) -> ShardingPlan:
    """Run the planner collectively (every rank gets rank 0's plan)."""
    constraints = sharding_constraints(model, cfg)
    topology = Topology(
        world_size=info.world_size,
        local_world_size=info.local_world_size,
        compute_device=info.device.type,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def shard_model(
    model: nn.Module,
    sharding: ShardingConfig,
    optim: OptimConfig,
    info: DistInfo,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Attach the fused embedding optimizer to every EBC, plan, and wrap ``model`` in DMP (DDP for
    the dense part). A table without it would silently train with TorchRec's default optimizer."""
    for ebc in embedding_collections(model):
        apply_embedding_optimizer(ebc, optim)
    if any(isinstance(m, ManagedCollisionEmbeddingBagCollection) for m in model.modules()):
        install_cpu_eviction_reset()
    sharders = sharders_for(sharding)
    plan = plan_sharding(model, sharding, info, sharders)
    # the dense part's DDP: TorchRec's (static graph, gradients as bucket views), our bucket size
    ddp = DefaultDataParallelWrapper(bucket_cap_mb=sharding.ddp_bucket_cap_mb)
    dmp = DistributedModelParallel(
        module=model, device=info.device, plan=plan, sharders=sharders, data_parallel_wrapper=ddp
    )
    return dmp, plan


def describe_plan(plan: ShardingPlan) -> str:
    """One line per (sharding type, ranks): the tables placed that way."""
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            key = (ps.sharding_type, tuple(sorted(set(ps.ranks or []))))
            groups.setdefault(key, []).append(table)
    return "\n".join(
        f"  {st} on ranks {list(ranks)}: {', '.join(tables)}"
        for (st, ranks), tables in groups.items()
    )
