#!/usr/bin/env bash
# Idempotent install of dmsae-ray and its test tools into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
# Say what each step installs: on a fresh machine they take minutes and pip -q prints nothing.
echo "setup: torch 2.13.0 (CPU build)" >&2
"$PY" -m pip install -q "torch==2.13.0"
echo "setup: dmsae-ray and its dependencies (ray, transformers, fastapi, ...) + test tools" >&2
"$PY" -m pip install -q -e ".[dev]"
# Optional: SAELens lets the export test load our SAEs with SAELens itself (about a minute on a
# fresh machine; it keeps our CPU torch). Without it that test is skipped, nothing else changes.
# Naming torch again makes pip fail rather than swap in another torch build.
echo "setup: sae-lens (optional, for the SAELens loading test)" >&2
"$PY" -m pip install -q -e ".[saelens]" "torch==2.13.0" \
    || echo "warning: sae-lens did not install; the SAELens loading test will be skipped" >&2
echo "setup: done" >&2
