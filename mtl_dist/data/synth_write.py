"""Writing a synthetic dataset: Parquet files of exact row groups, the optional daily layout,
and ``meta.json`` (parameters, column lists, oracle metrics).

Layout written by :func:`generate`::

    DIR/train/part-00000.parquet ...   (``files`` files, row groups of ``row_group_size``)
    DIR/val/part-00000.parquet ...     (``val_files`` files, default max(1, files // 2))
    DIR/meta.json                      (parameters, column lists, oracle metrics)

or, with ``days``, ``DIR/dt=<day>/{train,val}-part-*.parquet`` (:func:`day_name`). Rows are
generated in chunks of ``CHUNK_ROWS``, each with its own seeded stream (independent of the row
group size), so same parameters and seed give identical values, with memory bounded for any
size. Every file and ``meta.json`` is written under a temporary name and renamed when whole, so
an interrupted run never looks reusable.

Errors: ``ValueError`` for an unknown workload, a task correlation outside [0, 1], a negative
seed or day count, a row group size or file count below 1, or fewer rows than files.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_dist.data.synth_model import TARGETS, LatentModel, build_model, make_chunk
from mtl_dist.data.synth_stats import oracle_metrics
from mtl_dist.data.synth_workloads import WORKLOADS, Workload

GENERATOR_VERSION = 1
CHUNK_ROWS = 65_536  # rows generated per seeded chunk; independent of row_group_size


def _split_sizes(rows: int, parts: int) -> list[int]:
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


def _write_split(
    model: LatentModel,
    seed: int,
    split_index: int,
    split_dir: Path,
    rows: int,
    files: int,
    row_group_size: int,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Write one split as ``files`` Parquet files of exact ``row_group_size`` row groups."""
    split_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for fi, nrows in enumerate(_split_sizes(rows, files)):
        path = split_dir / f"part-{fi:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        with pq.ParquetWriter(tmp, model.workload.schema(), write_page_checksum=True) as writer:
            pending: list[pa.Table] = []
            pending_rows = 0
            for ci, start in enumerate(range(0, nrows, CHUNK_ROWS)):
                n = min(CHUNK_ROWS, nrows - start)
                table, stats = make_chunk(
                    model, np.random.default_rng([seed, 3, split_index, fi, ci]), n
                )
                for key, arr in stats.items():
                    parts.setdefault(key, []).append(arr)
                pending.append(table)
                pending_rows += n
                if pending_rows >= row_group_size:  # emit whole row groups, carry the rest
                    merged = pa.concat_tables(pending)
                    full = pending_rows - pending_rows % row_group_size
                    writer.write_table(merged.slice(0, full), row_group_size=row_group_size)
                    pending, pending_rows = [merged.slice(full)], pending_rows - full
            if pending_rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=row_group_size)
        os.replace(tmp, path)
        names.append(str(path.relative_to(split_dir.parent)))
    return names, {key: np.concatenate(arrs) for key, arrs in parts.items()}


FIRST_DAY = datetime.date(2026, 11, 1)


def day_name(i: int) -> str:
    """The ``dt=`` value of day ``i`` of a ``days`` layout (day 0 is 2026-11-01)."""
    return (FIRST_DAY + datetime.timedelta(days=i)).isoformat()


def _into_days(out: Path, names: list[str], days: int, val: bool) -> list[str]:
    """Move a split's files into ``out/dt=<day>/``: training files round-robin over days
    ``0 .. days-1``, validation files on day ``days``; returns their new relative names."""
    moved = []
    for i, name in enumerate(names):
        day = day_name(days if val else i % days)
        dest = out / f"dt={day}" / f"{'val' if val else 'train'}-{Path(name).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / name, dest)
        moved.append(str(dest.relative_to(out)))
    return moved


def files_present(out: Path, splits: dict[str, Any]) -> bool:
    """Whether every file a ``meta.json``'s ``splits`` name is under ``out``."""
    return all((out / f).exists() for s in splits.values() for f in s["files"])


