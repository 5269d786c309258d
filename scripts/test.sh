#!/usr/bin/env bash
# The test command: set-up, lint, then the whole suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m pytest -q --durations=15 "$@"
