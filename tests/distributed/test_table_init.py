"""MEDA's table re-initialisation (``mtl_dist/distributed/table_init.py``)."""

import json

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mtl_dist.distributed.table_init import ROW_BLOCK, reference_table, table_block
from tests.conftest import torchrun
from tests.distributed.sharding_worker import TYPES


def _cfg(rows: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=4, feature_names=["f"],
                              weight_init_min=-0.05, weight_init_max=0.05)  # fmt: skip


def test_values_depend_on_seed_epoch_and_block_only():
    cfg = _cfg(ROW_BLOCK + 10)
    full = reference_table(cfg, seed=3, epoch=1)
    assert full.shape == (ROW_BLOCK + 10, 4)
    assert full.min() >= -0.05 and full.max() <= 0.05  # the build-time U(-0.05, 0.05)
    assert abs(full.std().item() - 0.1 / 12**0.5) < 1e-3
    # a block is the same drawn alone, so a shard draws only the blocks it holds
    assert torch.equal(table_block(cfg, 3, 1, 1), full[ROW_BLOCK:])
    assert torch.equal(reference_table(cfg, 3, 1), full)  # deterministic
    assert not torch.equal(reference_table(cfg, 3, 2), full)  # another epoch: other values
    assert not torch.equal(reference_table(cfg, 4, 1), full)  # another seed too


def test_reinit_on_every_sharding_type_two_ranks(tmp_path):
    """Trained tables re-initialised: every local shard equals its slice of the reference
    table (any sharding type), rows moved; the dense parameters and Adam's moments of the dense
    layers bit-identical; the fused optimizer's state (and a data-parallel table's Adam state,
    which the dense optimizer holds) zero, and filled again by the next step."""
    proc = torchrun(["-m", "tests.distributed.table_init_worker", str(tmp_path)], nproc=2)
    assert proc.returncode == 0
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        assert sorted(results) == sorted(TYPES)
        for st, r in results.items():
            assert r["tables"] == ["item", "user"], (st, r)
            assert r["reference_max_abs_diff"] == 0.0, (st, r)
            assert r["min_mean_abs_move"] > 0.01, (st, r)
            assert r["dense_same"] and r["dense_moments_same"], (st, r)
            assert r["momentum_after"] == 0.0 and r["dense_table_moments_after"] == 0.0, (st, r)
            if st == "data_parallel":  # the dense optimizer trains its rows
                assert r["dense_table_moments_before"] > 0, r
            else:
                assert r["momentum_before"] > 0 and r["momentum_after_step"] > 0, (st, r)
            assert r["reset_elements"] > 0, (st, r)
