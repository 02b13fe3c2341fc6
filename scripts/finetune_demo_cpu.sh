#!/usr/bin/env bash
# Tiny Mask R-CNN fine-tuning on CPU on the embedded COCO-style demo set (about 8 minutes on 2 cores),
# reporting COCO box/mask AP in OUTPUT/metrics.json. Optional INIT: a detection-init file converted
# from the tiny pretraining (bash scripts/pretrain_tiny_cpu.sh; python transfer/convert.py ...).
# Usage: bash scripts/finetune_demo_cpu.sh [INIT] [extra transfer/finetune.py flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -f data/demo/coco/annotations/instances_train.json ]]; then
  echo "error: data/demo/coco is missing; make it with: python -m demo.data --out data/demo" >&2
  exit 2
fi
INIT=scratch
if [[ $# -gt 0 && "$1" != --* ]]; then INIT=$1; shift; fi
exec "${PYTHON:-python}" transfer/finetune.py --config transfer/configs/demo_cpu.yaml --init "$INIT" "$@"
