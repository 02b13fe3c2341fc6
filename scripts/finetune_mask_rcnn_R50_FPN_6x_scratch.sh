#!/usr/bin/env bash
# Mask R-CNN R50-FPN 6x from scratch (540k iterations, steps 480k/520k, SyncBN) on COCO.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_FPN_6x_scratch.sh [extra transfer/finetune.py flags]
#   NPROC (default 8) processes on this machine, total batch 16 at 2 images each (the LR and the
#   iteration counts scale linearly with another total batch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" transfer/finetune.py \
  --config "transfer/configs/mask_rcnn_R50_FPN_6x_scratch.yaml" "$@"
