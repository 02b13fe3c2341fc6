#!/usr/bin/env bash
# Mask R-CNN R50-FPN multi-scale 2x (180k iterations, steps 120k/160k) on COCO. VARIANT=soco|moco|swav|supervised|scratch picks the recipe.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_FPN_2x_ms.sh INIT [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/mask_rcnn_R50_FPN_2x_ms_${VARIANT:-soco}.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
