#!/usr/bin/env bash
# SOLOv2 R50-FPN 1x on COCO (AdelaiDet SOLOv2_R50_1x, the DenseCL transfer row): mask AP and mask-box AP.
# Loads the backbone, and the FPN where the initialisation has one (SoCo FPN); the heads are new.
# Usage: NPROC=8 bash scripts/finetune_solov2_R50_1x.sh INIT [extra transfer/finetune.py flags]
#   INIT: supervised (torchvision-supervised:PATH), MoCo v2 / DenseCL / SoCo detection-init files
#   from transfer/convert.py, or scratch. Environment: NPROC, TORCHRUN_ARGS, PYTHON (see
#   scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/solov2_R50_1x.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
