#!/usr/bin/env bash
# One-command check of the GPU paths (pretraining throughput / memory / MFU / data waiting,
# Mask R-CNN fp32 and bf16 training and evaluation, CPU-vs-GPU losses); prints one table.
#   bash scripts/gpu_check.sh          # on a GPU machine (< 8 minutes on one H100/H200)
#   bash scripts/gpu_check.sh --tiny   # small CPU smoke run (what the tests run)
# Extra options go to benchmarks/gpu_check.py (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" benchmarks/gpu_check.py "$@"
