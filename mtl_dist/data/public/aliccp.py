"""Ali-CCP (Alibaba click and conversion prediction, the ESMM data set) → Parquet.

Raw format (the data set's readme on Tianchi, as ESMM's authors published it): comma-separated,
no header, no quoting.

- ``sample_skeleton_{train,test}.csv``: ``sample_id, click, conversion, common_feature_index,
  feature_num, feature_list``
- ``common_features_{train,test}.csv``: ``common_feature_index, feature_num, feature_list``

A feature list is ``\\x01``-separated entries ``field_id\\x02feature_id\\x03value`` (an empty
list is an empty string); ``feature_num`` must equal the number of entries. Feature ids are
integers, global over fields; values (a weight, 1.0 for the categorical fields) are checked to
be numbers but not kept. A sample's features are its own entries followed by those of its
``common_feature_index`` (the user's).

Output: one ``list<int64>`` column per field of :data:`FIELDS` (``f101``, ``f109_14``, ...:
the raw feature ids, in file order, possibly empty; single-valued fields hold one id), entries
of other fields dropped (counted in ``dataset.json``), ``click`` and ``conversion`` (int8).
Splits: ``train/`` the training files, ``val/`` / ``test/`` the test files' odd / even lines.
The ids are not re-numbered: configs map them into ``hash_buckets`` rows (``id mod buckets``),
so one streaming pass suffices; ``dataset.json`` records each field's distinct ids in training.

Memory: the skeleton files are streamed in blocks. By default (``buckets`` 1) a split's common
features are parsed into Arrow columns of the kept fields (ids only, about 8 bytes per id, not
the raw text) and held for the join, which looks indices up with ``pyarrow.compute.index_in``.
With ``buckets`` K > 1 both files are first spilled into K Parquet files by the xxh3_64 of
``common_feature_index`` and joined bucket by bucket: about 1 / K of the parsed common features
is held at a time (the rows then come out grouped by bucket, each bucket in file order).

Errors: :class:`~mtl_dist.data.public.common.PrepareError` naming file, line and field for a
wrong column count, a non-numeric id / label / value, a malformed entry, a ``feature_num`` that
disagrees with the list, a label not 0 / 1, a duplicated or unknown ``common_feature_index``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from mtl_dist.data.public.common import (
    PrepareError,
    SplitWriter,
    binary_tasks,
    csv_batches,
    job_config,
    lists,
    numbers,
    require,
    sha256,
)

# ESMM's fields (Ma et al., SIGIR 2018, the Ali-CCP readme's feature table): user (101, 121-129),
# user behaviour over 14 days (109_14, 110_14, 127_14, 150_14), ad (205, 206, 207, 210, 216),
# user x ad crosses (508, 509, 702, 853) and context (301)
FIELDS = [
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "210", "216",
    "508", "509", "702", "853",
    "301",
    "109_14", "110_14", "127_14", "150_14",
]  # fmt: skip
COLUMNS = [f"f{f}" for f in FIELDS]
LABELS = ["click", "conversion"]
SKELETON = ["sample_id", "click", "conversion", "common_feature_index", "feature_num", "features"]
COMMON = ["common_feature_index", "feature_num", "features"]
IDS = pa.list_(pa.int64())
SCHEMA = pa.schema([pa.field(c, IDS) for c in COLUMNS] + [pa.field(n, pa.int8()) for n in LABELS])


def _entry_parts(flat: pa.Array, sep: str, path: Path, lines: np.ndarray, what: str):
    """``flat``'s strings split once at ``sep`` into (before, after); both must exist."""
    parts = pc.split_pattern(flat, sep, max_splits=1)
    bad = np.flatnonzero(np.asarray(pc.list_value_length(parts)) != 2)
    if len(bad):
        value = flat[int(bad[0])].as_py()
        raise PrepareError(path, int(lines[bad[0]]), "feature_list", f"{what}: {value!r}")
    return pc.list_element(parts, 0), pc.list_element(parts, 1)


