#!/usr/bin/env bash
# SoCo R50-C4, 400 epochs (paper: COCO Mask R-CNN C4 1x AP^bb 40.9).
# Recipe (every hyperparameter): pretrain/configs/SoCo_C4_400ep.yaml. Extra arguments go to train.py.
# Environment and usage: scripts/_pretrain_recipe.sh (run without DATA to see what it needs).
RECIPE=SoCo_C4_400ep
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_recipe.sh" "$@"
