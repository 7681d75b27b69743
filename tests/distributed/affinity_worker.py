"""Run under ``torchrun --nproc_per_node 2``: ``init_distributed``'s CPU binding.

``python -m tests.distributed.affinity_worker OUT auto|off`` initialises the process group as
training does, starts one more thread (as the reader and gloo do), and writes
``OUT/rank_<r>.json``: the CPUs every thread of the process may run on, the blocks ``DistInfo``
reports for all local ranks, and the intra-op thread count.
"""

import json
import os
import sys
import threading

import torch

from mtl_dist.distributed.setup import destroy, init_distributed


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    info = init_distributed("cpu", cpu_affinity=mode)
    seen: list[list[int]] = []
    later = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
    later.start()
    later.join()
    threads = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
    result = {
        "threads": threads, "later_thread": seen[0], "blocks": info.cpu_blocks,
        "num_threads": torch.get_num_threads(),
    }  # fmt: skip
    with open(os.path.join(out, f"rank_{info.rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    destroy()


if __name__ == "__main__":
    main()
