#!/usr/bin/env bash
# Mask R-CNN R50-C4 (Res5ROIHeadsExtraNorm, SyncBN) on COCO from a SoCo C4 initialisation; SCHEDULE=1x|2x.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_C4.sh INIT [extra transfer/finetune.py flags]
#   NPROC (default 8) processes on this machine, total batch 16 at 2 images each (the LR and the
#   iteration counts scale linearly with another total batch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
INIT=${1:?usage: bash scripts/finetune_mask_rcnn_R50_C4.sh INIT [flags]   (INIT: detection-init file from transfer/convert.py, torchvision-supervised:PATH or scratch)}
shift
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" transfer/finetune.py \
  --config "transfer/configs/mask_rcnn_R50_C4_${SCHEDULE:-1x}_soco.yaml" --init "$INIT" "$@"
