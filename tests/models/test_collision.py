"""Managed collision in one process: raw ids as the reader hands them to the MCH module, the
single-process row map against TorchRec's own remap (and against the per-rank miss rows of a
sharded run), and the config's limits."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import xxhash
from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from mtl_dist.config import ConfigError, SparseFeature, load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.ids import RAW_ID_SPACE
from mtl_dist.models.collision import managed_rows
from mtl_dist.tools.bench.hashing import sized_config
from tests.conftest import ROOT


def test_raw_ids_of_a_managed_feature():
    """Strings keep their full xxh3_64 (mod 2^63 - 1), integers their value (a negative one too),
    nulls in lists follow invalid_ids: the table size plays no part before the MCH module."""
    f = SparseFeature(name="k", hash_buckets=10, collision="managed", invalid_ids="drop")
    conv = ArrowBatchConverter([f], [], [])
    batch = conv(pa.table({"k": pa.array(["u_1", "🙂", "u_1"])}))
    want = [xxhash.xxh3_64_intdigest(s.encode(), 0) % RAW_ID_SPACE for s in ("u_1", "🙂", "u_1")]
    assert batch.sparse.values().tolist() == want
    assert max(want) >= 10  # not reduced to the table
    batch = conv(pa.table({"k": pa.array([[5, None, -3], [2**62]], pa.list_(pa.int64()))}))
    assert batch.sparse.values().tolist() == [5, RAW_ID_SPACE - 3, 2**62]
    assert batch.sparse.lengths().tolist() == [2, 1]


def _trained_module(rows: int) -> MCHManagedCollisionModule:
    m = MCHManagedCollisionModule(
        zch_size=rows,
        device=torch.device("cpu"),
        eviction_policy=LFU_EvictionPolicy(),
        eviction_interval=1,
        input_hash_size=0,
    )
    ids = torch.tensor([7, 7, 7, 3, 3, 11, 40, 40, 2**40, 5])
    m.train()
    m({"f": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})
    return m.eval()


def test_single_process_rows_equal_torchrec_remap():
    m = _trained_module(8)
    kept = m._mch_sorted_raw_ids[m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max]
    assert len(kept) == 6  # 7 rows for ids, the 8th is the miss row
    probe = torch.tensor([7, 3, 11, 40, 2**40, 5, 6, 2**50, 0])
    torchrec = m.remap({"f": JaggedTensor(values=probe, lengths=torch.tensor([9]))})["f"].values()
    ours = managed_rows(probe, m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping, 1)
    assert ours.tolist() == torchrec.tolist()
    assert ours[-3:].tolist() == [7, 7, 7]  # unknown ids: the miss row N - 1
    assert len(set(ours[:6].tolist())) == 6  # no two kept ids share a row


def test_rows_of_a_table_trained_on_two_ranks():
    """Trained on 2 ranks, rank r held the ids with raw mod 2 == r on rows [r·N/2, (r+1)·N/2),
    its miss row the block's last: an unknown id reads the miss row its rank trained."""
    sorted_raw = torch.tensor([4, 9, 10, 21, 2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1])
    mapping = torch.tensor([0, 4, 1, 5, 2, 3, 6, 7])
    probe = torch.tensor([4, 9, 10, 21, 8, 13])
    rows = managed_rows(probe, sorted_raw, mapping, 2)
    assert rows.tolist() == [0, 4, 1, 5, 3, 7]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.head", "stem"], "cannot have STEM's per-task tables"),
        (["--sharding.force", "table_wise"], "shard row_wise only"),
    ],
)
def test_managed_feature_limits(tmp_path, args, needle):
    toml = tmp_path / "job.toml"
    toml.write_text(
        sized_config(
            (ROOT / "configs/strings.toml").read_text(), {"user_id": 4000}, collision="managed"
        )
    )
    with pytest.raises(ConfigError, match=needle):
        load_config(["--config", str(toml), *args])
    if args[0] == "--model.head":  # STEM over the other features only: fine
        load_config(["--config", str(toml), *args, "--model.stem.features", "item_id,city_id"])


def test_managed_collision_needs_buckets_and_a_known_policy(tmp_path):
    toml = tmp_path / "job.toml"
    base = (ROOT / "configs/default.toml").read_text()
    toml.write_text(
        base + '\n[[features.sparse]]\nname = "k"\nvocab_size = 9\ncollision = "managed"\n'
    )
    with pytest.raises(ConfigError, match="collision = 'managed' needs hash_buckets"):
        load_config(["--config", str(toml)])
    toml.write_text(
        base + '\n[[features.sparse]]\nname = "k"\nhash_buckets = 9\neviction = "lfru"\n'
    )
    with pytest.raises(ConfigError, match=r"eviction: expected lfu \| lru, got 'lfru'"):
        load_config(["--config", str(toml)])
