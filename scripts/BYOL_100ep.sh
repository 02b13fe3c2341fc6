#!/usr/bin/env bash
# Image-level BYOL baseline with SoCo's optimisation recipe, R50, 100 epochs.
# Recipe (every hyperparameter): pretrain/configs/BYOL_100ep.yaml. Extra arguments go to train.py.
# Environment and usage: scripts/_pretrain_recipe.sh (run without DATA to see what it needs).
RECIPE=BYOL_100ep
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_recipe.sh" "$@"
