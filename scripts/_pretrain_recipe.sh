#!/usr/bin/env bash
# Shared launcher of the pretraining recipe scripts: `source`d by scripts/<RECIPE>.sh after it
# sets RECIPE. Runs torchrun over pretrain/train.py with pretrain/configs/$RECIPE.yaml.
# Environment: DATA, PROPOSALS (required), NPROC (processes per node, 8), OUTPUT (output folder),
# TORCHRUN_ARGS (extra torchrun flags, e.g. "--nnodes 2 --node_rank 0 --master_addr HOST").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${DATA:-}" || -z "${PROPOSALS:-}" ]]; then
  cat >&2 <<USAGE
error: no data given. This recipe ($RECIPE) needs:
  DATA       unlabeled image folder, e.g. ImageNet-1k train/ (class sub-folders are fine)
  PROPOSALS  selective-search proposal store (NAME.proposals/) made from exactly those images

Make the proposal store once (any number of processes/machines; see docs/selective_search.md):
  python selective_search/generate_proposals.py --image-root "\$DATA" --output data/train_ss.proposals --workers 16
  python selective_search/filter_proposals.py data/train_ss.proposals data/train.proposals --strategy ratio3size0308 --post
or import the original release's JSON (train_ratio3size0308post.json):
  python selective_search/json_format.py import train_ratio3size0308post.json data/train.proposals --image-root "\$DATA"

Then run (8 GPUs per node; auto-resumes from OUTPUT/current.pth):
  DATA=/path/to/imagenet/train PROPOSALS=data/train.proposals bash scripts/$RECIPE.sh [train.py flags]
USAGE
  exit 2
fi
# shellcheck disable=SC2086
exec torchrun ${TORCHRUN_ARGS:-} --nproc_per_node "${NPROC:-8}" "$ROOT/pretrain/train.py" \
  --config "$ROOT/pretrain/configs/$RECIPE.yaml" --data "$DATA" --proposals "$PROPOSALS" \
  --output-dir "${OUTPUT:-output/pretrain/$RECIPE}" "$@"
