#!/usr/bin/env bash
# Set up and run the checks CI runs: ruff, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
python -m pytest -q "$@"
