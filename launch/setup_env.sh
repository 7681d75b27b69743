#!/usr/bin/env bash
# Create (if missing) a virtual environment and install mtl-dist with the right torch stack.
#
#   bash launch/setup_env.sh [VENV_DIR] [EXTRAS]      (defaults: .venv, "dev,bench")
#
# CUDA present (nvidia-smi answers): PyPI's CUDA torch, fbgemm-gpu and torchrec with its deps.
# No CUDA: torch's CPU build — from PyTorch's CPU wheel index when reachable, otherwise whatever
# pip is configured with (a local wheel directory) — then fbgemm-gpu-cpu, and torchrec --no-deps
# (it declares the CUDA fbgemm-gpu) plus the few packages it imports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
EXTRAS=${2:-dev,bench}
TORCH=2.13.0
FBGEMM=1.8.0
TORCHREC=1.8.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

stack_ok() {
  "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "$TORCH", "torchrec": "$TORCHREC"}
for name, ver in want.items():
    if not md.version(name).startswith(ver):
        sys.exit(1)
import torchrec, fbgemm_gpu  # noqa: F401  (fbgemm must load against this torch)
PYEOF
}

if stack_ok; then
  echo "[setup] torch $TORCH / torchrec $TORCHREC already installed in $VENV"
  "${PIP[@]}" -e ".[$EXTRAS]"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA detected: installing CUDA builds of torch, fbgemm-gpu, torchrec"
  "${PIP[@]}" "torch==$TORCH" "fbgemm-gpu==$FBGEMM" "torchrec==$TORCHREC"
  "${PIP[@]}" -e ".[$EXTRAS]"
else
  if "$PY" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" 2>/dev/null; then
    echo "[setup] no CUDA: torch $TORCH from PyTorch's CPU index"
    "${PIP[@]}" "torch==$TORCH" --index-url "$CPU_INDEX"
  else
    echo "[setup] no CUDA, CPU index unreachable: torch $TORCH from pip's configured sources"
    "${PIP[@]}" "torch==$TORCH"
  fi
  "${PIP[@]}" "fbgemm-gpu-cpu==$FBGEMM"
  # the package's own dependencies (tensordict, pyre-extensions, torchmetrics) cover torchrec's
  # imports; torchrec goes last with --no-deps so pip never pulls the CUDA fbgemm-gpu
  "${PIP[@]}" -e ".[$EXTRAS]"
  "${PIP[@]}" --no-deps "torchrec==$TORCHREC"
fi
"$PY" -c "import torchrec, fbgemm_gpu, mtl_dist" && echo "[setup] ready: $VENV ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
