#!/usr/bin/env bash
# The main job on the embedded default: set-up, then `dmsae run` (extra arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec dmsae run "$@"
