#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up if needed, lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh .venv dev,bench   # bench: the peers the end-to-end benchmark test trains
.venv/bin/ruff check mtl_dist data_tools tests examples
.venv/bin/python -m pytest -q --durations=25 tests "$@"
