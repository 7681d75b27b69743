#!/usr/bin/env bash
# The README's first command: set up, generate the default synthetic data, train MMoE on 2 ranks.
#
#   bash launch/quickstart.sh [train overrides ...]     e.g. --model.experts.num 8
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh .venv dev
.venv/bin/python -m data_tools.synth --out data/synth --train-rows 1000000 --val-rows 100000
bash launch/local.sh --nproc 2 --config configs/default.toml "$@"
