#!/usr/bin/env bash
# FCOS R50-FPN 1x on COCO; loads only the backbone part of the initialisation.
# Usage: NPROC=8 bash scripts/finetune_fcos_R50_FPN_1x.sh INIT [extra transfer/finetune.py flags]
#   Environment: NPROC, TORCHRUN_ARGS, PYTHON (see scripts/_finetune_recipe.sh).
CONFIG="transfer/configs/fcos_R50_FPN_1x_soco.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_finetune_recipe.sh"
