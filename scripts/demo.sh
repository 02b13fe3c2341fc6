#!/usr/bin/env bash
# Install the toolkit into ./.venv (if needed) and run the end-to-end demo on the embedded data.
#   bash scripts/demo.sh [--out demo_output] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/install.sh
exec "$VENV/bin/python" scripts/run_demo.py "$@"