def parse_features(
    text: pa.Array, count: pa.Array, path: Path, first_line: int
) -> tuple[dict[str, pa.ListArray], int]:
    """A block's feature lists → ({column: ids per row}, entries of other fields).

    Raises:
        PrepareError: a malformed entry, a non-numeric or negative id, a non-numeric value, a
            count that disagrees.
    """
    n = len(text)
    entries = pc.split_pattern(text, "\x01")
    flat = pc.list_flatten(entries)
    parent = np.asarray(pc.list_parent_indices(entries))
    keep = np.asarray(pc.not_equal(flat, ""))
    flat, parent = flat.filter(pa.array(keep)), parent[keep]
    lines = first_line + parent
    found = np.bincount(parent, minlength=n)
    stated = np.asarray(numbers(count, pa.int64(), path, first_line, "feature_num"))
    if (wrong := np.flatnonzero(found != stated)).size:
        r = int(wrong[0])
        raise PrepareError(
            path, first_line + r, "feature_num", f"says {stated[r]}, the list has {found[r]}"
        )
    field, rest = _entry_parts(flat, "\x02", path, lines, "not field\\x02id\\x03value")
    fid, value = _entry_parts(rest, "\x03", path, lines, "not field\\x02id\\x03value")
    ids = np.asarray(numbers(fid, pa.int64(), path, lines, "feature_list (feature id)"))
    if (negative := np.flatnonzero(ids < 0)).size:
        r = int(negative[0])
        raise PrepareError(path, int(lines[r]), "feature_list (feature id)", f"{ids[r]} < 0")
    numbers(value, pa.float64(), path, lines, "feature_list (value)")
    code = np.asarray(pc.fill_null(pc.index_in(field, value_set=pa.array(FIELDS)), -1))
    out = {}
    for j, col in enumerate(COLUMNS):
        mask = code == j
        out[col] = lists(n, parent[mask], ids[mask])
    return out, int((code < 0).sum())


def _parsed(path: Path, names: list[str], stats: dict[str, Any]):
    """Blocks of a skeleton or common-features file parsed: the index, one ids column per
    field, the labels (skeleton files) and each row's file ``line``."""
    for line, batch in csv_batches(path, names, quoting=False):
        cols, dropped = parse_features(batch["features"], batch["feature_num"], path, line)
        stats["other_field_entries"] += dropped
        labels = _labels(batch, path, line) if "click" in names else {}
        lines = pa.array(np.arange(line, line + batch.num_rows), pa.int64())
        yield pa.table({"index": batch["common_feature_index"], **cols, **labels, "line": lines})


def _unique(common: pa.Table, path: Path) -> pa.Table:
    """``common`` (its chunks combined) if no index repeats, else the error naming the line."""
    if len(common) and pc.count_distinct(common["index"]).as_py() != len(common):
        seen: set[str] = set()
        for key, line in zip(common["index"].to_pylist(), common["line"].to_pylist()):
            if key in seen:
                raise PrepareError(path, line, "common_feature_index", f"repeated: {key!r}")
            seen.add(key)
    return common.combine_chunks()


def _concat(a: pa.ListArray, b: pa.ListArray) -> pa.ListArray:
    """Row-wise ``a[r] + b[r]`` of two list<int64> arrays of equal length."""
    pa_, pb = (np.asarray(pc.list_parent_indices(x)) for x in (a, b))
    va, vb = (np.asarray(pc.list_flatten(x)) for x in (a, b))
    parent = np.concatenate([pa_, pb])
    order = np.argsort(parent, kind="stable")
    return lists(len(a), parent[order], np.concatenate([va, vb])[order])


def _labels(batch: pa.RecordBatch, path: Path, line: int) -> dict[str, pa.Array]:
    out = {}
    for name in LABELS:
        v = numbers(batch[name], pa.int64(), path, line, name)
        bad = np.flatnonzero(~np.isin(np.asarray(v), (0, 1)))
        if len(bad):
            raise PrepareError(path, line + int(bad[0]), name, f"not 0 / 1: {v[int(bad[0])]}")
        out[name] = v.cast(pa.int8())
    return out


