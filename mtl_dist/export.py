"""Export a checkpoint as one unsharded model file for inference.

``python -m mtl_dist.export CHECKPOINT_DIR model.pt`` loads a (sharded, any world size)
checkpoint into a single-process model on the CPU — ``torch.distributed.checkpoint`` gathers
the table shards — and writes ``{"format", "config", "state_dict"}``: tensors and plain Python
values only, so :func:`load_exported` reads it with ``torch.load(weights_only=True)``, never
unpickling arbitrary objects.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from mtl_dist.checkpoint import resolve_checkpoint, verify_checkpoint
from mtl_dist.config import JobConfig, from_dict, to_dict
from mtl_dist.files import written_whole
from mtl_dist.losses import ModelWithLoss, build_model_with_loss
from mtl_dist.models.ranker import build_ranker

FORMAT = "mtl-dist-model/1"


def build_unsharded(cfg: JobConfig) -> ModelWithLoss:
    torch.manual_seed(cfg.train.seed)
    return build_model_with_loss(build_ranker(cfg, device="cpu"), cfg)


def export_checkpoint(checkpoint: Path, out: Path) -> JobConfig:
    """Checkpoint directory → model file ``out``; returns the run's config.

    Raises ``ValueError`` naming the file when the checkpoint does not verify (a missing,
    truncated or altered file: see :func:`mtl_dist.checkpoint.verify_checkpoint`).
    """
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint} cannot be exported: {problem}")
    extra = torch.load(checkpoint / "extra.pt", weights_only=True)
    cfg = from_dict(extra["config"])
    model = build_unsharded(cfg)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)  # no process group: reads every shard here
    model.load_state_dict(state["model"])
    blob = {
        "format": FORMAT,
        "config": to_dict(cfg),
        "state_dict": model.state_dict(),
        "managed_buckets": len(extra["ranks"]),  # the world size managed tables trained at
    }
    with written_whole(out) as tmp:
        torch.save(blob, tmp)
    return cfg


def load_exported(path: Path) -> tuple[JobConfig, ModelWithLoss]:
    """An exported file → (config, model in eval mode on the CPU)."""
    blob = torch.load(path, weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mtl-dist model file (format {blob.get('format')!r})")
    cfg = from_dict(blob["config"])
    model = build_unsharded(cfg)
    model.load_state_dict(blob["state_dict"])
    model.model.managed_buckets = blob.get("managed_buckets", 1)
    return cfg, model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint directory (checkpoints/step_N), or checkpoints/best / checkpoints/latest",
    )
    p.add_argument("out", type=Path, help="the model file to write")
    a = p.parse_args(argv)
    try:
        cfg = export_checkpoint(resolve_checkpoint(a.checkpoint), a.out)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {a.out}: {cfg.model.head} over {len(cfg.features.sparse)} sparse features, "
          f"tasks {[t.name for t in cfg.tasks]}")  # fmt: skip


if __name__ == "__main__":
    main()
