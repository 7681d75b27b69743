"""``python -m mtl_dist.tools.attribution --model model.pt --data DIR``: per-task feature
attribution (:mod:`mtl_dist.observe.attribution`) of an exported model on Parquet rows."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader, list_parquet_files
from mtl_dist.observe.attribution import attribution_figure, feature_attribution, write_attribution
from mtl_dist.serve.export import load_exported


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl_dist.tools.attribution --model model.pt --data DIR [--batches 8]``: attribution
    of an exported model (``mtl_dist.serve.export``) on Parquet rows; writes CSV and PNG."""
    p = argparse.ArgumentParser(description="per-task feature attribution of an exported model")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", required=True, help="Parquet directory, glob or comma list")
    p.add_argument("--out", type=Path, default=Path("attribution.csv"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2048)
    a = p.parse_args(argv)
    cfg, model = load_exported(a.model)
    # labels only to skip unlabelled padding rows: sample weights and truth are not read
    conv = ArrowBatchConverter(
        cfg.features.sparse, cfg.features.dense, cfg.tasks, dense_nan=cfg.data.dense_nan,
        sample_weights=False, truth=False, hash_seed=cfg.data.hash_seed,
        sequences=cfg.features.sequence,
    )  # fmt: skip
    reader = ParquetBatchReader(list_parquet_files(a.data), conv, a.batch_size, drop_last=False)
    batches = itertools.islice(iter(reader), a.batches)
    features, attr = feature_attribution(model.model, batches, torch.device("cpu"))
    tasks = [t.name for t in cfg.tasks]
    write_attribution(a.out, features, tasks, attr)
    attribution_figure(features, tasks, attr).savefig(a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
