#!/usr/bin/env bash
# FCOS R50-FPN 1x on COCO; loads only the backbone part of the initialisation.
# Usage: NPROC=8 bash scripts/finetune_fcos_R50_FPN_1x.sh INIT [extra transfer/finetune.py flags]
#   NPROC (default 8) processes on this machine, total batch 16 at 2 images each (the LR and the
#   iteration counts scale linearly with another total batch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
INIT=${1:?usage: bash scripts/finetune_fcos_R50_FPN_1x.sh INIT [flags]   (INIT: detection-init file from transfer/convert.py, torchvision-supervised:PATH or scratch)}
shift
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" transfer/finetune.py \
  --config "transfer/configs/fcos_R50_FPN_1x_soco.yaml" --init "$INIT" "$@"
