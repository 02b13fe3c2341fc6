#!/usr/bin/env bash
# Install the toolkit into a virtual environment (./.venv unless VENV is set) and run the tests.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/install.sh
exec "$VENV/bin/python" -m pytest -q "$@" tests
