"""A bad value that only rank 1 reads: under torchrun with 2 processes the job exits non-zero in
bounded time (rank 0 does not hang in a collective) and the output names the file and column."""

import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import torchrun

CONFIG = """
[data]
num_workers = 0
[model]
head = "mmoe"
[model.experts]
num = 2
hidden = [16]
[model.tower]
hidden = [8]
[train]
batch_size = 32
log_every = 1
progress_bar = false
[features]
dense = ["x"]
[[features.sparse]]
name = "item"
vocab_size = 100
embedding_dim = 8
[[tasks]]
name = "click"
label = "click"
"""


def write(path, n: int, seed: int, bad_row: int = -1) -> None:
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 100, n)
    if bad_row >= 0:
        item[bad_row] = 12345  # outside [0, 100)
    pq.write_table(
        pa.table(
            {
                "item": pa.array(item, pa.int64()),
                "x": pa.array(rng.normal(size=n), pa.float32()),
                "click": pa.array(rng.integers(0, 2, n), pa.int8()),
            }
        ),
        path,
        row_group_size=64,
    )


def test_bad_value_read_by_one_rank_fails_the_job_in_bounded_time(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    # 2 × 256 rows: rank 0 reads part-0, rank 1 reads part-1, whose 3rd batch holds the bad id
    write(train / "part-0.parquet", 256, 0)
    write(train / "part-1.parquet", 256, 1, bad_row=70)
    write(val / "part-0.parquet", 64, 2)
    (tmp_path / "job.toml").write_text(CONFIG)
    args = [
        "-m", "mtl_dist.train", "--config", str(tmp_path / "job.toml"),
        "--data.train_path", str(train), "--data.val_path", str(val),
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "6",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = torchrun(args, nproc=2, timeout=180)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert elapsed < 120, elapsed
    # rank 1 names the file and column; rank 0 is stopped (its collective fails or torchrun
    # sends SIGTERM), not left waiting
    assert re.search(r"\[rank1\]:.*part-1.parquet: column 'item': id 12345 outside \[0, 100\)", out)
    assert not (tmp_path / "run" / "metrics.json").exists()