def _join(samples: pa.Table, common: pa.Table, path: Path) -> pa.Table:
    """Samples with their common features appended per field (``line`` kept)."""
    pos = pc.index_in(samples["index"], value_set=common["index"])
    if pos.null_count:
        r = int(np.flatnonzero(np.asarray(pc.is_null(pos)))[0])
        key, line = samples["index"][r].as_py(), samples["line"][r].as_py()
        raise PrepareError(
            path, line, "common_feature_index", f"{key!r} not in the common features"
        )
    user = common.take(pos)
    joined = {c: _concat(samples[c].combine_chunks(), user[c].combine_chunks()) for c in COLUMNS}
    return pa.table({**joined, **{n: samples[n] for n in (*LABELS, "line")}})


def _bucket(table: pa.Table, k: int) -> np.ndarray:
    """Each row's bucket: xxh3_64 of its common_feature_index mod ``k``."""
    keys = table["index"].to_pylist()
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(key.encode()) % k for key in keys), np.int64, len(keys)
    )


def _spill(tables, k: int, base: Path) -> list[Path]:
    """Write ``tables``' rows into ``k`` Parquet files by :func:`_bucket`; their paths."""
    paths = [base.with_name(f"{base.name}-{j:03d}.parquet") for j in range(k)]
    writers: list[pq.ParquetWriter | None] = [None] * k
    try:
        for table in tables:
            b = _bucket(table, k)
            for j in np.unique(b):
                part = table.filter(pa.array(b == j))
                if writers[j] is None:
                    writers[j] = pq.ParquetWriter(paths[j], part.schema)
                writers[j].write_table(part)
    finally:
        for w in writers:
            if w is not None:
                w.close()
    return paths


def _joined(skeleton: Path, common_path: Path, buckets: int, tmp: Path, stats: dict[str, Any]):
    """Joined tables of one split: the common features in memory (``buckets`` 1), or both files
    spilled into ``buckets`` files by index, joined bucket by bucket (1 / buckets of them held)."""
    if buckets == 1:
        tables = list(_parsed(common_path, COMMON, stats))
        empty = pa.table({"index": pa.array([], pa.string())})
        common = _unique(pa.concat_tables(tables), common_path) if tables else empty
        for samples in _parsed(skeleton, SKELETON, stats):
            yield _join(samples, common, skeleton)
        return
    tmp.mkdir(parents=True, exist_ok=True)
    c_paths = _spill(_parsed(common_path, COMMON, stats), buckets, tmp / "common")
    s_paths = _spill(_parsed(skeleton, SKELETON, stats), buckets, tmp / "samples")
    for c_path, s_path in zip(c_paths, s_paths):
        if not s_path.exists():
            continue
        common = _unique(pq.read_table(c_path), common_path) if c_path.exists() else None
        for batch in pq.ParquetFile(s_path).iter_batches(batch_size=1 << 16):
            samples = pa.Table.from_batches([batch])
            if common is None:
                common = pa.table({"index": pa.array([], pa.string())})
            yield _join(samples, common, skeleton)
        c_path.unlink(missing_ok=True)
        s_path.unlink()


def _count_ids(distinct: dict[str, np.ndarray], table: pa.Table) -> None:
    for c in COLUMNS:
        ids = np.unique(np.asarray(pc.list_flatten(table[c].combine_chunks())))
        distinct[c] = np.union1d(distinct.get(c, ids[:0]), ids)


