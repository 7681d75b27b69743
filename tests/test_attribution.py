"""Feature attribution under torchrun: a feature a task provably ignores ranks last for it."""

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import torchrun

CONFIG = """
[data]
train_path = "{data}/train"
val_path = "{data}/val"

[features]
dense = ["d"]

[[features.sparse]]
name = "a"
vocab_size = 50
embedding_dim = 8

[[features.sparse]]
name = "b"
vocab_size = 50
embedding_dim = 8

[[features.sparse]]
name = "c"
vocab_size = 50
embedding_dim = 8

[[tasks]]
name = "click"
label = "click"

[[tasks]]
name = "watch"
kind = "regression"
label = "watch"

[model]
head = "mmoe"
[model.experts]
num = 2
hidden = [32, 16]
[model.tower]
hidden = [8]

[optim]
embedding_lr = 0.2
dense_lr = 0.005

[train]
batch_size = 256
epochs = 3
progress_bar = false
"""


def write_data(root, rows: int, seed: int) -> None:
    """click depends on a, c and d, never on b; watch on b, c and d, never on a."""
    rng = np.random.default_rng(0)
    latent = {f: rng.normal(size=50) for f in "abc"}
    rng = np.random.default_rng(seed)
    ids = {f: rng.integers(0, 50, rows) for f in "abc"}
    d = rng.normal(size=rows).astype(np.float32)
    la, lb, lc = (latent[f][ids[f]] for f in "abc")
    click = rng.random(rows) < 1 / (1 + np.exp(-(1.5 * (la + lc) + d - 1)))
    watch = lb + lc + 0.5 * d + 0.3 * rng.normal(size=rows)
    root.mkdir(parents=True)
    table = pa.table({
        **{f: pa.array(ids[f], pa.int64()) for f in "abc"},
        "d": d, "click": click.astype(np.int8), "watch": watch.astype(np.float32),
    })  # fmt: skip
    pq.write_table(table, root / "part-0.parquet", row_group_size=8192)


def test_ignored_feature_ranks_last_for_that_task(tmp_path):
    write_data(tmp_path / "data" / "train", 60_000, seed=1)
    write_data(tmp_path / "data" / "val", 8_000, seed=2)
    (tmp_path / "job.toml").write_text(CONFIG.format(data=tmp_path / "data"))
    out = tmp_path / "run"
    proc = torchrun(
        ["-m", "mtl_dist.train", "--config", str(tmp_path / "job.toml"),
         "--train.output_dir", str(out), "--monitor.attribution_batches", "8"]
    )  # fmt: skip
    assert proc.returncode == 0
    with open(out / "attribution.csv") as fh:
        rows = {r["feature"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"a", "b", "c", "d"}
    print({f: (r["click"], r["watch"]) for f, r in rows.items()})
    assert rows["b"]["rank_click"] == "4", rows
    assert rows["a"]["rank_watch"] == "4", rows
    # and by a margin: well under the task's strongest feature (measured: 0.46x and 0.08x)
    assert float(rows["b"]["click"]) < 0.6 * max(float(r["click"]) for r in rows.values())
    assert float(rows["a"]["watch"]) < 0.2 * max(float(r["watch"]) for r in rows.values())
