#!/usr/bin/env bash
# SoCo R50-FPN, 400 epochs (paper: COCO Mask R-CNN 1x AP^bb 43.0).
# Recipe (every hyperparameter): pretrain/configs/SoCo_FPN_400ep.yaml. Extra arguments go to train.py.
# Environment and usage: scripts/_pretrain_recipe.sh (run without DATA to see what it needs).
RECIPE=SoCo_FPN_400ep
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_recipe.sh" "$@"
