"""Every TorchRec sharding type trains on CPU with gloo, 2 processes through torchrun."""

import json

from tests.conftest import torchrun
from tests.distributed.sharding_worker import TYPES


def test_every_sharding_type_matches_unsharded_reference(tmp_path):
    proc = torchrun(["tests/distributed/sharding_worker.py", str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        stem = results.pop("stem")
        assert stem["fused_lrs"] == [0.3], stem  # every table, task-specific ones included
        assert {"user__a", "user__b", "user", "item"} <= set(stem["planned_tables"]), stem
        assert sorted(results) == sorted(TYPES)
        for st, r in results.items():
            assert r["planned"] == [st], f"planner did not use {st}: {r['planned']}"
            assert r["forward_max_abs_diff"] < 1e-5, (st, r)
            assert r["step_max_abs_diff"] < 2e-5, (
                st,
                r,
            )  # fused optimizer update == reference update
            assert r["loss_last"] < r["loss_first"] - 0.02, (st, r)
