#!/usr/bin/env bash
# Mask R-CNN R50-FPN 1x on COCO (SyncBN, 4conv1fc, frozen_stages 0). VARIANT=soco|moco|swav|supervised|scratch picks the recipe (WD 2.5e-5 for soco, 1e-4 otherwise).
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_FPN_1x.sh INIT [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/mask_rcnn_R50_FPN_1x_${VARIANT:-soco}.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
