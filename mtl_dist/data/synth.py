"""Deterministic synthetic recommender-funnel dataset (Parquet) with known ground truth.

Why: a multi-task ranking model can only be judged against what is achievable; here every
row carries the true probabilities / mean it was drawn from, so model metrics can be
compared with the oracle's (stored in ``meta.json``).

Layout written by :func:`generate` / ``mtl-datagen``::

    DIR/train/part-00000.parquet ...   (``files`` files, row groups of ``row_group_size``)
    DIR/val/part-00000.parquet ...     (``val_files`` files, default max(1, files // 2))
    DIR/meta.json                      (parameters, column lists, oracle metrics)

Columns, in file order:

* 17 single-hot sparse ``int64`` ids: user_id (200k), item_id (100k), author_id (50k),
  category_id (1000), subcategory_id (5000), city_id (2000), device_type (8), os_type (4),
  app_version (50), hour_of_day (24), day_of_week (7), age_bucket (10), gender (3),
  user_level (8), item_age_bucket (20), price_bucket (30), network_type (5).
* 4 multi-hot ``list<int64>`` columns of variable length (empty lists occur):
  user_tags (vocab 1000, 0..8 ids), item_tags (vocab 1000, 1..5), hist_item_ids (item_id
  space, 0..20), hist_category_ids (category_id space, 0..10).
  Ids are Zipf distributed over ``[0, vocab)`` and mapped through a fixed random permutation
  per table, so frequent ids are not 0, 1, 2, ...
* 12 dense ``float32`` features dense_0 .. dense_11 (normals and standardised log-normals).
* Labels: ``click`` int8 0/1; ``conversion`` int8, null where click == 0 (only observed after
  a click); ``watch_time`` float32 seconds >= 0 with log1p(watch_time) ~ max(0, N(mu(x), 0.5)).
* Ground truth (float32): ``p_click`` = P(click | x), ``p_conversion`` =
  P(conversion | click, x) (every row), ``watch_time_log_mean`` = E[log1p(watch_time) | x].

Generative model: each table has latent vectors ``[vocab, 8]`` (damped for rare ids, so the
signal sits mostly on frequent, learnable ids) and each feature a scale (some matter a lot,
a few nearly nothing); multi-hot features contribute the mean of their ids' rows, dense
features a random linear map. ``z`` = sum, standardised. As in the MMoE paper's synthetic
data, task t scores ``u_t = w_t . z`` with ``w_conv = rho w_click + sqrt(1 - rho^2) w_orth``
(likewise for watch), adds ``sum_i sin(a_i u_t + b_i)`` and a task-only interaction of one
or two features (click: hour x device, conversion: price x user_level, watch: item age +
category). Scales/offsets are calibrated once on a seeded sample to hit the target click
rate / AUC and conversion rate / AUC. ``--workload interactions`` (the peers' columns)
replaces the task-only terms with pairwise products f_a(x_a) * f_b(x_b) of projections of the
features' latent rows, five per task, two pairs shared by both tasks (see
:mod:`mtl_dist.data.synth_model`'s ``_INTERACTION_TERMS`` and :func:`interaction_share`). All latent parameters come from ``seed`` only; rows
are generated in fixed-size chunks, each with its own seeded stream, so same parameters and
seed give identical values, with memory bounded for any size.

The pieces: :mod:`~mtl_dist.data.synth_workloads` (columns, workloads, schema),
:mod:`~mtl_dist.data.synth_model` (latent parameters, scores, labels),
:mod:`~mtl_dist.data.synth_stats` (AUC, log loss, calibration, oracle metrics),
:mod:`~mtl_dist.data.synth_write` (:func:`generate`: files, layout, ``meta.json``) and
:mod:`~mtl_dist.data.synth_ctcvr` (:func:`ctcvr_view`). This module holds the ``mtl-datagen``
command (:func:`main`; ``ValueError`` from :func:`generate` becomes a usage error, exit 2) and
re-exports their names (``__all__``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mtl_dist.data.synth_ctcvr import ctcvr_view
from mtl_dist.data.synth_model import (
    CALIBRATION_ROWS,
    COLD_USER_RATE,
    LATENT_DIM,
    RARE_ID_SCALE,
    TARGETS,
    WATCH_BASE,
    WATCH_SCALE,
    WATCH_SIGMA,
    LatentModel,
    build_model,
    interaction_share,
    make_chunk,
)
from mtl_dist.data.synth_sequences import generate_sequences
from mtl_dist.data.synth_stats import log_loss, oracle_metrics, roc_auc
from mtl_dist.data.synth_workloads import (
    DENSE_FEATURES,
    LABEL_COLUMNS,
    MULTI_HOT,
    PEERS_SPARSE,
    SCHEMA,
    SPARSE_FEATURES,
    SPARSE_SINGLE,
    TABLES,
    TASK_TRUTH,
    TASKS,
    TRUTH_COLUMNS,
    WORKLOADS,
    SparseFeature,
    Workload,
    string_keys,
)
from mtl_dist.data.synth_write import CHUNK_ROWS, FIRST_DAY, GENERATOR_VERSION, day_name, generate

_build_model = build_model  # the old private name (tests clear its cache)

__all__ = [
    "CALIBRATION_ROWS",
    "CHUNK_ROWS",
    "COLD_USER_RATE",
    "DENSE_FEATURES",
    "FIRST_DAY",
    "GENERATOR_VERSION",
    "LABEL_COLUMNS",
    "LATENT_DIM",
    "MULTI_HOT",
    "PEERS_SPARSE",
    "RARE_ID_SCALE",
    "SCHEMA",
    "SPARSE_FEATURES",
    "SPARSE_SINGLE",
    "TABLES",
    "TARGETS",
    "TASKS",
    "TASK_TRUTH",
    "TRUTH_COLUMNS",
    "WATCH_BASE",
    "WATCH_SCALE",
    "WATCH_SIGMA",
    "WORKLOADS",
    "LatentModel",
    "SparseFeature",
    "Workload",
    "_build_model",
    "build_model",
    "ctcvr_view",
    "day_name",
    "generate",
    "interaction_share",
    "log_loss",
    "main",
    "make_chunk",
    "oracle_metrics",
    "roc_auc",
    "string_keys",
]


def main(argv: Sequence[str] | None = None) -> None:
    """``mtl-datagen`` entry point."""
    ap = argparse.ArgumentParser(prog="mtl-datagen", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (train/, val/, meta.json)")
    ap.add_argument("--train-rows", type=int, default=300_000)
    ap.add_argument("--val-rows", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=4, help="train files")
    ap.add_argument(
        "--val-files", type=int, default=None, help="val files (default max(1, files // 2))"
    )
    ap.add_argument("--row-group-size", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-correlation", type=float, default=0.6, help="rho in [0, 1]")
    ap.add_argument(
        "--workload",
        choices=sorted([*WORKLOADS, "sequences"]),
        default="funnel",
        help="funnel (default: 21 sparse incl. multi-hot, 12 dense, click/conversion/watch_time), "
        "peers (16 single-hot, 8 dense, click and purchase on every row), interactions (the "
        "peers' columns, each task's logit dominated by pairwise products of feature effects) or "
        "strings (peers with user / item / author keys as strings and subcategory_id as a "
        "Criteo-style hex token), or sequences (a candidate item and the user's recent items as "
        "a list column; click depends on a past item matching the candidate: "
        "mtl_dist/data/synth_sequences.py, configs/sequences.toml)",
    )
    ap.add_argument(
        "--days",
        type=int,
        default=0,
        help="lay the data out as daily hive partitions OUT/dt=2026-11-01/...: training files "
        "over the first DAYS days, validation files on the day after (0: train/ and val/)",
    )
    ap.add_argument("--force", action="store_true", help="regenerate even if meta.json matches")
    a = ap.parse_args(argv)
    if a.workload == "sequences":
        generate_sequences(a.out, a.train_rows, a.val_rows, a.files, a.row_group_size, a.seed)
        return
    try:
        generate(
            a.out,
            a.train_rows,
            a.val_rows,
            a.files,
            a.row_group_size,
            a.seed,
            a.task_correlation,
            a.val_files,
            workload=a.workload,
            days=a.days,
            force=a.force,
        )
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
