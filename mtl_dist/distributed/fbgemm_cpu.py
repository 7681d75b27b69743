"""A kernel fbgemm-gpu-cpu 1.8 lacks, supplied for CPU tables: the row reset of managed-collision
eviction (see :mod:`mtl_dist.models.collision`). Patched into fbgemm's table-batched
embedding class when :func:`mtl_dist.distributed.sharding.shard_model` shards a model."""

from __future__ import annotations

import torch


def install_cpu_eviction_reset() -> None:
    """Give fbgemm's CPU tables the eviction reset TorchRec calls (``reset_weight_momentum`` has
    no CPU kernel in fbgemm-gpu-cpu 1.8): zero the evicted rows and their optimizer state, which
    TorchRec then re-initialises. CUDA tables keep fbgemm's kernel. Idempotent."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen as TBE,
    )

    if getattr(TBE.reset_embedding_weight_momentum, "_mtl_dist_cpu", False):
        return
    fbgemm_reset = TBE.reset_embedding_weight_momentum

    def reset(self, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids):
        if self.current_device.type != "cpu":
            return fbgemm_reset(
                self, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids
            )
        with torch.no_grad():
            tables = logical_table_ids.reshape(-1).tolist()
            bounds = pruned_indices_offsets.reshape(-1).tolist()
            for i, t in enumerate(tables):
                rows = pruned_indices[bounds[i] : bounds[i + 1]].long()
                self.split_embedding_weights()[t][rows] = 0.0
                for state in self.split_optimizer_states()[t]:
                    state[rows] = 0.0

    reset._mtl_dist_cpu = True  # type: ignore[attr-defined]
    TBE.reset_embedding_weight_momentum = reset
