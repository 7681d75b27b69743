"""Checkpoints: save and resume everything a run needs, atomically, under any world size.

Layout (``<output_dir>/checkpoints`` unless ``checkpoint.dir`` says otherwise)::

    step_00000400/            a complete checkpoint (torch.distributed.checkpoint format)
        .metadata, __0_0.distcp, ...   model (sharded tables + dense), optimizers (fused
                                       embedding state + dense), balancer state
        extra.pt              step, epoch, config, every rank's RNG states and reader position
        manifest.json         run id, step, table storage type (fp32 | fp16), dense
                              precision, and the size and xxh3-128 digest of every file
    step_00000600.partial/    being written (or a crash left it): never loaded, removed at
                              the next start
    latest                    the name of the newest complete checkpoint
    previous-<time>/          checkpoints a fresh start (resume = never) moved aside

A checkpoint is written to ``*.partial`` by every rank; each rank digests its share of the
files, and only when all ranks are done does rank 0 write the manifest, rename the directory and
then replace ``latest`` (``os.replace``: atomic), so a crash mid-save leaves the previous one in
use. A checkpoint is *verified* (:func:`verify_checkpoint`) before it is loaded or exported:
every file of its manifest present with its size and digest; one that fails is never loaded.
The last ``keep`` checkpoints of this run (its run id) are kept; another run's, and ``latest``'s
target, are never pruned.

Loading goes through ``torch.distributed.checkpoint``, which reshards: a checkpoint saved by N
processes loads under M and under another sharding plan; the reader positions reshard too
(see :meth:`ParquetBatchReader.resume_pass`). ``extra.pt`` holds only tensors and plain Python
values and is read with ``weights_only=True``.

Here: saving and loading (the collectives), RNG states, the schema check. The files' side —
manifest and digests, verifying, listing, the pointers, pruning — is
:mod:`mtl_dist.checkpoint.manifest` (its names import from here too).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mtl_dist.checkpoint.manifest import (
    _CHUNK,
    MANIFEST,
    MANIFEST_FORMAT,
    checkpoint_dir,
    describe_file,
    digest_file,
    latest_target,
    list_checkpoints,
    point,
    prune,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from mtl_dist.config import JobConfig, ModelConfig, SparseFeature, TaskSpec, to_dict
from mtl_dist.config.compat import nest_model_keys
from mtl_dist.distributed import collectives
from mtl_dist.distributed.collectives import barrier, gather_objects, is_main
from mtl_dist.models.collision import history_state, restore_history

__all__ = [  # the manifest's side moved to checkpoint/manifest.py: its old path stays
    "MANIFEST", "MANIFEST_FORMAT", "SCHEMA_KEYS", "_CHUNK", "Resumed", "check_schema",
    "checkpoint_dir", "crash_point", "digest_file", "latest_target", "list_checkpoints",
    "load_checkpoint", "point", "prune", "read_manifest", "resolve_checkpoint", "rng_state",
    "save_checkpoint", "schema_differences", "set_rng_state", "verify_checkpoint",
    "with_new_keys",
]  # fmt: skip

SCHEMA_KEYS = ("features", "tasks", "model")  # what must match for weights to load


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _flat(x: Any, prefix: str = "") -> list[str]:
    """The keys ``torch.distributed.checkpoint`` flattens a nested state dict into."""
    if isinstance(x, dict):
        return [k for key, v in x.items() for k in _flat(v, f"{prefix}{key}.")]
    if isinstance(x, list):
        return [k for i, v in enumerate(x) for k in _flat(v, f"{prefix}{i}.")]
    return [prefix[:-1]]


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, tuple | list) else x


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(
    root: Path,
    *,
    step: int,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    reader_position: dict[str, Any],
    cfg: JobConfig,
    keep: int,
    run_id: str,
    loop_state: dict[str, Any] | None = None,
) -> Path:
    """Save on every rank (a collective); returns the final path. See the module doc.

    A save that fails for want of space raises ``OSError`` (ENOSPC) saying where, how much is
    free, about how much a checkpoint needs and which checkpoint is kept; the unfinished
    directory is removed.
    """
    name = f"step_{step:08d}"
    final, partial = root / name, root / f"{name}.partial"
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    try:
        dcp.save(
            {"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=partial
        )
        ranks = gather_objects(
            {"rng": rng_state(), "reader": reader_position, "collision": history_state(model)}
        )
        if is_main():
            extra = {"step": step, "epoch": epoch, "config": to_dict(cfg), "ranks": ranks,
                     "loop": loop_state or {}}  # fmt: skip
            torch.save(extra, partial / "extra.pt")
        barrier()
        # every rank digests its share of the files (in parallel), rank 0 writes the manifest
        names = sorted(p.name for p in partial.iterdir() if p.is_file())
        rank, world = _rank_world()
        mine = {n: describe_file(partial / n) for i, n in enumerate(names) if i % world == rank}
        files = {k: v for part in gather_objects(mine) for k, v in part.items()}
        if is_main():
            write_manifest(
                partial, run_id=run_id, step=step, epoch=epoch, world_size=world,
                table_dtype=cfg.embedding.data_type, dense_precision=cfg.train.precision,
                files=files,
            )  # fmt: skip
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        if is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise _explain_save_failure(e, root, step) from e
    if is_main():
        crash_point("before_commit", step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        point(root, name, "latest")
        prune(root, run_id, keep)
    barrier()
    return final


def _rank_world() -> tuple[int, int]:
    return collectives.rank(), collectives.world_size()


def _is_enospc(e: BaseException) -> bool:
    """Whether ``e`` (or anything it wraps, DCP's per-rank failures included) is a full disk."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(x) or "unexpected pos" in str(x):
            return True  # torch.save's zip writer reports a short write as "unexpected pos"
        todo += [x.__cause__, x.__context__]
        todo += list(getattr(x, "failures", {}).values())  # DCP's CheckpointException
    return False


def _explain_save_failure(e: BaseException, root: Path, step: int) -> BaseException:
    """``e`` as a full-disk ``OSError`` naming where, what is free, what a checkpoint needs
    and what is kept; any other failure unchanged."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = -1
    target = latest_target(root)
    kept = read_manifest(root / target) if target else {}
    need = sum(f["size"] for f in kept.get("files", {}).values())
    if not (_is_enospc(e) or (need and 0 <= free < need)):
        return e
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    needs = f"about {mib(need)} (the size of {target})" if need else "more than that"
    return OSError(
        errno.ENOSPC,
        f"disk full while saving checkpoint step_{step:08d} to {root}: {mib(free)} free there, a "
        f"checkpoint needs {needs}; kept: {root / target if target else 'no checkpoint yet'} "
        f"(the unfinished step_{step:08d}.partial was removed). Free space or point "
        "checkpoint.dir at a larger disk, then resume",
    )


@dataclass
class Resumed:
    """What a loaded checkpoint gives the train loop."""

    path: Path
    step: int
    epoch: int
    positions: list[dict[str, Any]]  # every saving rank's reader position
    saved_world_size: int
    run_id: str  # the run the checkpoint belongs to (a resumed run keeps it)
    table_dtype: str  # the tables' storage type when saved (fp32 | fp16); loads into either
    loop_state: dict[str, Any]  # the train loop's own (best-model tracker, validation history)


def schema_differences(saved: Any, now: Any, where: str) -> list[str]:
    """Every field where ``saved`` and ``now`` (plain config data) differ, as
    ``where.field: saved X, configured Y``; lists of named entries (sparse features, tasks) are
    matched by name, so a changed ``embedding_dim`` names its feature (and table)."""
    if saved == now:
        return []
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now))
        return [
            d for k in keys for d in schema_differences(saved.get(k), now.get(k), f"{where}.{k}")
        ]
    named = lambda xs: isinstance(xs, list) and all(isinstance(x, dict) and "name" in x for x in xs)  # noqa: E731
    if named(saved) and named(now):
        a, b = {x["name"]: x for x in saved}, {x["name"]: x for x in now}
        out = []
        for name in dict.fromkeys([*a, *b]):
            x, y = a.get(name), b.get(name)
            table = (x or y).get("table") or (name if "embedding_dim" in (x or y) else "")
            label = f"{where}['{name}']" + (f" (table {table})" if table else "")
            if x is None or y is None:
                out.append(f"{label}: {'configured' if x is None else 'saved'} only")
            else:
                out += schema_differences(x, y, label)
        if not out:  # the same entries in another order (outputs are in task order)
            out.append(f"{where}: order saved {list(a)}, configured {list(b)}")
        return out
    return [f"{where}: saved {saved!r}, configured {now!r}"]


def _defaults(cls: type) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that have defaults, as plain config data."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def with_new_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config's schema sections with every key it lacks at today's default.

    A checkpoint written before a key existed was trained as that key's default computes (a new
    option starts off), so an unchanged model resumes after an upgrade of mtl-dist instead of
    being refused for keys it never had."""
    out = dict(saved)
    if isinstance(out.get("model"), dict):  # the previous release's flat keys nested first
        base, model = to_dict(ModelConfig()), nest_model_keys(out["model"])
        out["model"] = {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(
            base.get(k), dict) else v for k, v in model.items()}}  # fmt: skip
    features = out.get("features")
    if isinstance(features, dict) and isinstance(features.get("sparse"), list):
        sparse = [{**_defaults(SparseFeature), **f} for f in features["sparse"]]
        out["features"] = {**features, "sparse": sparse}
    if isinstance(out.get("tasks"), list):
        out["tasks"] = [{**_defaults(TaskSpec), **t} for t in out["tasks"]]
    return out


