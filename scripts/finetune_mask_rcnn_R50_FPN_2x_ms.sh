#!/usr/bin/env bash
# Mask R-CNN R50-FPN multi-scale 2x (180k iterations, steps 120k/160k) on COCO. VARIANT=soco|moco|swav|supervised|scratch picks the recipe.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_FPN_2x_ms.sh INIT [extra transfer/finetune.py flags]
#   NPROC (default 8) processes on this machine, total batch 16 at 2 images each (the LR and the
#   iteration counts scale linearly with another total batch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
INIT=${1:?usage: bash scripts/finetune_mask_rcnn_R50_FPN_2x_ms.sh INIT [flags]   (INIT: detection-init file from transfer/convert.py, torchvision-supervised:PATH or scratch)}
shift
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" transfer/finetune.py \
  --config "transfer/configs/mask_rcnn_R50_FPN_2x_ms_${VARIANT:-soco}.yaml" --init "$INIT" "$@"
