#!/usr/bin/env bash
# Mask R-CNN R50-FPN 6x from scratch (540k iterations, steps 480k/520k, SyncBN) on COCO.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_FPN_6x_scratch.sh [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
NO_INIT=1
CONFIG="transfer/configs/mask_rcnn_R50_FPN_6x_scratch.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
