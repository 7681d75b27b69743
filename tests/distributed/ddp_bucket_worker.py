"""Run under ``torchrun --nproc_per_node 2``: ``sharding.ddp_bucket_cap_mb`` reaches the dense
part's DDP and changes only when the all-reduce runs, not the numbers.

The same model (same seed, same per-rank batches) is sharded twice, with the default 25 MiB
buckets and with 1 MiB ones (the dense part here is about 2 MiB of gradients, so the small cap
splits it into several buckets); each trains 5 steps of dense Adam + fused SGD. Writes
``<out>/rank_<r>.json``: each run's bucket cap in bytes, its number of buckets and its losses.
"""

import json
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from mtl_dist.distributed.setup import init_distributed
from mtl_dist.distributed.sharding import shard_model
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.build import build_ranker
from tests.distributed.sharding_worker import make_batch, make_cfg


def run(cap_mb: int, info) -> dict:
    cfg = make_cfg("")
    cfg.model.experts.hidden = [512, 256]  # ~2 MiB of dense gradients
    cfg.sharding.ddp_bucket_cap_mb = cap_mb
    torch.manual_seed(0)
    model = ModelWithLoss(build_ranker(cfg, device="meta"), cfg.tasks)
    step_fn = TrainStep(model)
    dmp, _ = shard_model(model, cfg.sharding, cfg.optim, info)
    ddp = next(m for m in dmp.modules() if isinstance(m, DistributedDataParallel))
    dense = [p for n, p in dmp.named_parameters() if "ebc" not in n]
    opt = torch.optim.Adam(dense, lr=1e-3)
    losses = []
    for step in range(5):
        loss, _ = step_fn.loss(dmp(make_batch(cfg, 10 * info.rank + step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    buckets = ddp._get_ddp_logging_data().get("num_buckets_reduced")
    return {"cap_bytes": ddp.bucket_bytes_cap, "buckets": buckets, "losses": losses}


def main(out_dir: str) -> None:
    info = init_distributed("cpu", threads=1)
    result = {str(cap): run(cap, info) for cap in (25, 1)}
    with open(os.path.join(out_dir, f"rank_{info.rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
