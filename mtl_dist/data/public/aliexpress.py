"""AliExpress (the AITM / MTReclib country splits NL, ES, FR, US) → Parquet.

Raw format (as MTReclib reads it: ``data/AliExpress_<C>/{train,test}.csv``): comma-separated
with a header line, 81 fields per line, read by position: ``search_id``, 16 categorical fields
(integer codes), 63 numerical fields, ``click``, ``conversion`` (0 / 1). The header's own names
are not relied on (only its field count); the output uses :data:`CATEGORICAL` / :data:`NUMERIC`.

Output: ``train/`` (train.csv), ``val/`` / ``test/`` (test.csv's odd / even lines; the header is
line 1, so its first record, on line 2, goes to test): the categorical fields as int64 ids (a
vocabulary per field built on train.csv, codes sorted as strings, ids from 1; 0 for a code never
seen in training), the numerical ones as float32, ``click`` / ``conversion`` (int8).
``search_id`` is dropped.

Errors: :class:`~mtl_dist.data.public.common.PrepareError` naming file, line and field for a
wrong column count (the header's too), a non-numeric numerical field or a label not 0 / 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl_dist.data.public.common import (
    PrepareError,
    SplitWriter,
    Vocab,
    binary_tasks,
    csv_batches,
    job_config,
    numbers,
    require,
    sha256,
    vocab_then_split,
)

CATEGORICAL = [f"categorical_{i}" for i in range(1, 17)]
NUMERIC = [f"numerical_{i}" for i in range(1, 64)]
LABELS = ["click", "conversion"]
NAMES = ["search_id", *CATEGORICAL, *NUMERIC, *LABELS]
COUNTRIES = ("NL", "ES", "FR", "US")
SCHEMA = pa.schema(
    [pa.field(n, pa.int64()) for n in CATEGORICAL]
    + [pa.field(n, pa.float32()) for n in NUMERIC]
    + [pa.field(n, pa.int8()) for n in LABELS]
)


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        names = fh.readline().rstrip("\r\n").split(",")
    if len(names) != len(NAMES):
        raise PrepareError(path, 1, "-", f"header has {len(names)} columns, expected {len(NAMES)}")
    return names


def _batches(path: Path):
    _header(path)
    for line, batch in csv_batches(path, NAMES, header=True):
        yield line, {n: pc.utf8_trim_whitespace(batch[n]) for n in NAMES}


def _table(cols: dict[str, pa.Array], vocab: Vocab, path: Path, line: int) -> pa.Table:
    out = {n: vocab.encode(n, cols[n]) for n in CATEGORICAL}
    out |= {n: numbers(cols[n], pa.float32(), path, line, n) for n in NUMERIC}
    for n in LABELS:
        v = numbers(cols[n], pa.float64(), path, line, n)
        bad = np.flatnonzero(~np.isin(np.asarray(v), (0.0, 1.0)))
        if len(bad):
            raise PrepareError(path, line + int(bad[0]), n, f"not 0 / 1: {cols[n][int(bad[0])]}")
        out[n] = v.cast(pa.int8())
    return pa.table(out)


def prepare(raw: Path, out: Path, country: str = "NL") -> dict[str, Any]:
    """Write one country's splits from ``raw/AliExpress_<country>/`` (or ``raw`` itself when it
    holds train.csv) under ``out``; returns ``dataset.json``'s content.

    Raises:
        ValueError: an unknown country.
        FileNotFoundError: a raw file missing.
        PrepareError: a malformed line (file, line and field named).
    """
    if country not in COUNTRIES:
        raise ValueError(f"country must be one of {COUNTRIES}, got {country!r}")
    src = raw if (raw / "train.csv").is_file() else raw / f"AliExpress_{country}"
    train, test = require(src / "train.csv"), require(src / "test.csv")
    writers = {s: SplitWriter(out, s, SCHEMA, LABELS) for s in ("train", "val", "test")}
    vocab = vocab_then_split(train, test, _batches, CATEGORICAL, _table, writers)
    return {
        "dataset": "aliexpress",
        "country": country,
        "splits": {s: w.close() for s, w in writers.items()},
        "split_rule": "train: train.csv; val / test: test.csv's odd / even lines (header: line 1)",
        "sources": {f"{src.name}/{f.name}": sha256(f) for f in (train, test)},
        "header": _header(train),
        "vocab_sizes": vocab.sizes(),
    }


def config(sizes: dict[str, int], data_dir: str, country: str) -> str:
    """The training config (TOML text) over the splits in ``data_dir``."""
    sparse = "".join(
        f'[[features.sparse]]\nname = "{n}"\nvocab_size = {sizes[n]}\n' for n in CATEGORICAL
    )
    dense = ",\n         ".join(
        ", ".join(f'"{n}"' for n in NUMERIC[i : i + 6]) for i in range(0, len(NUMERIC), 6)
    )
    header = f"""# AliExpress ({country}): click, and conversion after a click (AITM's tasks).
# Prepared by `mtl-prepare aliexpress RAW_DIR {data_dir} --country {country}`
# (docs/public-datasets.md).
# Model: AITM at mtl-dist's default widths. MTReclib's AliExpress runs (the figures quoted in
# docs/public-datasets.md) use embeddings of 128 (each [[features.sparse]]'s embedding_dim),
# batch 2048 and lr 0.001 (as here); the widths are --model.experts.hidden / --model.tower.hidden.
"""
    features = f"[features]\ndense = [{dense}]\n\n{sparse}"
    return job_config(
        header, data_dir, '[model]\nhead = "aitm"\n', 2048, 1,
        f"runs/aliexpress_{country.lower()}", features,
        binary_tasks(["click", "conversion"], {"conversion": "click"}),
    )  # fmt: skip


# rows per table in configs/aliexpress.toml (ids past them hashed); OUT_DIR/aliexpress.toml has the exact sizes
SIZE_BOUND = 1 << 17


def configs(info: dict[str, Any], data_dir: str) -> dict[str, str]:
    """The config file of a prepared copy, with the exact vocabulary sizes."""
    return {"aliexpress.toml": config(info["vocab_sizes"], data_dir, info["country"])}
