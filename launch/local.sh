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
if [ -z "$NPROC" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c GPU) && [ "$GPUS" -gt 0 ]; then
    NPROC=$GPUS
  else
    NPROC=2
  fi
fi
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m mtl_dist.train "$@"
