#!/usr/bin/env bash
# Image-level BYOL baseline with SoCo's optimisation recipe, R50, 100 epochs.
# Recipe (every hyperparameter): pretrain/configs/BYOL_100ep.yaml. Extra arguments go to train.py.
# Environment: DATA, PROPOSALS (required), NPROC (processes per node, 8), OUTPUT (output folder),
# TORCHRUN_ARGS (extra torchrun flags, e.g. "--nnodes 2 --node_rank 0 --master_addr HOST").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${DATA:-}" ]]; then
  cat >&2 <<'USAGE'
error: no data given. This recipe (BYOL_100ep) needs:
  DATA       unlabeled image folder, e.g. ImageNet-1k train/ (no proposals needed)

Then run (8 GPUs per node; auto-resumes from OUTPUT/current.pth):
  DATA=/path/to/imagenet/train bash scripts/BYOL_100ep.sh [train.py flags]
USAGE
  exit 2
fi
# shellcheck disable=SC2086
exec torchrun ${TORCHRUN_ARGS:-} --nproc_per_node "${NPROC:-8}" "$ROOT/pretrain/train.py" \
  --config "$ROOT/pretrain/configs/BYOL_100ep.yaml" --data "$DATA" \
  --output-dir "${OUTPUT:-output/pretrain/BYOL_100ep}" "$@"
