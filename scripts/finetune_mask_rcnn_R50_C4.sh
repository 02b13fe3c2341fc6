#!/usr/bin/env bash
# Mask R-CNN R50-C4 (Res5ROIHeadsExtraNorm, SyncBN) on COCO from a SoCo C4 initialisation; SCHEDULE=1x|2x.
# Usage: NPROC=8 bash scripts/finetune_mask_rcnn_R50_C4.sh INIT [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/mask_rcnn_R50_C4_${SCHEDULE:-1x}_soco.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
