"""``mtl-prepare DATASET RAW_DIR OUT_DIR`` (or ``python -m mtl_dist.data.public``): a public
benchmark's raw files in, Parquet splits, ``dataset.json`` and training configs out.

Writes ``OUT_DIR/{train,val,test}/part-*.parquet``, ``OUT_DIR/dataset.json`` (rows and files per
split, the positive rate of every label, the raw files' sha256 digests, vocabulary sizes) and
the configs ``OUT_DIR/<name>.toml`` pointing at ``OUT_DIR`` with the exact table sizes.

Exits 2 with the message of a missing raw file, a malformed line (file, line, field) or a bad
option value.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mtl_dist.data.public import DATASETS, PrepareError
from mtl_dist.data.public.common import write_dataset_json
from mtl_dist.files import written_whole


def run(dataset: str, raw: Path, out: Path, **options) -> dict:
    """Prepare ``dataset`` from ``raw`` into ``out``; returns ``dataset.json``'s content."""
    module = DATASETS[dataset]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # an interrupted run never looks done
    t0 = time.perf_counter()
    info = module.prepare(raw, out, **options)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    for name, text in module.configs(info, str(out)).items():
        with written_whole(out / name) as tmp:
            tmp.write_text(text)
    write_dataset_json(out, info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mtl-prepare",
        description="A public benchmark's raw files in; Parquet splits (train / val / test), "
        "dataset.json and training configs out (docs/public-datasets.md).",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("raw_dir", type=Path, help="directory holding the raw files")
    parser.add_argument("out_dir", type=Path, help="where the Parquet splits are written")
    parser.add_argument(
        "--country",
        default="NL",
        help="aliexpress: the country split (NL, ES, FR, US): RAW_DIR/AliExpress_<C>/",
    )
    parser.add_argument(
        "--buckets",
        type=int,
        default=1,
        help="aliccp: join in this many hash buckets of common_feature_index, holding about "
        "1 / buckets of a split's parsed common features in memory (1: all of them)",
    )
    args = parser.parse_args(argv)
    options = {
        "aliexpress": {"country": args.country},
        "aliccp": {"buckets": args.buckets},
    }.get(args.dataset, {})
    try:
        info = run(args.dataset, args.raw_dir, args.out_dir, **options)
    except (PrepareError, ValueError, FileNotFoundError) as e:  # (a bad --country, --buckets)
        print(f"mtl-prepare: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for split, s in info["splits"].items():
        rates = ", ".join(f"{k} {v:.4f}" for k, v in s["positive_rate"].items() if v is not None)
        print(f"{split}: {s['rows']} rows in {s['files']} files; positive rate {rates}")
    print(f"wrote {args.out_dir} in {info['seconds']:.1f}s (dataset.json, configs)")


if __name__ == "__main__":
    main()
