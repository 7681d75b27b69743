"""KuaiRand (Pure or 1K) → Parquet: the standard logs joined with the user and video features.

Raw format (the KuaiRand release, Gao et al., CIKM 2022): comma-separated files with a header,
values quoted where they hold commas (the video ``tag`` list, ``"8,34"``):

- ``log_standard_*.csv`` (two or more): one impression per line, ``user_id``, ``video_id``,
  ``date`` (yyyymmdd), ``hourmin`` (hhmm), ``tab`` and the 0 / 1 labels of :data:`LABELS`
  (other columns, such as play times, are not kept);
- ``user_features_*.csv``: ``user_id`` and user columns; :data:`USER_DENSE` are numbers, the
  rest categories;
- ``video_features_basic_*.csv``: ``video_id`` and video columns; :data:`VIDEO_DENSE` are
  numbers (empty allowed), ``tag`` a comma-separated list of tag ids, ``upload_dt`` dropped, the
  rest categories.

Output: ``user_id``, ``video_id``, every categorical side column and ``tab``, ``hour`` as int64
ids (vocabularies: the side tables' values for their columns, the training logs' for ``tab``
and ``hour``; ids from 1, 0 for a value unseen, or for a log row whose user / video has no
features line), ``tag`` as ``list<int64>`` ids, the numeric columns as float32 (null where
empty or missing), ``date`` (int64, for ``data.train_filter``) and the labels (int8).
Splits: ``train/`` every standard log but the last in name order, ``val/`` / ``test/`` the last
one's odd / even lines.

Errors: :class:`~mtl_dist.data.public.common.PrepareError` naming file, line and field for a
wrong column count, a missing column (line 1), a non-numeric number, a label not 0 / 1.
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
    alternate,
    binary_tasks,
    csv_batches,
    job_config,
    lists,
    numbers,
    sha256,
)

LABELS = [
    "is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
    "is_profile_enter",
]  # fmt: skip
LOG_KEEP = ["user_id", "video_id", "date", "hourmin", "tab", *LABELS]
USER_DENSE = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
VIDEO_DENSE = ["video_duration", "server_width", "server_height"]
VIDEO_DROP = ["upload_dt"]


def _header(path: Path, need: list[str]) -> list[str]:
    """The header's names (quotes stripped); every name of ``need`` must be among them."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        names = [n.strip().strip('"') for n in fh.readline().rstrip("\r\n").split(",")]
    missing = [n for n in need if n not in names]
    if missing:
        raise PrepareError(path, 1, missing[0], f"column missing from the header {names}")
    return names


def _read(path: Path, names: list[str]) -> tuple[pa.Table, np.ndarray]:
    """A whole side table (string columns, trimmed) and the file line of each row."""
    parts, lines = [], []
    for line, batch in csv_batches(path, names, header=True):
        parts.append(pa.table({n: pc.utf8_trim_whitespace(batch[n]) for n in names}))
        lines.append(np.arange(line, line + batch.num_rows))
    empty = pa.table({n: pa.array([], pa.string()) for n in names})
    return (pa.concat_tables(parts) if parts else empty), np.concatenate([[], *lines]).astype(int)


def _tags(col: pa.Array, vocab: Vocab | None) -> pa.ListArray | None:
    """``"8,34"`` strings → tag lists; with ``vocab`` None, the tokens are recorded instead."""
    split = pc.split_pattern(pc.fill_null(col, ""), ",")
    flat = pc.utf8_trim_whitespace(pc.list_flatten(split))
    parent = np.asarray(pc.list_parent_indices(split))
    keep = np.asarray(pc.not_equal(flat, ""))
    flat, parent = flat.filter(pa.array(keep)), parent[keep]
    if vocab is None:
        return flat
    return lists(len(col), parent, np.asarray(vocab.encode("tag", flat)))


def _side(path: Path, key: str, dense: list[str], drop: list[str]) -> dict[str, Any]:
    """A side table encoded: {"keys", "table" (ids / dense / tag columns), "vocab", "cats"}."""
    names = _header(path, [key])
    table, lines = _read(path, names)
    cats = [n for n in names if n not in (*dense, *drop, "tag")]
    vocab = Vocab()
    for n in cats:
        vocab.add(n, table[n].combine_chunks())
    if "tag" in names:
        vocab.add("tag", _tags(table["tag"].combine_chunks(), None))
    vocab.freeze()
    cols: dict[str, pa.Array] = {n: vocab.encode(n, table[n].combine_chunks()) for n in cats}
    for n in dense:
        if n in names:
            cols[n] = numbers(table[n].combine_chunks(), pa.float32(), path, lines, n, blank="null")
    if "tag" in names:
        cols["tag"] = _tags(table["tag"].combine_chunks(), vocab)
    return {"keys": table[key].combine_chunks(), "table": pa.table(cols), "vocab": vocab}


def _files(raw: Path) -> tuple[list[Path], Path, Path]:
    logs = sorted(raw.glob("log_standard_*.csv"))
    users = sorted(raw.glob("user_features_*.csv"))
    videos = sorted(raw.glob("video_features_basic_*.csv"))
    if len(logs) < 2 or len(users) != 1 or len(videos) != 1:
        raise FileNotFoundError(
            f"{raw}: need two or more log_standard_*.csv, one user_features_*.csv and one "
            f"video_features_basic_*.csv; found {[p.name for p in (*logs, *users, *videos)]}"
        )
    return logs, users[0], videos[0]


