"""Batch scoring: Parquet in, one prediction column per task out.

``python -m mtl_dist.serve.score --model model.pt --data DIR_OR_GLOB --out preds.parquet
[--keep user_id,item_id] [--batch-size 4096]`` reads the feature columns only (labels are not
needed), streams row batches through the exported model and writes ``pred_<task>`` per task —
probabilities on the true scale for binary tasks (negative downsampling corrected), values in
the label's unit for regression (``log1p`` targets are mapped back with ``expm1``) — beside the
``--keep`` columns, in input order. Memory is bounded by the batch size. The model file is
verified before use (every member against its CRC-32); the output is written with Parquet page
checksums, and input pages that carry checksums are verified as they are read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.source import infer_partitions, list_parquet_files, with_partitions
from mtl_dist.files import PARQUET_CHECKSUMS, written_whole
from mtl_dist.serve.export import load_exported


@torch.no_grad()
def score(model_path: Path, data: str, out: Path, keep: list[str], batch_size: int) -> int:
    """Score every row of ``data`` into ``out``; returns the row count.

    Raises ``ValueError`` naming the file, task and row when a prediction is not finite (a
    diverged model, or a ``log1p`` value whose ``expm1`` overflows float32). The file is written
    as ``<out>.partial`` and renamed when complete: a failed run leaves no ``out`` behind.
    """
    cfg, model = load_exported(model_path)
    counts = model.model.id_counts  # feature admission: map ids by the trained counts
    conv = ArrowBatchConverter(
        cfg.features.sparse, cfg.features.dense, [], dense_nan=cfg.data.dense_nan,
        hash_seed=cfg.data.hash_seed, admitted=counts.masks() if counts is not None else None,
        sequences=cfg.features.sequence,
    )  # features only; the training run's hashing  # fmt: skip
    rows, writer = 0, None
    with written_whole(out) as partial:
        files = list_parquet_files(data)
        typed = infer_partitions(files)  # one type per key over the dataset, as training reads
        for path in files:
            try:  # pages written with checksums are verified as they are read
                pf = pq.ParquetFile(path, page_checksum_verification=True)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
            parts = typed[path]  # hive key=value directories: columns too
            absent = [
                c
                for c in [*conv.columns, *keep]
                if c not in pf.schema_arrow.names and c not in parts
            ]
            if absent:
                raise ValueError(f"{path}: missing column(s) {', '.join(absent)}")
            wanted = [c for c in dict.fromkeys(conv.columns + keep) if c not in parts]
            for rb in _batches(pf, path, batch_size, wanted):
                table = with_partitions(pa.Table.from_batches([rb]), parts)
                try:
                    batch = conv(table)
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from None
                outputs = model.model(batch)[0]  # logits [B, T]
                preds = model.predict(outputs).numpy()
                cols = {c: table.column(c) for c in keep}
                for j, t in enumerate(cfg.tasks):
                    y = preds[:, j]
                    if t.kind == "regression" and t.transform == "log1p":
                        with np.errstate(over="ignore"):
                            y = np.expm1(y)
                    y = y.astype(np.float32)
                    bad = ~np.isfinite(y)
                    if bad.any():
                        i = int(bad.argmax())
                        raise ValueError(
                            f"{path}: {int(bad.sum())} prediction(s) of task {t.name} not finite "
                            f"in float32, e.g. row {rows + i} of the output: {float(preds[i, j])!r}"
                            + (" before expm1 (log1p task)" if t.transform == "log1p" else "")
                        )
                    cols[f"pred_{t.name}"] = pa.array(y)
                result = pa.table(cols)
                writer = writer or pq.ParquetWriter(partial, result.schema, **PARQUET_CHECKSUMS)
                writer.write_table(result)
                rows += result.num_rows
        if writer is not None:  # (no row at all: no file, as before)
            writer.close()
            writer = None
    return rows


def _batches(pf: pq.ParquetFile, path: str, batch_size: int, columns: list[str]):
    """``pf``'s record batches; a damaged page (checksum, decoding) raises ``ValueError``
    naming ``path``."""
    try:
        yield from pf.iter_batches(batch_size, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: damaged Parquet data ({e})") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a file from mtl_dist.serve.export")
    p.add_argument("--data", required=True, help="Parquet directory, glob or comma list")
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument("--keep", default="", help="comma-separated input columns to copy through")
    p.add_argument("--batch-size", type=int, default=4096)
    a = p.parse_args(argv)
    keep = [c for c in a.keep.split(",") if c]
    try:
        n = score(a.model, a.data, a.out, keep, a.batch_size)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"scored {n} rows into {a.out}")


if __name__ == "__main__":
    main()
