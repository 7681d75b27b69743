"""Run under ``torchrun --nproc_per_node 1``: the embedding regularisers through DMP's fused
table optimizers, one step from the same weights on the same batch.

* ``model.embedding.l2`` with fused SGD, λ = 0 and λ = L2: the ``user`` table (single-hot, its
  own table) before and after the step, and how often the batch looked up each row;
* ``optim.embedding_weight_decay``: the weight decay and mode fbgemm's row-wise Adagrad got.

Writes ``<out>/weight_decay.json``.
"""

import json
import sys

import torch
from torchrec.distributed.types import ShardedTensor

from mtl_dist.distributed.setup import init_distributed
from mtl_dist.distributed.sharding import shard_model
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.build import build_ranker
from tests.distributed.sharding_worker import copy_state_dict, make_batch, make_cfg

LR, L2 = 0.5, 10.0


def user_table(dmp) -> torch.Tensor:
    """The whole ``user`` table (table-wise on one rank: the one local shard)."""
    (t,) = [v for k, v in dmp.state_dict().items() if k.endswith("embedding_bags.user.weight")]
    return (t.local_shards()[0].tensor if isinstance(t, ShardedTensor) else t).detach().clone()


def sharded(cfg, info):
    torch.manual_seed(0)
    ref_sd = ModelWithLoss(build_ranker(cfg, device="cpu"), cfg.tasks).state_dict()
    model = ModelWithLoss(build_ranker(cfg, device="meta"), cfg.tasks)
    step_fn = TrainStep(model)
    dmp, _ = shard_model(model, cfg.sharding, cfg.optim, info)
    copy_state_dict(dmp.state_dict(), ref_sd)
    return dmp, model, step_fn


def main(out_dir: str) -> None:
    info = init_distributed("cpu", threads=1)
    results = {}
    for l2 in (0.0, L2):
        cfg = make_cfg("table_wise")  # fused SGD
        cfg.optim.embedding_lr = LR
        cfg.model.embedding.l2 = l2
        dmp, model, step_fn = sharded(cfg, info)
        batch = make_batch(cfg, 0)
        before = user_table(dmp)
        forward = dmp(batch)
        loss, _ = step_fn.loss(forward)
        loss.backward()
        results[f"l2_{l2:g}"] = {
            "before": before.tolist(),
            "after": user_table(dmp).tolist(),
            "penalty": float(forward[0].penalty) if l2 else None,
        }
        results["ids"] = batch.sparse["user"].values().tolist()
    cfg = make_cfg("table_wise")
    cfg.optim.embedding_optimizer = "rowwise_adagrad"
    cfg.optim.embedding_weight_decay = 0.25
    cfg.optim.embedding_weight_decay_mode = "decouple"
    _, model, _ = sharded(cfg, info)
    results["fused"] = [
        (m.optimizer.name, m.optimizer_args.weight_decay, m.optimizer_args.weight_decay_mode)
        for lookup in model.model.ebc._lookups
        for emb in getattr(lookup, "module", lookup)._emb_modules
        for m in [emb._emb_module]
    ]
    results.update(lr=LR, l2=L2)
    with open(f"{out_dir}/weight_decay.json", "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1])
