"""``train.cpu_affinity``: each local rank on its own physical cores (issue 28's 2 × 1 scaling)."""

import json
import os

import pytest

from mtl_dist.distributed.setup import cpu_blocks, physical_cores
from tests.conftest import torchrun

# 4 physical cores with 2 hyperthreads each, Linux's usual numbering (siblings N apart)
HT4 = [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_blocks_keep_hyperthreads_with_their_core_and_split_the_rest_to_the_first_ranks():
    assert cpu_blocks(2, HT4) == [[0, 4, 1, 5], [2, 6, 3, 7]]
    assert cpu_blocks(3, [[c] for c in range(5)]) == [[0, 1], [2, 3], [4]]
    assert cpu_blocks(4, HT4) == HT4


def test_no_binding_with_one_rank_or_fewer_cores_than_ranks():
    assert cpu_blocks(1, HT4) == []
    assert cpu_blocks(5, HT4) == []


def test_physical_cores_cover_the_allowed_cpus_once():
    allowed = os.sched_getaffinity(0)
    cores = physical_cores(allowed)
    assert sorted(c for core in cores for c in core) == sorted(allowed)


def _run(tmp_path, mode: str) -> list[dict]:
    proc = torchrun(["-m", "tests.distributed.affinity_worker", str(tmp_path), mode], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(
    len(physical_cores(os.sched_getaffinity(0))) < 2, reason="needs 2 physical cores"
)
def test_two_ranks_bound_to_disjoint_cores_every_thread_and_later_ones(tmp_path):
    ranks = _run(tmp_path, "auto")
    blocks = cpu_blocks(2)
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == blocks
    for r, res in enumerate(ranks):
        assert {tuple(cpus) for cpus in res["threads"].values()} == {tuple(sorted(blocks[r]))}
        assert res["later_thread"] == sorted(blocks[r])
    assert not set(blocks[0]) & set(blocks[1])


def test_off_leaves_every_allowed_cpu(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    for res in _run(tmp_path, "off"):
        assert res["blocks"] == []
        assert all(cpus == allowed for cpus in res["threads"].values())
