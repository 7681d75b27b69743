"""Train several tiny runs in one process (a one-process group, as ``python -m mtl_dist.train``
makes): ``python -m tests.serving_worker OUT CONFIG "NAME=--key value ..." ...``.

Each ``NAME=overrides`` trains ``CONFIG`` with those overrides (space-separated ``--key value``
pairs) into ``OUT/NAME``; one process pays torch's and TorchRec's import once for all of them.
"""

import os
import sys

from mtl_dist.checkpoint.rundir import release_run_dirs
from mtl_dist.config import load_config
from mtl_dist.distributed.setup import destroy, init_distributed
from mtl_dist.train import train


def main(out: str, config: str, runs: list[str]) -> None:
    info = init_distributed("cpu", threads=1)
    try:
        for run in runs:
            name, _, overrides = run.partition("=")
            argv = ["--config", config, "--train.output_dir", os.path.join(out, name)]
            cfg = load_config(argv + [a for a in overrides.split() if a])
            train(cfg, info)
            release_run_dirs()
    finally:
        destroy()
    sys.stdout.flush()
    os._exit(0)  # as mtl_dist.train: skip the C++ static teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
