#!/usr/bin/env bash
# Shared launcher of the fine-tuning recipe scripts: `source`d by scripts/finetune_<recipe>.sh
# after it sets CONFIG (the recipe file); the script's first argument is INIT unless NO_INIT=1.
# INIT: a detection-init file from transfer/convert.py, torchvision-supervised:PATH, or scratch.
# Environment: NPROC (processes on this machine, default 8: total batch 16 at 2 images each; the
# LR and the iteration counts scale linearly with another total batch), TORCHRUN_ARGS (extra
# torchrun flags, e.g. "--nnodes 2 --node_rank 0 --master_addr HOST"), PYTHON (interpreter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -f "$CONFIG" ]]; then
  echo "error: recipe $CONFIG not found (check VARIANT / SCHEDULE)" >&2
  exit 2
fi
INIT_ARGS=()
if [[ "${NO_INIT:-0}" != 1 ]]; then
  if [[ $# -lt 1 || "$1" == --* ]]; then
    echo "usage: bash scripts/$(basename "$0") INIT [transfer/finetune.py flags]" >&2
    echo "  INIT: detection-init file from transfer/convert.py, torchvision-supervised:PATH or scratch" >&2
    exit 2
  fi
  INIT_ARGS=(--init "$1")
  shift
fi
# shellcheck disable=SC2086
exec "${PYTHON:-python}" -m torch.distributed.run ${TORCHRUN_ARGS:-} --nproc_per_node "${NPROC:-8}" \
  transfer/finetune.py --config "$CONFIG" "${INIT_ARGS[@]}" "$@"
