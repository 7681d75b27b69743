#!/usr/bin/env bash
# Single-node launch: torchrun --standalone with N processes, then mtl_dist.train.
#
#   bash launch/local.sh [--nproc N] [train args ...]
#
# N defaults to the number of GPUs, or to 2 on a CPU-only host. OMP_NUM_THREADS defaults to
# cores / N so the ranks on one host do not oversubscribe the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NPROC=""
if [ "${1:-}" = "--nproc" ]; then NPROC=$2; shift 2; fi
source launch/procs.sh
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m mtl_dist.train "$@"
