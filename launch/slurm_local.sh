#!/usr/bin/env bash
# Install what the real-Slurm tests (tests/launch) need: Debian's slurm-wlm and munge.
#
#   bash launch/slurm_local.sh
#
# The packages only; the test fixture generates a munge key and a slurm.conf in a temp dir and
# starts munged, slurmctld and slurmd itself (as root), then stops them by pid.
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
  && command -v munged >/dev/null; then
  echo "[slurm] slurm-wlm and munge already installed ($(sbatch --version))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "[slurm] installed: $(sbatch --version)"
