"""Export a checkpoint for inference: an unsharded model file, or a serving package.

``python -m mtl_dist.serve.export CHECKPOINT_DIR model.pt`` (``--format state``, the default) loads a
(sharded, any world size) checkpoint into a single-process model on the CPU —
``torch.distributed.checkpoint`` gathers the table shards — and writes ``{"format", "config",
"state_dict"}``: tensors and plain Python values only, so :func:`load_exported` reads it with
``torch.load(weights_only=True)``, never unpickling arbitrary objects; ``mtl_dist.serve.score`` scores
with it.

``python -m mtl_dist.serve.export CHECKPOINT_DIR model.pt2 --format pt2 [--aoti]
[--embedding-dtype fp32|fp16|int8]`` writes a ``.pt2`` package a process with torch alone runs:
the ``torch.export`` program of :mod:`mtl_dist.serve.program` (raw ids and dense values in, each task's
served value out), compiled with AOTInductor under ``--aoti``, and its metadata (tasks, feature
and dense column order, the id rules, the hashing). With fp16 / int8 tables the command measures
the AUC change against fp32 tables on the validation set (``--check-data``, default the run's
``data.val_path``) and reports the file size. ``examples/serve.py`` is a client.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from mtl_dist.checkpoint.store import resolve_checkpoint, verify_checkpoint
from mtl_dist.config import JobConfig, from_dict, to_dict
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader
from mtl_dist.data.source import RowFilter, list_parquet_files
from mtl_dist.files import check_archive, written_whole
from mtl_dist.loop.losses import ModelWithLoss, build_model_with_loss
from mtl_dist.models.build import build_ranker
from mtl_dist.observe.metrics import task_metrics
from mtl_dist.serve.program import (
    EMBEDDING_DTYPES,
    build_served,
    check_package,
    export_program,
    inputs_from_batch,
    metadata,
    write_package,
)

FORMAT = "mtl-dist-model/1"
MODEL_FILE = "mtl-dist model file"
MODEL_PRODUCER = "python -m mtl_dist.serve.export CHECKPOINT model.pt"


def build_unsharded(cfg: JobConfig) -> ModelWithLoss:
    torch.manual_seed(cfg.train.seed)
    return build_model_with_loss(build_ranker(cfg, device="cpu"), cfg)


def load_checkpoint_model(checkpoint: Path) -> tuple[JobConfig, ModelWithLoss]:
    """Checkpoint directory → (its run's config, the model gathered on the CPU, eval mode).

    Raises ``ValueError`` naming the file when the checkpoint does not verify (a missing,
    truncated or altered file: see :func:`mtl_dist.checkpoint.store.verify_checkpoint`).
    """
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint} cannot be exported: {problem}")
    extra = torch.load(checkpoint / "extra.pt", weights_only=True)
    cfg = from_dict(extra["config"])
    model = build_unsharded(cfg)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed ... uninitialized": intended here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint)  # no process group: reads every shard here
    model.load_state_dict(state["model"])
    model.model.managed_buckets = len(extra["ranks"])  # the world size managed tables trained at
    return cfg, model.eval()


def export_checkpoint(checkpoint: Path, out: Path) -> JobConfig:
    """Checkpoint directory → model file ``out``; returns the run's config.

    Raises ``ValueError`` naming the file when the checkpoint does not verify (see
    :func:`load_checkpoint_model`).
    """
    cfg, model = load_checkpoint_model(checkpoint)
    blob = {
        "format": FORMAT,
        "config": to_dict(cfg),
        "state_dict": model.state_dict(),
        "managed_buckets": model.model.managed_buckets,
    }
    with written_whole(out) as tmp:
        torch.save(blob, tmp)
        check_archive(tmp, MODEL_FILE, MODEL_PRODUCER)  # read back before it replaces ``out``
    return cfg


def load_exported(path: Path) -> tuple[JobConfig, ModelWithLoss]:
    """An exported file → (config, model in eval mode on the CPU).

    The file is verified first (:func:`mtl_dist.files.check_archive`: every member against its
    CRC-32). Raises ``ValueError`` naming the file (and the damaged member) when it is empty,
    truncated, damaged, or not an mtl-dist model file; ``FileNotFoundError`` when absent.
    """
    check_archive(path, MODEL_FILE, MODEL_PRODUCER)
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # a valid zip that is not a torch.save file (a .pt2 package, …)
        raise ValueError(f"{path}: not an {MODEL_FILE} ({type(e).__name__}: {e}); "
                         f"{MODEL_PRODUCER} writes one") from None  # fmt: skip
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: not an {MODEL_FILE} (format {found!r}); "
                         f"{MODEL_PRODUCER} writes one")  # fmt: skip
    cfg = from_dict(blob["config"])
    model = build_unsharded(cfg)
    model.load_state_dict(blob["state_dict"])
    model.model.managed_buckets = blob.get("managed_buckets", 1)
    return cfg, model.eval()


def export_package(
    checkpoint: Path,
    out: Path,
    aoti: bool = False,
    embedding_dtype: str = "fp32",
    check_data: str | None = None,
    check_rows: int = 200_000,
    wrapper_opt: str = "O1",
) -> dict[str, Any]:
    """Checkpoint directory → serving package ``out`` (``.pt2``); returns a report: the config,
    the package's bytes, the tables' bytes in ``embedding_dtype`` and in fp32, the seconds
    export and (``aoti``) compilation took, and with fp16 / int8 tables :func:`table_check` on
    ``check_data`` (default the run's validation data; skipped when it is absent).

    ``wrapper_opt``: the C++ optimisation level of AOTInductor's wrapper (O0 compiles in a
    third of O1's time here). Raises ``ValueError`` naming the checkpoint or the dtype.
    """
    if out.suffix != ".pt2":
        raise ValueError(f"{out}: a serving package's name must end in .pt2")
    cfg, model = load_checkpoint_model(checkpoint)
    served = build_served(cfg, model, embedding_dtype)
    t0 = time.perf_counter()
    program = export_program(cfg, served)
    report: dict[str, Any] = {"config": cfg, "export_s": time.perf_counter() - t0}
    target = "aoti-cpu" if aoti else "eager"
    t0 = time.perf_counter()
    options = {"aot_inductor.compile_wrapper_opt_level": wrapper_opt}
    with written_whole(out) as tmp, open(tmp, "wb") as fh:
        write_package(fh, program, metadata(cfg, embedding_dtype, target), aoti, options)
        fh.flush()
        check_package(tmp)  # read back before it replaces ``out``
    if aoti:
        report["compile_s"] = time.perf_counter() - t0
    report["bytes"] = out.stat().st_size
    report["table_bytes"] = table_bytes(served)
    report["table_bytes_fp32"] = table_bytes(build_served(cfg, model, "fp32"))
    if embedding_dtype != "fp32":
        data = check_data or cfg.data.val_path
        try:
            list_parquet_files(data)
        except (FileNotFoundError, ValueError) as e:
            report["check"] = f"skipped: {e}"
        else:
            reference = build_served(cfg, model, "fp32")
            report["check"] = table_check(cfg, reference, served, data, check_rows)
    return report


def table_bytes(served: torch.nn.Module) -> int:
    """Bytes of the served tables (int8: with their scales and biases)."""
    return sum(
        t.numel() * t.element_size()
        for name, t in served.state_dict().items()
        if name.startswith(("shared.", "per_task."))
    )


@torch.no_grad()
def table_check(
    cfg: JobConfig, reference: torch.nn.Module, served: torch.nn.Module, data: str, rows: int
) -> dict[str, dict[str, float]]:
    """Each task's metric with the reference tables and with ``served``'s, on the first ``rows``
    labelled rows of ``data`` (filtered by ``data.val_filter``): AUC for binary tasks, MSE for
    regression (on the model's scale: ``log1p`` for a ``log1p`` task).

    Returns ``{task: {"metric", "reference", "served", "delta", "rows"}}`` (delta = served −
    reference). Raises ``ValueError`` naming the file for bad data (as training does).
    """
    conv = ArrowBatchConverter(
        cfg.features.sparse, cfg.features.dense, cfg.tasks, dense_nan=cfg.data.dense_nan,
        sample_weights=False, truth=False, hash_seed=cfg.data.hash_seed,
        sequences=cfg.features.sequence,
    )  # fmt: skip
    text = cfg.data.val_filter
    reader = ParquetBatchReader(
        list_parquet_files(data), conv, 4096, drop_last=False,
        row_filter=RowFilter.parse(text, "data.val_filter") if text else None,
    )  # fmt: skip
    parts: list[tuple[torch.Tensor, ...]] = []
    seen = 0
    for batch in reader:
        inputs = inputs_from_batch(batch, cfg.features.sequence)
        parts.append((reference(*inputs), served(*inputs), batch.labels, batch.mask))
        seen += batch.batch_size
        if seen >= rows:
            break
    ref, new, labels, mask = (torch.cat(p) for p in zip(*parts))
    out = {}
    for j, t in enumerate(cfg.tasks):
        keep = mask[:, j] > 0
        if t.kind == "regression" and t.transform == "log1p":
            ref_j, new_j = ref[keep, j].log1p(), new[keep, j].log1p()
        else:
            ref_j, new_j = ref[keep, j], new[keep, j]
        nan = torch.full_like(labels[keep, j], float("nan"))
        a = task_metrics(t, ref_j, labels[keep, j], nan)[0]
        b = task_metrics(t, new_j, labels[keep, j], nan)[0]
        metric = "auc" if t.kind == "binary" else "mse"
        if metric in a and metric in b:
            out[t.name] = {
                "metric": metric, "reference": a[metric], "served": b[metric],
                "delta": b[metric] - a[metric], "rows": int(keep.sum()),
            }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint directory (checkpoints/step_N), or checkpoints/best / checkpoints/latest",
    )
    p.add_argument("out", type=Path, help="the file to write (a .pt2 for --format pt2)")
    p.add_argument(
        "--format",
        choices=["state", "pt2"],
        default="state",
        help="state: the model file mtl_dist.serve.score reads; pt2: a serving package (torch only)",
    )
    p.add_argument("--aoti", action="store_true", help="pt2: compile with AOTInductor (CPU)")
    p.add_argument(
        "--embedding-dtype", choices=list(EMBEDDING_DTYPES), default="fp32",
        help="pt2: storage of the served tables (int8: row-wise, with a scale and bias per row)",
    )  # fmt: skip
    p.add_argument(
        "--check-data", default=None,
        help="fp16 / int8: Parquet to measure the metric change on (default: data.val_path)",
    )  # fmt: skip
    p.add_argument("--check-rows", type=int, default=200_000, help="rows of --check-data read")
    p.add_argument(
        "--wrapper-opt", choices=["O0", "O1", "O2", "O3"], default="O1",
        help="--aoti: C++ optimisation level of the generated wrapper (O0: a faster compile)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.format == "state" and (a.aoti or a.embedding_dtype != "fp32"):
        p.error("--aoti and --embedding-dtype apply to --format pt2")
    try:
        checkpoint = resolve_checkpoint(a.checkpoint)
        if a.format == "state":
            cfg = export_checkpoint(checkpoint, a.out)
        else:
            r = export_package(
                checkpoint, a.out, a.aoti, a.embedding_dtype, a.check_data, a.check_rows,
                a.wrapper_opt,
            )  # fmt: skip
            cfg = r["config"]
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {a.out}: {cfg.model.head} over {len(cfg.features.sparse)} sparse features, "
          f"tasks {[t.name for t in cfg.tasks]}")  # fmt: skip
    if a.format == "pt2":
        mb = 1 / (1 << 20)
        print(
            f"  {r['bytes'] * mb:.2f} MiB; tables {a.embedding_dtype} {r['table_bytes'] * mb:.2f} MiB "
            f"(fp32: {r['table_bytes_fp32'] * mb:.2f} MiB); export {r['export_s']:.1f}s"
            + (f", AOTInductor compile {r['compile_s']:.1f}s" if a.aoti else "")
        )
        check = r.get("check")
        if isinstance(check, str):
            print(f"  metric check {check}")
        elif check:
            for task, c in check.items():
                print(
                    f"  {task}: {c['metric']} {c['reference']:.5f} with fp32 tables, "
                    f"{c['served']:.5f} with {a.embedding_dtype} ({c['delta']:+.5f}) "
                    f"on {c['rows']} rows"
                )


if __name__ == "__main__":
    main()
