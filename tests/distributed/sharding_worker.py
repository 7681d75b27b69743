"""Run under ``torchrun --nproc_per_node 2``: every sharding type against an unsharded reference.

For each type the same model is built twice — plain on this CPU (reference) and sharded by DMP
with every table forced to that type — with identical weights. Checks, per rank:
  1. the sharded forward equals the reference forward on this rank's batch;
  2. after one step of fused SGD, every local table shard equals the reference table updated
     with the sum over ranks of each rank's gradient (sharded types; TorchRec sums the
     embedding gradients of all ranks) or their mean (data_parallel: DDP all-reduces a mean);
  3. 30 more steps lower the loss averaged over ranks.
Writes ``<out>/rank_<r>.json``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torchrec.distributed.types import ShardedTensor

from mtl_dist.config import SHARDING_TYPES, JobConfig, SparseFeature, TaskSpec
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.distributed.setup import init_distributed
from mtl_dist.distributed.sharding import shard_model
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.build import build_ranker

TYPES = SHARDING_TYPES
LR = 0.5


def make_cfg(force: str) -> JobConfig:
    cfg = JobConfig()
    cfg.features.sparse = [
        SparseFeature(name="user", vocab_size=3000, embedding_dim=16),
        SparseFeature(name="item", vocab_size=40, embedding_dim=16, pooling="mean"),
        SparseFeature(
            name="hist",
            vocab_size=40,
            embedding_dim=16,
            table="item",
            multi_hot=True,
            pooling="mean",
        ),
    ]
    cfg.features.dense = ["d0", "d1"]
    cfg.tasks = [TaskSpec(name="a", label="a"), TaskSpec(name="b", label="b", kind="regression")]
    cfg.model.experts.hidden = [16, 8]
    cfg.model.tower.hidden = [4]
    cfg.model.dense_batch_norm = False  # BN statistics are per rank; keep the forward comparable
    cfg.optim.embedding_optimizer = "sgd"
    cfg.optim.embedding_lr = LR
    cfg.sharding.force = force
    return cfg


def make_batch(cfg: JobConfig, rank: int, n: int = 64):
    import pyarrow as pa

    g = torch.Generator().manual_seed(100 + rank)
    hist = [
        torch.randint(0, 40, (int(k),), generator=g).tolist()
        for k in torch.randint(0, 4, (n,), generator=g)
    ]
    t = pa.table(
        {
            "user": pa.array(torch.randint(0, 3000, (n,), generator=g).tolist(), pa.int64()),
            "item": pa.array(torch.randint(0, 40, (n,), generator=g).tolist(), pa.int64()),
            "hist": pa.array(hist, pa.list_(pa.int64())),
            "d0": pa.array(torch.randn(n, generator=g).tolist(), pa.float32()),
            "d1": pa.array(torch.randn(n, generator=g).tolist(), pa.float32()),
            "a": pa.array(torch.randint(0, 2, (n,), generator=g).tolist(), pa.int8()),
            "b": pa.array(torch.randn(n, generator=g).tolist(), pa.float32()),
        }
    )
    return ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(t)


@torch.no_grad()
def copy_state_dict(local_sd, global_sd) -> None:
    """Load full reference tensors into the sharded model: each local shard gets its slice."""
    for name, t in local_sd.items():
        ref = global_sd[name]
        if isinstance(t, ShardedTensor):
            for shard in t.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                rows, cols = shard.tensor.shape
                shard.tensor.copy_(ref[r0 : r0 + rows, c0 : c0 + cols])
        else:
            t.copy_(ref)


def local_shards_match(sharded_sd, ref_sd, atol=1e-5) -> float:
    """Max abs difference between every local table shard and the same slice of the reference."""
    worst = 0.0
    for name, t in sharded_sd.items():
        ref = ref_sd[name]
        if not isinstance(t, ShardedTensor):
            if ".ebc." in name:  # a data_parallel table: a full replica on every rank
                worst = max(worst, (t - ref).abs().max().item())
            continue
        for shard in t.local_shards():
            r0, c0 = shard.metadata.shard_offsets
            rows, cols = shard.tensor.shape
            worst = max(
                worst, (shard.tensor - ref[r0 : r0 + rows, c0 : c0 + cols]).abs().max().item()
            )
    return worst


def main(out_dir: str) -> None:
    info = init_distributed("cpu", threads=1)
    world = info.world_size
    results = {}
    for force in TYPES:
        cfg = make_cfg(force)
        torch.manual_seed(0)
        ref = ModelWithLoss(build_ranker(cfg, device="cpu"), cfg.tasks)
        ref_step = TrainStep(ref)
        ref_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        torch.manual_seed(0)
        model = ModelWithLoss(build_ranker(cfg, device="meta"), cfg.tasks)
        step_fn = TrainStep(model)
        dmp, plan = shard_model(model, cfg.sharding, cfg.optim, info)
        types = {ps.sharding_type for mp in plan.plan.values() for ps in mp.values()}
        copy_state_dict(dmp.state_dict(), ref_sd)

        batches = [make_batch(cfg, r) for r in range(world)]
        mine = batches[info.rank]
        loss, out = step_fn.loss(dmp(mine))
        _, ref_out = ref(mine)
        fwd_diff = (out.preds - ref_out.preds).abs().max().item()

        # one fused-SGD step on the sharded model (tables update inside backward)
        loss.backward()
        # reference: gradient summed over the ranks' losses (or averaged for data_parallel)
        ref.zero_grad()
        for b in batches:
            ref_step.loss(ref(b))[0].backward()
        scale = 1.0 / world if force == "data_parallel" else 1.0
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if ".ebc." in name:
                    ref_sd[name] = p - LR * scale * p.grad
        step_diff = local_shards_match(dmp.state_dict(), ref_sd)

        for group in dmp.fused_optimizer.param_groups:
            group["lr"] = 0.05
        dense = torch.optim.SGD([p for n, p in dmp.named_parameters() if ".ebc." not in n], lr=0.1)

        def mean_over_ranks(x: torch.Tensor) -> float:
            x = x.detach().clone()
            dist.all_reduce(x)
            return x.item() / world

        losses = [mean_over_ranks(loss)]
        for _ in range(30):
            dense.zero_grad()
            loss, _ = step_fn.loss(dmp(mine))
            loss.backward()
            dense.step()
            losses.append(mean_over_ranks(loss))
        results[force] = {
            "planned": sorted(types),
            "forward_max_abs_diff": fwd_diff,
            "step_max_abs_diff": step_diff,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        dist.barrier()
    # STEM's per-task tables live in their own EBCs: they must get the configured fused
    # optimizer too (not TorchRec's default), and be planned like the shared tables
    cfg = make_cfg("")
    cfg.model.head, cfg.model.stem.features, cfg.optim.embedding_lr = "stem", ["user"], 0.3
    torch.manual_seed(0)
    stem = ModelWithLoss(build_ranker(cfg, device="meta"), cfg.tasks)
    dmp, plan = shard_model(stem, cfg.sharding, cfg.optim, info)
    results["stem"] = {
        "fused_lrs": sorted({round(g["lr"], 6) for g in dmp.fused_optimizer.param_groups}),
        "planned_tables": sorted(t for mp in plan.plan.values() for t in mp),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank_{info.rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
