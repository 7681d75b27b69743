"""Checkpoints: save and resume everything a run needs, atomically, under any world size.

Layout (``<output_dir>/checkpoints`` unless ``checkpoint.dir`` says otherwise)::

    step_00000400/            a complete checkpoint (torch.distributed.checkpoint format)
        .metadata, __0_0.distcp, ...   model (sharded tables + dense), optimizers (fused
                                       embedding state + dense), balancer state
        extra.pt              step, epoch, config, every rank's RNG states and reader position
    step_00000600.partial/    being written (or a crash left it): never loaded
    latest                    the name of the newest complete checkpoint

A checkpoint is written to ``*.partial`` by every rank, and only when all ranks are done does
rank 0 rename it and then replace ``latest`` (``os.replace``: atomic), so a crash mid-save
leaves the previous one in use. The last ``keep`` are kept.

Loading goes through ``torch.distributed.checkpoint``, which reshards: a checkpoint saved by N
processes loads under M and under another sharding plan; the reader positions reshard too
(see :meth:`ParquetBatchReader.resume_pass`). ``extra.pt`` holds only tensors and plain Python
values and is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mtl_dist.config import JobConfig, to_dict

SCHEMA_KEYS = ("features", "tasks", "model")  # what must match for weights to load


def checkpoint_dir(cfg: JobConfig) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.train.output_dir, "checkpoints"))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "extra.pt").exists() else None


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


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(
    root: Path,
    step: int,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    reader_position: dict[str, Any],
    cfg: JobConfig,
    keep: int,
) -> Path:
    """Save on every rank (a collective); returns the final path. See the module doc."""
    name = f"step_{step:08d}"
    final, partial = root / name, root / f"{name}.partial"
    if _is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=partial)
    ranks = _gather({"rng": rng_state(), "reader": reader_position})
    if _is_main():
        extra = {"step": step, "epoch": epoch, "config": to_dict(cfg), "ranks": ranks}
        torch.save(extra, partial / "extra.pt")
        crash_point("before_commit", step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = root / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".partial"))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


@dataclass
class Resumed:
    """What a loaded checkpoint gives the train loop."""

    path: Path
    step: int
    epoch: int
    positions: list[dict[str, Any]]  # every saving rank's reader position
    saved_world_size: int


def check_schema(saved: dict[str, Any], cfg: JobConfig, path: Path) -> None:
    """Refuse a checkpoint whose features, tasks or model differ from ``cfg``, naming them."""
    now = to_dict(cfg)
    diffs = [k for k in SCHEMA_KEYS if saved.get(k) != now[k]]
    if not diffs:
        return
    details = []
    for key in diffs:
        a, b = saved.get(key), now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            details.append(f"{key}.{{{', '.join(keys)}}}")
        elif isinstance(a, list) and isinstance(b, list):
            names = lambda xs: [x.get("name") for x in xs]  # noqa: E731
            details.append(f"{key}: saved {names(a)}, config {names(b)}")
        else:
            details.append(key)
    raise ValueError(
        f"checkpoint {path} was written for another schema; differing: {'; '.join(details)} "
        "(use a fresh train.output_dir, or checkpoint.resume = never)"
    )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig
) -> Resumed:
    """Load ``path`` into the (sharded) model and optimizer in place, restore this rank's RNG
    (when the world size is unchanged) and return the step, epoch and reader positions."""
    extra = torch.load(path / "extra.pt", weights_only=True)
    check_schema(extra["config"], cfg, path)
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
    if missing and _is_main():  # a table that moved between data-parallel and sharded
        tables = sorted({k.split(".weight.")[0].rsplit(".", 1)[-1] for k in missing})
        print(f"[resume] optimizer state starts afresh for {len(missing)} entries ({tables}): "
              "their tables changed between data-parallel and sharded in the new plan")  # fmt: skip
    dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    ranks = extra["ranks"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(ranks) == world:
        set_rng_state(ranks[rank]["rng"])
    return Resumed(path, extra["step"], extra["epoch"], [r["reader"] for r in ranks], len(ranks))


def crash_point(name: str, step: int) -> None:
    """Fault injection for the crash-during-save test: ``MTL_CRASH_AT=<name>:<step>`` kills
    the process here, as a node failure would (no cleanup, no exception handlers)."""
    if os.environ.get("MTL_CRASH_AT") == f"{name}:{step}":
        os._exit(17)
