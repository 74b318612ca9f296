#!/usr/bin/env bash
# Creates .venv and installs fedpipe_dist with its test, analysis and eval extras. Safe to run again.
#   bash scripts/setup.sh                 # CPU (torch pinned to 2.13.0; set TORCH_SPEC to change)
#   TORCH_SPEC=torch bash scripts/setup.sh   # any torch, e.g. a CUDA build on a GPU cluster
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "fedpipe_dist needs Python >= 3.10"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fedpipe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" numpy
  .venv/bin/python -m pip install -q -e ".[test,analysis,eval]"
  touch "$stamp"
fi
