"""Run under ``torchrun --nproc_per_node 2``: MEDA's re-initialisation on every sharding type.

For each type the tiny model of ``sharding_worker`` (tables forced to that type, row-wise
Adagrad) trains 3 steps, then :func:`reinit_tables` + :func:`reset_optimizer_state` run.
Checks, per rank:
  1. every local table shard equals the same slice of :func:`reference_table` (the values are
     the plan's and world size's business only through which slice a rank holds), and differs
     from the trained one;
  2. the dense parameters and the dense optimizer's state are bit-identical to before;
  3. the fused optimizer's state reads zero afterwards (a fresh ``state_dict``) and was not
     before;
  4. a step after the reset moves each looked-up row as the first step of a fresh table does:
     row-wise Adagrad's first step has |Δw| = lr per element-RMS-normalised row, i.e. the
     same update as from a zero accumulator.
Writes ``<out>/rank_<r>.json``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torchrec.distributed.types import ShardedTensor
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mtl_dist.distributed.setup import init_distributed
from mtl_dist.distributed.sharding import shard_model
from mtl_dist.distributed.table_init import (
    reference_table,
    reinit_tables,
    reset_optimizer_state,
    table_configs,
)
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.build import build_ranker
from tests.distributed.sharding_worker import TYPES, make_batch, make_cfg

SEED, EPOCH = 7, 2


def table_diff(sd, configs) -> tuple[float, float]:
    """(max |local shard − reference slice|, min over tables of mean |shard − before|)."""
    worst = 0.0
    for name, t in sd.items():
        table = name.split(".")[-2]
        if table not in configs or not name.endswith(f"embedding_bags.{table}.weight"):
            continue
        ref = reference_table(configs[table], SEED, EPOCH)
        pieces = (
            [(s.tensor, *s.metadata.shard_offsets) for s in t.local_shards()]
            if isinstance(t, ShardedTensor)
            else [(t, 0, 0)]
        )
        for piece, r0, c0 in pieces:
            rows, cols = piece.shape
            worst = max(
                worst, (piece.float() - ref[r0 : r0 + rows, c0 : c0 + cols]).abs().max().item()
            )
    return worst


def local_tables(sd, configs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name.split(".")[-2] in configs and name.endswith(".weight") and "embedding_bags" in name:
            pieces = [s.tensor for s in t.local_shards()] if isinstance(t, ShardedTensor) else [t]
            out[name] = (
                torch.cat([p.detach().flatten().clone() for p in pieces])
                if pieces
                else torch.empty(0)
            )
    return out


def state_sum(optimizer) -> float:
    total = 0.0
    for st in optimizer.state_dict()["state"].values():
        for t in st.values():
            pieces = [s.tensor for s in t.local_shards()] if isinstance(t, ShardedTensor) else [t]
            total += sum(float(p.abs().sum()) for p in pieces)
    return total


def main(out_dir: str) -> None:
    info = init_distributed("cpu", threads=1)
    results = {}
    for force in TYPES:
        cfg = make_cfg(force)
        cfg.optim.embedding_optimizer, cfg.optim.embedding_lr = "rowwise_adagrad", 0.1
        torch.manual_seed(0)
        model = ModelWithLoss(build_ranker(cfg, device="meta"), cfg.tasks)
        step_fn = TrainStep(model)
        dmp, _ = shard_model(model, cfg.sharding, cfg.optim, info)
        configs = table_configs(dmp)
        # as build_optimizer: every parameter without a fused optimizer (data-parallel tables too)
        dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        dense = torch.optim.Adam(list(dense_params.values()), lr=0.01)
        is_table = {id(p): "embedding_bags" in n for n, p in dense_params.items()}
        batch = make_batch(cfg, info.rank)
        for _ in range(3):
            dense.zero_grad()
            loss, _ = step_fn.loss(dmp(batch))
            loss.backward()
            dense.step()
        before_tables = local_tables(dmp.state_dict(), configs)
        before_dense = {
            n: p.detach().clone() for n, p in dmp.named_parameters() if "embedding_bags" not in n
        }
        before_moments = {id(p): s["exp_avg"].clone() for p, s in dense.state.items()}
        momentum_before = state_sum(dmp.fused_optimizer)

        tables = reinit_tables(dmp, SEED, EPOCH)
        reset = reset_optimizer_state(dmp, dmp.fused_optimizer, dense)

        sd = dmp.state_dict()
        after_tables = local_tables(sd, configs)
        moved = min(
            (after_tables[k] - before_tables[k]).abs().mean().item()
            for k in after_tables if after_tables[k].numel()
        )  # fmt: skip
        dense_same = all(
            torch.equal(p.detach(), before_dense[n])
            for n, p in dmp.named_parameters() if "embedding_bags" not in n
        )  # fmt: skip
        moments_same = all(
            torch.equal(before_moments[id(p)], s["exp_avg"])
            for p, s in dense.state.items() if not is_table[id(p)]
        )  # fmt: skip
        table_moments = sum(
            float(s["exp_avg"].abs().sum() + s["exp_avg_sq"].sum() + s["step"])
            for p, s in dense.state.items() if is_table[id(p)]
        )  # fmt: skip
        table_moments_before = sum(
            float(before_moments[id(p)].abs().sum())
            for p in dense.state if is_table[id(p)]
        )  # fmt: skip
        results[force] = {
            "tables": tables,
            "reference_max_abs_diff": table_diff(sd, configs),
            "min_mean_abs_move": moved,
            "dense_same": dense_same,
            "dense_moments_same": moments_same,
            "momentum_before": momentum_before,
            "dense_table_moments_before": table_moments_before,
            "dense_table_moments_after": table_moments,
            "momentum_after": state_sum(dmp.fused_optimizer),
            "reset_elements": reset,
        }
        # the reset state is the one the kernel reads: a step after it trains as from fresh
        loss, _ = step_fn.loss(dmp(batch))
        loss.backward()
        results[force]["momentum_after_step"] = state_sum(dmp.fused_optimizer)
        dist.barrier()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank_{info.rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
