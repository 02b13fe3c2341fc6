#!/usr/bin/env bash
# Tiny SoCo_FPN pretraining on CPU (pretrain/configs/tiny_cpu.yaml): a couple of minutes on 2 cores.
# Environment: DATA (default data/demo/imagenet/train), PROPOSALS (default
# data/demo/imagenet_train.proposals), OUTPUT (default output/pretrain/tiny_cpu), PYTHON (python).
# Extra arguments go to train.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA=${DATA:-data/demo/imagenet/train}
PROPOSALS=${PROPOSALS:-data/demo/imagenet_train.proposals}
if [[ ! -d "$DATA" || ! -d "$PROPOSALS" ]]; then
  cat >&2 <<USAGE
error: missing $( [[ -d "$DATA" ]] || printf 'DATA=%s ' "$DATA")$( [[ -d "$PROPOSALS" ]] || printf 'PROPOSALS=%s' "$PROPOSALS")
This recipe (tiny_cpu) needs an image folder and its selective-search proposal store. Make the
embedded demo set and its proposals (a few minutes on 2 cores):
  python -m demo.data --out data/demo
  python selective_search/generate_proposals.py --image-root data/demo/imagenet/train --output data/demo/imagenet_train_ss.proposals --workers 2
  python selective_search/filter_proposals.py data/demo/imagenet_train_ss.proposals data/demo/imagenet_train.proposals --strategy ratio3size0308 --post
Then:
  bash scripts/pretrain_tiny_cpu.sh
USAGE
  exit 2
fi
# One compute thread: the data workers need the other core, and oversubscribed OpenMP threads
# on small tensors are many times slower than one.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" "$ROOT/pretrain/train.py" --config "$ROOT/pretrain/configs/tiny_cpu.yaml" \
  --data "$DATA" --proposals "$PROPOSALS" --output-dir "${OUTPUT:-output/pretrain/tiny_cpu}" "$@"
