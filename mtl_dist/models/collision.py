"""Managed collision: raw ids → rows of a fixed-size table with no two kept ids sharing a row.

A feature with ``collision = "managed"`` is looked up through TorchRec's
``ManagedCollisionEmbeddingBagCollection``: an ``MCHManagedCollisionModule`` per table keeps the
ids seen most often (``eviction = "lfu"``) or most recently (``"lru"``), each on a row of its own
(zero collisions among kept ids); every other id reads the table's miss row. New ids are
admitted every ``eviction_interval`` training steps, evicting others, whose rows (and row-wise
optimizer state) are reset to zero (an admitted id starts from a zero embedding). This follows TorchRec's ZCH ("zero collision hashing",
``torchrec.modules.mc_modules``); the modules shard row-wise only, each rank's block of rows
serving the raw ids ``id mod world_size`` routes to it, with its own miss row (the block's last).

On CPU, fbgemm 1.8 lacks the kernel that resets an evicted row (``fbgemm::reset_weight_momentum``);
:func:`mtl_dist.distributed.fbgemm_cpu.install_cpu_eviction_reset` supplies it for CPU tables
(plain tensor writes; applied when the model is sharded), so CPU training needs no CUDA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)

from mtl_dist.config import SparseFeature

EVICTION_POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}


def managed_ebc(
    tables: list[EmbeddingBagConfig],
    features: list[SparseFeature],
    buckets: int,
    device: torch.device,
) -> ManagedCollisionEmbeddingBagCollection:
    """An MC-EBC over ``tables`` (each table's rows = its ``hash_buckets``).

    Args:
        tables: the managed tables' configs.
        features: the sparse features (each table's first feature gives its eviction keys).
        buckets: the world size the tables are sharded over (the routing is ``id mod buckets``:
            ``input_hash_size = 0``); each table's rows must divide by it.
        device: ``meta`` before sharding, ``cpu`` for a single-process model.

    Raises:
        ValueError: a table's rows do not divide by ``buckets``.
    """
    by_table = {f.table_name: f for f in reversed(features)}
    # a row starts at zero, and so does the row of each id admitted later: eviction re-initialises
    # rows with the table's init_fn, and a random one would draw from the global RNG at times
    # that depend on the data (a resumed run would then differ from an uninterrupted one)
    tables = [dataclasses.replace(t, init_fn=nn.init.zeros_) for t in tables]
    modules = {}
    for t in tables:
        f = by_table[t.name]
        if t.num_embeddings % buckets:
            raise ValueError(
                f"feature '{f.name}': collision = 'managed' shards its {t.num_embeddings} rows "
                f"over {buckets} ranks; hash_buckets must divide by the world size"
            )
        modules[t.name] = MCHManagedCollisionModule(
            zch_size=t.num_embeddings,
            device=torch.device("cpu") if torch.device(device).type == "meta" else device,
            eviction_policy=EVICTION_POLICIES[f.eviction](),
            eviction_interval=f.eviction_interval,
            input_hash_size=0,  # route raw id mod world size: balanced blocks, no id wraps
            buckets=buckets,
        )
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    return ManagedCollisionEmbeddingBagCollection(ebc, ManagedCollisionCollection(modules, tables))


def managed_rows(
    raw: torch.Tensor, sorted_raw: torch.Tensor, mapping: torch.Tensor, buckets: int
) -> torch.Tensor:
    """Rows ``[n]`` (int64) of raw ids ``[n]`` as a table trained over ``buckets`` ranks maps them.

    A kept id reads its own row; any other id the miss row of the rank that owns it: the last
    row of block ``raw mod buckets`` (the single miss row ``N - 1`` when ``buckets == 1``).
    ``sorted_raw`` / ``mapping`` ``[N]``: the module's ``_mch_sorted_raw_ids`` (ascending) and
    ``_mch_remapped_ids_mapping``. Plain tensor ops, so ``torch.export`` traces it.
    """
    idx = torch.searchsorted(sorted_raw[:-1], raw)
    hit = sorted_raw[idx] == raw
    block = sorted_raw.numel() // buckets
    miss = (torch.remainder(raw, buckets) + 1) * block - 1
    return torch.where(hit, mapping[idx], miss)


def feature_remappings(
    mc: ManagedCollisionEmbeddingBagCollection,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per managed feature of an (unsharded) MC-EBC, its table's trained ``(sorted raw ids,
    rows)`` ``[N]`` each, as :func:`managed_rows` reads them: the one walk through TorchRec's
    private attributes, shared by the ranker's eval lookup and the served program."""
    modules = mc._managed_collision_collection._managed_collision_modules
    return {
        f: (modules[cfg.name]._mch_sorted_raw_ids, modules[cfg.name]._mch_remapped_ids_mapping)
        for cfg in mc._embedding_module.embedding_bag_configs()
        for f in cfg.feature_names
    }


def collision_modules(model: nn.Module) -> dict[str, MCHManagedCollisionModule]:
    """Every (local) MCH module in ``model`` by its qualified name (sharded or not)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MCHManagedCollisionModule)}


def history_state(model: nn.Module) -> dict[str, Any]:
    """This rank's ids recorded since the last admission, per MCH module (not in TorchRec's
    state dict), with the iteration of that admission: what exact resume needs."""
    out = {}
    for name, m in collision_modules(model).items():
        if m._input_history_buffer_size < 0:  # no training forward yet
            continue
        n = m._current_history_buffer_offset
        out[name] = {
            "ids": m._history_accumulator[:n].clone(),
            "metadata": {k: v[:n].clone() for k, v in m._history_metadata.items()},
            "size": m._input_history_buffer_size,
            "last_eviction": m._last_eviction_iter,
        }
    return out


def restore_history(model: nn.Module, state: dict[str, Any] | None) -> None:
    """Put back what :func:`history_state` saved (same world size), or, with ``state`` None
    (another world size: the ids a rank recorded were routed for the old one), keep only the
    admission schedule: the next admission comes when the uninterrupted run's would."""
    for name, m in collision_modules(model).items():
        it = int(m._current_iter_tensor.item())
        m._current_iter = it
        saved = (state or {}).get(name)
        if saved is None:
            m._last_eviction_iter = it - it % m._eviction_interval
            continue
        m._last_eviction_iter = saved["last_eviction"]
        m._input_history_buffer_size = saved["size"]
        ids = saved["ids"]
        m._history_accumulator = torch.empty(saved["size"], dtype=torch.int64, device=m.device)
        m._history_accumulator[: ids.numel()] = ids
        for key, values in saved["metadata"].items():
            buf = torch.zeros(saved["size"], dtype=torch.int64, device=m.device)
            buf[: values.numel()] = values
            m.register_buffer(f"_history_{key}", buf, persistent=False)
            m._history_metadata[key] = buf
        m._current_history_buffer_offset = ids.numel()
