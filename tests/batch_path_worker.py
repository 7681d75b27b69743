"""Run under torchrun: which of our source files one training batch passes through.

Builds the job of ``configs/default.toml`` (over ``DATA``) as ``mtl_dist.train`` does, runs two
steps to warm up (lazy initialisation, the pipeline's first fill), then records, with
``sys.setprofile``, every Python function called during the next step from reading the Parquet
rows to the end of the backward — building the batch, the forward, the losses, the step check,
the balancer, the backward — until the optimizer step begins, and writes where they live to
``OUT/rank<r>.json`` (``{"<file under mtl_dist/>:<function>": calls}``).

    torchrun --nproc_per_node 2 tests/batch_path_worker.py DATA OUT [--flag value ...]
"""

import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

import mtl_dist
from mtl_dist.checkpoint.checkpointer import Checkpointer
from mtl_dist.config import load_config
from mtl_dist.data.loaders import build_loader
from mtl_dist.distributed.setup import init_distributed
from mtl_dist.train import build_job, check_writable, seed_everything

ROOT = Path(mtl_dist.__file__).parent


def main(data: str, out: str, extra: list[str]) -> None:
    cfg = load_config(
        ["--config", "configs/default.toml", "--data.train_path", f"{data}/train",
         "--data.val_path", f"{data}/val", "--train.output_dir", f"{out}/run",
         "--train.precision", "fp32", *extra]
    )  # fmt: skip
    info = init_distributed(cfg.train.device, cfg.train.threads)
    seed_everything(cfg.train.seed)
    check_writable(cfg.train.output_dir)
    job = build_job(cfg, info, Checkpointer.open_run(cfg, lambda *a: None))
    job.ckpt.load()
    job.train_reader.start_pass()
    steps = job.runner.run(iter(build_loader(job.train_reader, cfg.data)))
    list(itertools.islice(steps, 2))  # warm-up
    calls: Counter[str] = Counter()

    def profile(frame, event, arg) -> None:
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(ROOT):
                calls[f"{path.relative_to(ROOT)}:{frame.f_code.co_name}"] += 1

    step = job.optimizer.step  # the backward has ended when the optimizer step starts

    def stop_at_step(*args, **kwargs):
        sys.setprofile(None)
        return step(*args, **kwargs)

    job.optimizer.step = stop_at_step
    sys.setprofile(profile)
    next(steps)
    sys.setprofile(None)
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(dict(calls), indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
