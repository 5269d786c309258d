#!/usr/bin/env bash
# Idempotent install of dmsae-ray and its test tools into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
# Optional: SAELens lets the export test load our SAEs with SAELens itself (about a minute on a
# fresh machine; it keeps our CPU torch). Without it that test is skipped, nothing else changes.
# Naming torch again makes pip fail rather than swap in another torch build.
"$PY" -m pip install -q -e ".[saelens]" "torch==2.13.0" \
    || echo "warning: sae-lens did not install; the SAELens loading test will be skipped" >&2
