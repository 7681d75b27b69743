#!/usr/bin/env bash
# Multi-node launch: one torchrun per node, joined by a c10d rendezvous, then mtl_dist.train.
#
#   bash launch/multinode.sh --nnodes N --endpoint HOST:PORT [--node-rank R] [--id ID]
#                            [--nproc P] [train args ...]
#
# Run the same command on every node; HOST is any node's address (usually the first one's) and
# must be reachable from all of them. --node-rank is optional (c10d assigns ranks in arrival order
# when it is left out); --id names the rendezvous (default: $SLURM_JOB_ID, else "mtl").
# P defaults to the GPU count, or to 2 on a CPU-only host; OMP_NUM_THREADS to cores / P.
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the network interface to use, e.g. eth0 or ib0),
# NCCL_IB_DISABLE, NCCL_DEBUG and friends are passed through from the environment unchanged;
# --ifname IF sets both socket interface variables at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NNODES="" ENDPOINT="" NODE_RANK="" RDZV_ID=${SLURM_JOB_ID:-mtl} NPROC=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --endpoint) ENDPOINT=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --id) RDZV_ID=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --ifname) export NCCL_SOCKET_IFNAME=$2 GLOO_SOCKET_IFNAME=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$NNODES" ] || [ -z "$ENDPOINT" ]; then
  echo "usage: $0 --nnodes N --endpoint HOST:PORT [--node-rank R] [--id ID] [--nproc P] [--ifname IF] [train args ...]" >&2
  exit 2
fi
source launch/procs.sh
RANK_ARGS=()
if [ -n "$NODE_RANK" ]; then RANK_ARGS=(--node_rank "$NODE_RANK"); fi
echo "[multinode] $(hostname -s): $NPROC procs x $NNODES nodes, rendezvous $ENDPOINT id $RDZV_ID," \
  "OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}" >&2
exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" "${RANK_ARGS[@]}" \
  --rdzv_backend c10d --rdzv_endpoint "$ENDPOINT" --rdzv_id "$RDZV_ID" \
  -m mtl_dist.train "$@"
