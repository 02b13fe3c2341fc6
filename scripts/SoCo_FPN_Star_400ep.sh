#!/usr/bin/env bash
# SoCo* R50-FPN, 400 epochs, views 224/224/192/112 (paper: COCO AP^bb 43.2, LVIS AP^bb 26.3).
# Recipe (every hyperparameter): pretrain/configs/SoCo_FPN_Star_400ep.yaml. Extra arguments go to train.py.
# Environment and usage: scripts/_pretrain_recipe.sh (run without DATA to see what it needs).
RECIPE=SoCo_FPN_Star_400ep
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_recipe.sh" "$@"
