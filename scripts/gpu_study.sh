#!/usr/bin/env bash
# The project's GPU proof in one command, on one GPU with ~16 CPU cores (planned for under 10
# minutes on an H100/H200; not yet measured): the pre-registered small-scale study at its `gpu`
# preset (scratch vs BYOL vs SoCo_FPN, 3 fine-tuning seeds; docs/study_small.md), then the GPU
# check table (scripts/gpu_check.sh).
#   bash scripts/gpu_study.sh [OUT]        # OUT: the study folder (default study_gpu)
# The data and proposals can be made beforehand on any machine and copied into OUT:
#   python benchmarks/study_small.py --out study_gpu --preset gpu --prepare-only
# Environment: WORKERS (loader workers per pretraining run, default 7), JOBS (runs at a time, default 9).
# Exit code: the study's, or gpu_check's when the study succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
OUT=${1:-study_gpu}
"$PY" benchmarks/study_small.py --out "$OUT" --preset gpu --device cuda \
    --workers "${WORKERS:-7}" --jobs "${JOBS:-9}"
study_rc=$?
bash scripts/gpu_check.sh --steps 15
check_rc=$?
echo "study: exit code $study_rc (table: $OUT/results.md); gpu_check: exit code $check_rc"
[ "$study_rc" -ne 0 ] && exit "$study_rc"
exit "$check_rc"