def write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` as JSON to ``meta_path``, whole or not at all (temporary file, rename)."""
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)


def _summary(meta: dict[str, Any]) -> str:
    p, v = meta["params"], meta["splits"]["val"]
    o = v["oracle"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    if p.get("workload") in ("peers", "strings", "interactions"):
        return (
            f"train {p['train_rows']} rows, val {p['val_rows']} rows ({p['workload']} workload); val "
            f"click "
            f"rate {fmt(v['click_rate'])} oracle AUC {fmt(o['click_auc'])}, purchase rate "
            f"{fmt(v['purchase_rate'])} oracle AUC {fmt(o['purchase_auc'])}"
        )
    return (
        f"train {p['train_rows']} rows / {p['files']} files, val {p['val_rows']} rows / "
        f"{p['val_files']} files; val click rate {fmt(v['click_rate'])} oracle AUC {fmt(o['click_auc'])}, "
        f"conversion rate {fmt(v['conversion_rate'])} AUC {fmt(o['conversion_auc'])}, "
        f"watch MSE {fmt(o['watch_mse'])} R2 {fmt(o['watch_r2'])}"
    )


def _reused(out: Path, params: dict[str, Any], verbose: bool) -> dict[str, Any] | None:
    """The meta of the dataset already at ``out`` when it has ``params`` and all its files."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return None
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("params") == params and files_present(out, old.get("splits", {})):
        if verbose:
            print(f"reusing {out} (meta.json parameters match): {_summary(old)}")
        return old
    return None


def _clear(out: Path) -> None:
    """Remove ``out``'s meta.json (first: an interrupted run must never look reusable) and the
    Parquet files an earlier run wrote."""
    (out / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):
        for stale in (out / split).glob("part-*.parquet"):
            stale.unlink()
    for stale in out.glob("dt=*/*-part-*.parquet"):
        stale.unlink()


def _columns(wl: Workload) -> dict[str, Any]:
    """``meta.json``'s column lists of workload ``wl``."""
    return {
        "strings": dict(wl.strings),  # features written as string keys (and their form)
        "sparse": [
            {"name": f.name, "vocab": f.vocab, "table": f.table}
            for f in wl.sparse
            if not f.multi_hot
        ],
        "multi_hot": [
            {
                "name": f.name,
                "vocab": f.vocab,
                "table": f.table,
                "min_len": f.min_len,
                "max_len": f.max_len,
            }
            for f in wl.sparse
            if f.multi_hot
        ],
        "dense": wl.dense,
        "labels": {n: str(wl.schema().field(n).type) for n in wl.labels},
        "truth": dict(zip(wl.labels, wl.truth, strict=True)),
    }


def _params(
    train_rows: int,
    val_rows: int,
    files: int,
    val_files: int,
    row_group_size: int,
    seed: int,
    task_correlation: float,
    workload: str,
    days: int,
) -> dict[str, Any]:
    """``meta.json``'s ``params``: what a dataset is reused for when equal."""
    params = {
        "version": GENERATOR_VERSION,
        "train_rows": int(train_rows),
        "val_rows": int(val_rows),
        "files": int(files),
        "val_files": int(val_files),
        "row_group_size": int(row_group_size),
        "seed": int(seed),
        "task_correlation": float(task_correlation),
    }
    if workload != "funnel":  # funnel datasets written before workloads existed stay reusable
        params["workload"] = workload
    if days:
        params["days"] = int(days)
    return params


def generate(
    out_dir: str | os.PathLike[str],
    train_rows: int = 300_000,
    val_rows: int = 50_000,
    files: int = 4,
    row_group_size: int = 16_384,
    seed: int = 0,
    task_correlation: float = 0.6,
    val_files: int | None = None,
    *,
    workload: str = "funnel",
    days: int = 0,
    force: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write the dataset under ``out_dir`` and return its meta (also in ``meta.json``).

    ``days`` > 0 lays it out as impression logs partitioned by day instead of ``train/`` and
    ``val/``: ``out_dir/dt=2026-11-01/`` … one directory per day, the training files spread
    over the first ``days`` days (round-robin) and the validation files on the day after, so
    the standard protocol reads ``data.train_filter = "dt < '<day after>'"`` and
    ``data.val_filter = "dt == '<day after>'"`` on the same path.

    Reuses an existing dataset whose ``meta.json`` has identical parameters (and whose files
    are all present) unless ``force``; prints one summary line when ``verbose``.
    """
    val_files = max(1, files // 2) if val_files is None else val_files
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if not 0.0 <= task_correlation <= 1.0:
        raise ValueError(f"task_correlation must be in [0, 1], got {task_correlation}")
    if seed < 0 or row_group_size < 1 or files < 1 or val_files < 1 or days < 0:
        raise ValueError("seed, days must be >= 0 and row_group_size, files, val_files >= 1")
    if train_rows < files or val_rows < val_files:
        raise ValueError("need at least one row per file in each split")
    out = Path(out_dir)
    counts = (train_rows, val_rows, files, val_files, row_group_size, seed)
    params = _params(*counts, task_correlation, workload, days)
    if not force and (old := _reused(out, params, verbose)) is not None:
        return old

    t0 = time.perf_counter()
    _clear(out)
    model = build_model(seed, task_correlation, workload)
    splits: dict[str, Any] = {}
    for index, (split, rows, n_files) in enumerate(
        (("train", train_rows, files), ("val", val_rows, val_files))
    ):
        names, stats = _write_split(model, seed, index, out / split, rows, n_files, row_group_size)
        if days:
            names = _into_days(out, names, days, split == "val")
            if not any((out / split).iterdir()):
                (out / split).rmdir()
        splits[split] = {"files": names, **oracle_metrics(stats)}
    meta = {
        "generator": "mtl_dist.data.synth",
        "params": params,
        "columns": _columns(model.workload),
        "calibration": {**model.calib, "targets": TARGETS},
        "splits": splits,
        "generation_seconds": round(time.perf_counter() - t0, 3),
    }
    write_meta(out / "meta.json", meta)
    if verbose:
        print(f"wrote {out} in {meta['generation_seconds']:.1f}s: {_summary(meta)}")
    return meta
