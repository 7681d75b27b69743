"""String ids: hashed with xxh3_64 of their UTF-8 bytes (seeded) mod hash_buckets, the same
for every Arrow string type, single- and multi-hot; nulls and empty strings follow the
feature's invalid_ids policy like integer ids do."""

from __future__ import annotations

import pyarrow as pa
import pytest
import xxhash

from mtl_dist.config import SparseFeature
from mtl_dist.data.batch import ArrowBatchConverter

N = 1000


def ids_of(arr: pa.Array, seed: int = 0, **kw) -> tuple[list[int], list[int]]:
    feature = SparseFeature(name="user", hash_buckets=N, **kw)
    batch = ArrowBatchConverter([feature], [], [], hash_seed=seed)(pa.table({"user": arr}))
    return batch.sparse.values().tolist(), batch.sparse.lengths().tolist()


def reference(value: str, seed: int = 0) -> int:
    """What a server in any language computes: XXH3_64bits_withSeed(utf8, seed) mod N."""
    return xxhash.xxh3_64_intdigest(value.encode("utf-8"), seed) % N


KEYS = ["u_00017", "u_42", "🙂", "u_00017", "68fd1e64"]


@pytest.mark.parametrize(
    "arr",
    [
        pa.array(KEYS, pa.string()),
        pa.array(KEYS, pa.large_string()),
        pa.array([k.encode() for k in KEYS], pa.binary()),
        pa.array(KEYS, pa.string()).dictionary_encode(),
    ],
    ids=["string", "large_string", "binary", "dictionary"],
)
def test_every_string_type_hashes_to_the_documented_row(arr):
    values, lengths = ids_of(arr)
    assert values == [reference(k) for k in KEYS] and lengths == [1] * 5
    assert values[0] == values[3]  # the same key, the same row


def test_seed_changes_the_rows():
    assert ids_of(pa.array(KEYS), seed=7)[0] == [reference(k, 7) for k in KEYS]
    assert ids_of(pa.array(KEYS), seed=7)[0] != ids_of(pa.array(KEYS))[0]


def test_multi_hot_string_lists():
    arr = pa.array([["a", "b"], [], None, ["c"]], pa.list_(pa.string()))
    values, lengths = ids_of(arr, multi_hot=True)
    assert values == [reference(k) for k in "abc"] and lengths == [2, 0, 0, 1]


def test_nulls_and_empty_strings_follow_invalid_ids():
    single = pa.array(["a", None, "", "b"])
    with pytest.raises(ValueError, match=r"column 'user': 1 null or empty string id\(s\)"):
        ids_of(single)  # the empty string; a single-hot null is just an empty bag
    values, lengths = ids_of(single, invalid_ids="drop")
    assert values == [reference("a"), reference("b")] and lengths == [1, 0, 0, 1]
    lists = pa.array([["a", None, ""], ["b"]], pa.list_(pa.string()))
    with pytest.raises(ValueError, match=r"2 null or empty string id\(s\)"):
        ids_of(lists, multi_hot=True)
    values, lengths = ids_of(lists, multi_hot=True, invalid_ids="clip")
    assert values == [reference("a"), reference("b")] and lengths == [1, 1]
    assert ids_of(pa.array([None, None], pa.string()))[1] == [0, 0]  # all null: empty bags


def test_string_ids_without_hash_buckets_are_refused_from_the_schema():
    conv = ArrowBatchConverter([SparseFeature(name="user", vocab_size=10)], [], [])
    with pytest.raises(ValueError, match=r"column 'user': string ids need hash_buckets = N"):
        conv.check_schema(pa.schema([("user", pa.string())]))
