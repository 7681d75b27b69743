# Sourced by local.sh and multinode.sh (from the repo root): processes per host default to the
# GPU count, or 2 on a CPU-only host; OMP_NUM_THREADS to cores / processes, so the ranks on one
# host do not oversubscribe its CPUs.
if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c GPU) && [ "$GPUS" -gt 0 ]; then
    NPROC=$GPUS
  else
    NPROC=2
  fi
fi
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
