"""Hashed ids, measured: ``python -m mtl_dist.tools.bench.hashing [--rows 400000]``.

On the ``strings`` workload (the peers' workload with user / item / author keys as strings,
Zipf-distributed; :mod:`mtl_dist.data.synth`):

* collisions of modulo hashing (``xxh3_64(key) mod N``): for bucket counts from half to ten
  times a feature's key space, the share of its distinct keys, and of its training rows, whose
  key shares a row with another key (a popular key colliding costs more than a rare one);
* the reader's rows/s on the string columns against the ``peers`` workload's int64 columns of
  the same rows and model (the same reader, the same batches), taking turns;
* modulo hashing against managed collision (``collision = "managed"``, LFU and LRU) at the
  same table size, a tenth of the user / item id space: one epoch under torchrun
  (``--nproc`` ranks), test AUC and samples/s of each (``--no-train`` skips it).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mtl_dist.config import load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.ids import hash_strings
from mtl_dist.data.reader import ParquetBatchReader, list_parquet_files
from mtl_dist.data.synth import generate
from mtl_dist.tools.bench.training import cpu_line, run_training


def collision_shares(keys, buckets: int) -> tuple[float, float]:
    """(share of distinct keys, share of rows) whose key shares its row with another key."""
    encoded = pc.dictionary_encode(keys)
    hashed, _ = hash_strings(encoded.dictionary)
    rows = np.mod(hashed, np.uint64(buckets))
    per_bucket = np.bincount(rows.astype(np.int64), minlength=buckets)
    shared = per_bucket[rows.astype(np.int64)] > 1  # [distinct keys]
    counts = np.bincount(encoded.indices.to_numpy(), minlength=len(hashed))
    return float(shared.mean()), float(counts[shared].sum() / counts.sum())


def reader_rate(config: str, data: str, repeats: int) -> float:
    cfg = load_config(["--config", config, "--data.train_path", f"{data}/train"])
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)
    best = 0.0
    for _ in range(repeats):
        reader = ParquetBatchReader(
            list_parquet_files(f"{data}/train"), conv, 2048, drop_last=False
        )
        t = time.perf_counter()
        rows = sum(b.batch_size for b in reader)
        best = max(best, rows / (time.perf_counter() - t))
    return best


def sized_config(text: str, rows: dict[str, int], **keys: str | int) -> str:
    """A TOML job with the ``[[features.sparse]]`` entries named in ``rows`` resized to that many
    hash buckets, each given ``keys`` (e.g. ``collision="managed", eviction="lru"``).

    Raises ``ValueError`` naming a feature that is not a hashed one of the config."""
    extra = "".join(f"\n{k} = {v!r}" if isinstance(v, int) else f'\n{k} = "{v}"'
                    for k, v in keys.items())  # fmt: skip
    for name, n in rows.items():
        text, found = re.subn(
            rf'(name = "{name}"\n)hash_buckets = \d+', rf"\g<1>hash_buckets = {n}{extra}", text
        )
        if not found:
            raise ValueError(f"no hashed feature '{name}' in the config")
    return text


def modulo_vs_managed(data: str, nproc: int, shrink: int = 10) -> None:
    """One epoch of configs/strings.toml with user_id / item_id tables ``1/shrink`` of their id
    space: modulo vs managed (LFU, LRU); prints AUC per task and samples/s."""
    base = Path("configs/strings.toml").read_text()
    ids = {"user_id": 200_000, "item_id": 100_000}  # the workload's id spaces (mtl_dist.data.synth)
    rows = {k: v // shrink for k, v in ids.items()}
    print(f"\nmodulo vs managed collision, tables {rows} (1/{shrink} of the id space), "
          f"one epoch, {nproc} ranks")  # fmt: skip
    print(f"{'collision':<16}{'AUC click':>10}{'AUC purchase':>14}{'samples/s':>11}")
    runs = [("modulo", "lfu"), ("managed", "lfu"), ("managed", "lru")]
    with tempfile.TemporaryDirectory() as tmp:
        for collision, eviction in runs:
            cfg = Path(tmp) / f"{collision}_{eviction}.toml"
            keys = {"collision": collision} | (
                {"eviction": eviction} if collision == "managed" else {}
            )
            cfg.write_text(sized_config(base, rows, **keys))
            m = run_training(
                str(cfg),
                ["--data.train_path", f"{data}/train", "--data.val_path", f"{data}/val"],
                nproc,
            )
            auc = {t: m["metrics"][t].get("auc", float("nan")) for t in ("click", "purchase")}
            name = collision if collision == "modulo" else f"managed {eviction}"
            print(f"{name:<16}{auc['click']:>10.4f}{auc['purchase']:>14.4f}"
                  f"{m['samples_per_s']:>11,.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--data-root", default="data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the modulo-vs-managed runs")
    p.add_argument("--no-train", action="store_true", help="skip the modulo-vs-managed runs")
    a = p.parse_args(argv)
    strings = f"{a.data_root}/strings_{a.rows}"
    ints = f"{a.data_root}/peers_{a.rows}"
    for path, workload in ((strings, "strings"), (ints, "peers")):
        generate(path, a.rows, 20_000, files=4, workload=workload, val_files=1)
    print(cpu_line())
    table = ds.dataset(list_parquet_files(f"{strings}/train")).to_table()
    print(f"\nmodulo hashing on {a.rows:,} training rows: keys / rows whose key shares a row")
    print(
        f"{'feature':<16}{'keys':>9}  "
        + "".join(f"{f'N = {m:g}x':>18}" for m in (0.5, 1, 2, 4, 10))
    )
    for name in ("user_id", "item_id", "author_id", "subcategory_id"):
        col = table.column(name).combine_chunks()
        n = len(pc.unique(col))
        cells = []
        for m in (0.5, 1, 2, 4, 10):
            k, r = collision_shares(col, max(1, int(m * n)))
            cells.append(f"{k:>8.1%} / {r:>6.1%}")
        print(f"{name:<16}{n:>9,}  " + "".join(f"{c:>18}" for c in cells))
    rates = {"strings": [], "int64": []}
    for _ in range(a.repeats):  # taking turns
        rates["strings"].append(reader_rate("configs/strings.toml", strings, 1))
        rates["int64"].append(reader_rate("configs/peers.toml", ints, 1))
    s, i = max(rates["strings"]), max(rates["int64"])
    print(f"\nreader, 1 process, batch 2048: string keys {s:,.0f} rows/s, int64 ids {i:,.0f} "
          f"rows/s ({s / i:.2f}x), best of {a.repeats} in turns")  # fmt: skip
    if not a.no_train:
        modulo_vs_managed(strings, a.nproc)


if __name__ == "__main__":
    main()
