"""``sharding.ddp_bucket_cap_mb`` reaches the dense part's DDP, splits its gradients into more
buckets, and leaves the training numbers exactly as they were (2 ranks under torchrun)."""

import json

from tests.conftest import torchrun


def test_bucket_cap_reaches_ddp_and_keeps_the_numbers(tmp_path):
    proc = torchrun(["-m", "tests.distributed.ddp_bucket_worker", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        default, small = got["25"], got["1"]
        assert default["cap_bytes"] == 25 * 2**20 and small["cap_bytes"] == 2**20
        assert default["buckets"] == 1 and small["buckets"] >= 2
        assert small["losses"] == default["losses"]  # the same all-reduced mean, bit for bit
