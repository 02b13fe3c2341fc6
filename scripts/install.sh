#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install the toolkit into it.
#   bash scripts/install.sh            # venv in ./.venv
#   VENV=/path/to/venv bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.soco-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# torch first, pinned, so pip picks the local CUDA-enabled wheels that also run on CPU.
$PIP install torch==2.14.1 torchvision==0.29.1
$PIP install -e ".[test]"
# A plain opencv-python wheel (pulled in by some packages, e.g. lvis) would hide the contrib
# modules (cv2.ximgproc) that the OpenCV selective-search backends need: keep only the contrib build.
$PIP uninstall -y opencv-python opencv-python-headless >/dev/null 2>&1 || true
$PIP install --force-reinstall --no-deps opencv-contrib-python-headless
"$VENV/bin/python" -c "import cv2; assert hasattr(cv2, 'ximgproc'), 'cv2.ximgproc missing'"
touch "$STAMP"