def prepare(raw: Path, out: Path, buckets: int = 1) -> dict[str, Any]:
    """Write the Ali-CCP splits under ``out``; returns ``dataset.json``'s content.

    ``buckets`` > 1 bounds the memory of the join to about 1 / buckets of a split's parsed
    common features (both files are first spilled into ``buckets`` Parquet files under
    ``out/.spill``, by the xxh3_64 of the index; rows then come out bucket by bucket).

    Raises:
        FileNotFoundError: a raw file missing from ``raw``.
        PrepareError: a malformed line (file, line and field named).
        ValueError: ``buckets`` < 1.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    files = {
        (kind, s): require(raw / f"{kind}_{s}.csv")
        for kind in ("sample_skeleton", "common_features")
        for s in ("train", "test")
    }
    writers = {s: SplitWriter(out, s, SCHEMA, LABELS) for s in ("train", "val", "test")}
    stats: dict[str, Any] = {"other_field_entries": 0}
    distinct: dict[str, np.ndarray] = {}
    for source in ("train", "test"):
        paths = files["sample_skeleton", source], files["common_features", source]
        for table in _joined(*paths, buckets, out / ".spill", stats):
            if source == "train":
                _count_ids(distinct, table)
                writers["train"].write(table)
            else:
                odd = pa.array(np.asarray(table["line"]) % 2 == 1)
                writers["val"].write(table.filter(odd))
                writers["test"].write(table.filter(pc.invert(odd)))
    shutil.rmtree(out / ".spill", ignore_errors=True)
    return {
        "dataset": "aliccp",
        "splits": {s: w.close() for s, w in writers.items()},
        "split_rule": "train: the *_train files; val / test: sample_skeleton_test's odd / even lines",
        "join_buckets": buckets,
        "sources": {p.name: sha256(p) for p in files.values()},
        "vocab_sizes": {c: int(len(distinct.get(c, ()))) for c in COLUMNS},
        "id_ranges": {
            c: [int(v[0]), int(v[-1])] if len(v := distinct.get(c, ())) else None for c in COLUMNS
        },
        **stats,
    }


def buckets(distinct: int) -> int:
    """Table rows for a field with ``distinct`` training ids: the power of two ≥ 2 × distinct
    (few collisions under ``id mod rows``), at least 16 and at most 2^22."""
    return int(min(1 << 22, max(16, 1 << int(2 * distinct - 1).bit_length())))


# the committed configs/aliccp.toml's table rows (OUT_DIR/aliccp.toml sizes them from the counts)
DEFAULT_BUCKETS = {c: 1 << 20 for c in COLUMNS} | {
    f"f{f}": 1 << 10 for f in ("121", "122", "124", "125", "126", "127", "128", "129", "301")
}


def config(rows: dict[str, int], data_dir: str) -> str:
    """The training config (TOML text) over the splits in ``data_dir``, ``rows[c]`` table rows
    per column: every field a multi-hot bag of raw ids hashed into its table (``id mod rows``)."""
    sparse = "".join(
        f'[[features.sparse]]\nname = "{c}"\nhash_buckets = {rows[c]}\nmulti_hot = true\n'
        for c in COLUMNS
    )
    header = f"""# Ali-CCP (the ESMM data set): click, and conversion after a click.
# Prepared by `mtl-prepare aliccp RAW_DIR {data_dir}` (docs/public-datasets.md).
# Model: ESMM is a shared bottom with its CVR task trained through pCTCVR: add
# `--model.esmm.enabled true`. The paper's sizes (Ma et al., SIGIR 2018, Section 4: embeddings
# of 18, an MLP of 360 x 200 x 80) are set with --model.tower.hidden 360,200,80; the embeddings
# stay at 16 (a multiple of 4 for the kernels).
"""
    return job_config(
        header, data_dir, '[model]\nhead = "shared_bottom"\n', 1024, 1, "runs/aliccp", sparse,
        binary_tasks(["click", "conversion"], {"conversion": "click"}),
    )  # fmt: skip


def configs(info: dict[str, Any], data_dir: str) -> dict[str, str]:
    """The config file of a prepared copy, its tables sized from the training ids counted."""
    return {
        "aliccp.toml": config({c: buckets(n) for c, n in info["vocab_sizes"].items()}, data_dir)
    }
