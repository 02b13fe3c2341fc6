#!/usr/bin/env bash
# LVIS v1 Mask R-CNN R50-FPN 1x (repeat factor 0.001, 1203 classes, score 1e-4, 300 detections, federated LVIS AP).
# Usage: NPROC=8 bash scripts/finetune_lvis_mask_rcnn_R50_FPN_1x.sh INIT [extra transfer/finetune.py flags]
#   NPROC (default 8) processes on this machine, total batch 16 at 2 images each (the LR and the
#   iteration counts scale linearly with another total batch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
INIT=${1:?usage: bash scripts/finetune_lvis_mask_rcnn_R50_FPN_1x.sh INIT [flags]   (INIT: detection-init file from transfer/convert.py, torchvision-supervised:PATH or scratch)}
shift
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" transfer/finetune.py \
  --config "transfer/configs/lvis_mask_rcnn_R50_FPN_1x_soco.yaml" --init "$INIT" "$@"