def check_schema(saved: dict[str, Any], cfg: JobConfig, path: Path) -> None:
    """Refuse a checkpoint whose features, tasks or model differ from ``cfg``, naming every
    differing field with its saved and configured value. Keys newer than the checkpoint count
    at their defaults (:func:`with_new_keys`)."""
    saved = with_new_keys(saved)
    now = to_dict(cfg)
    diffs = [d for k in SCHEMA_KEYS for d in schema_differences(saved.get(k), now[k], k)]
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written for another schema: {'; '.join(diffs)} (use the "
            "saved values, a fresh train.output_dir, or checkpoint.resume = never)"
        )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig
) -> Resumed:
    """Load ``path`` into the (sharded) model and optimizer in place, restore this rank's RNG
    (when the world size is unchanged) and return the step, epoch and reader positions."""
    extra = torch.load(path / "extra.pt", weights_only=True)
    check_schema(extra["config"], cfg, path)
    saved_world, world = len(extra["ranks"]), _rank_world()[1]
    managed = [f.name for f in cfg.features.sparse if f.collision == "managed"]
    if managed and world not in (saved_world, 1):
        raise ValueError(
            f"checkpoint {path} was saved by {saved_world} rank(s) and holds managed-collision "
            f"tables ({', '.join(managed)}): their rows are split by id mod world size, so they "
            f"resume on {saved_world} rank(s) or on 1, not on {world}"
        )
    # fused embedding optimizers hold state from the start; the dense optimizer creates its
    # state at its first step, so make it now (a zero-gradient step) for DCP to load into
    for _, opt in optimizer.optimizers:
        if not opt.state:
            opt.init_state()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in _flat(state) if k not in saved]
    if any(k.startswith("model.") for k in missing):
        raise ValueError(
            f"checkpoint {path} lacks model state {[k for k in missing if k.startswith('model.')][:5]}"
        )
    if missing and is_main():  # a table that moved between data-parallel and sharded
        tables = sorted({k.split(".weight.")[0].rsplit(".", 1)[-1] for k in missing})
        print(f"[resume] optimizer state starts afresh for {len(missing)} entries ({tables}): "
              "their tables changed between data-parallel and sharded in the new plan")  # fmt: skip
    dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    ranks = extra["ranks"]
    rank, world = collectives.rank(), collectives.world_size()
    if len(ranks) == world:
        set_rng_state(ranks[rank]["rng"])
    restore_history(model, ranks[rank].get("collision") if len(ranks) == world else None)
    manifest = read_manifest(path)
    return Resumed(
        path, extra["step"], extra["epoch"], [r["reader"] for r in ranks], len(ranks),
        manifest.get("run_id", ""), manifest.get("table_dtype", "fp32"), extra.get("loop", {}),
    )  # fmt: skip


def crash_point(name: str, step: int) -> None:
    """Fault injection for the crash-during-save test: ``MTL_CRASH_AT=<name>:<step>`` kills
    the process here, as a node failure would (no cleanup, no exception handlers)."""
    if os.environ.get("MTL_CRASH_AT") == f"{name}:{step}":
        os._exit(17)