def _log_batches(path: Path):
    names = _header(path, LOG_KEEP)
    for line, batch in csv_batches(path, names, header=True):
        cols = {n: pc.utf8_trim_whitespace(batch[n]) for n in LOG_KEEP}
        hourmin = numbers(cols["hourmin"], pa.int64(), path, line, "hourmin")
        cols["hour"] = pc.cast(pc.divide(hourmin, 100), pa.string())
        yield line, cols


def _joined(cols, side: dict[str, Any], key: str) -> dict[str, pa.Array]:
    """The side table's encoded columns for the log rows (nulls where no features line)."""
    pos = pc.index_in(cols[key], value_set=side["keys"])
    rows = side["table"].take(pos)
    out = {}
    for n in rows.column_names:
        col = rows[n].combine_chunks()
        out[n] = pc.fill_null(col, 0) if pa.types.is_integer(col.type) else col
    return out


def _table(cols, users, videos, vocab: Vocab, path: Path, line: int) -> pa.Table:
    out = {**_joined(cols, users, "user_id"), **_joined(cols, videos, "video_id")}
    out["tab"], out["hour"] = vocab.encode("tab", cols["tab"]), vocab.encode("hour", cols["hour"])
    out["date"] = numbers(cols["date"], pa.int64(), path, line, "date")
    for n in LABELS:
        v = numbers(cols[n], pa.int64(), path, line, n)
        bad = np.flatnonzero(~np.isin(np.asarray(v), (0, 1)))
        if len(bad):
            raise PrepareError(path, line + int(bad[0]), n, f"not 0 / 1: {v[int(bad[0])]}")
        out[n] = v.cast(pa.int8())
    return pa.table(out)


def prepare(raw: Path, out: Path) -> dict[str, Any]:
    """Write the KuaiRand splits under ``out``; returns ``dataset.json``'s content.

    Raises:
        FileNotFoundError: the raw files are not there (fewer than two standard logs).
        PrepareError: a malformed line (file, line and field named).
    """
    logs, user_path, video_path = _files(raw)
    users = _side(user_path, "user_id", USER_DENSE, [])
    videos = _side(video_path, "video_id", VIDEO_DENSE, VIDEO_DROP)
    vocab = Vocab()
    for path in logs[:-1]:
        for _, cols in _log_batches(path):
            vocab.add("tab", cols["tab"])
            vocab.add("hour", cols["hour"])
    vocab.freeze()
    schema = None
    writers: dict[str, SplitWriter] = {}
    for path in logs:
        for line, cols in _log_batches(path):
            table = _table(cols, users, videos, vocab, path, line)
            if schema is None:
                schema = table.schema
                writers = {s: SplitWriter(out, s, schema, LABELS) for s in ("train", "val", "test")}
            if path != logs[-1]:
                writers["train"].write(table)
            else:
                odd, even = alternate(table.num_rows, line)
                writers["val"].write(table.take(odd))
                writers["test"].write(table.take(even))
    if schema is None:
        raise PrepareError(logs[0], None, "-", "the standard logs hold no row")
    sizes = {**users["vocab"].sizes(), **videos["vocab"].sizes(), **vocab.sizes()}
    return {
        "dataset": "kuairand",
        "splits": {s: w.close() for s, w in writers.items()},
        "split_rule": f"train: {[p.name for p in logs[:-1]]}; val / test: {logs[-1].name}'s "
        "odd / even lines (header: line 1)",
        "sources": {p.name: sha256(p) for p in (*logs, user_path, video_path)},
        "vocab_sizes": sizes,
        "dense": [n for n in schema.names if schema.field(n).type == pa.float32()],
        "multi_hot": ["tag"] if "tag" in schema.names else [],
    }


TASKS = ["is_click", "long_view", "is_like"]


def config(info: dict[str, Any], data_dir: str) -> str:
    """The training config (TOML text) of the columns a prepared copy has (``info``)."""
    sizes = info["vocab_sizes"]
    sparse = "".join(
        f'[[features.sparse]]\nname = "{n}"\nvocab_size = {k}\n'
        + ('multi_hot = true\npooling = "mean"\n' if n in info["multi_hot"] else "")
        for n, k in sizes.items()
    )
    dense = ", ".join(f'"{n}"' for n in info["dense"])
    header = f"""# KuaiRand: click, long view and like on the standard logs (other labels are in the Parquet).
# Prepared by `mtl-prepare kuairand RAW_DIR {data_dir}` (docs/public-datasets.md).
# Model: MMoE at its default widths (the KuaiRand paper proposes no multi-task model; its
# widths are set with --model.experts.hidden / --model.tower.hidden).
"""
    features = f"[features]\ndense = [{dense}]\n\n{sparse}"
    return job_config(
        header,
        data_dir,
        '[model]\nhead = "mmoe"\n',
        1024,
        1,
        "runs/kuairand",
        features,
        binary_tasks(TASKS),
    )


def configs(info: dict[str, Any], data_dir: str) -> dict[str, str]:
    """The config file of a prepared copy, with the exact vocabulary sizes."""
    return {"kuairand.toml": config(info, data_dir)}
