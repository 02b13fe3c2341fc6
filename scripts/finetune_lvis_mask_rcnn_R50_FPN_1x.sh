#!/usr/bin/env bash
# LVIS v1 Mask R-CNN R50-FPN 1x (repeat factor 0.001, 1203 classes, score 1e-4, 300 detections, federated LVIS AP).
# Usage: NPROC=8 bash scripts/finetune_lvis_mask_rcnn_R50_FPN_1x.sh INIT [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/lvis_mask_rcnn_R50_FPN_1x_soco.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
