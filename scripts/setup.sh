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
# The web UI tests (tests/test_ui.py) drive headless Chromium with Selenium (installed above with
# the test tools). The browser and its driver are Debian/Ubuntu packages: installed with apt-get
# when this runs as root or with passwordless sudo; otherwise those tests are skipped, saying so.
if command -v chromedriver >/dev/null 2>&1 && { command -v chromium || command -v chromium-browser \
        || command -v google-chrome; } >/dev/null 2>&1; then
    echo "setup: a Chromium/Chrome and chromedriver are already installed" >&2
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "setup: chromium and chromium-driver (apt-get; headless browser for the UI tests)" >&2
        $SUDO apt-get update -qq >/dev/null \
            && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
            || echo "warning: chromium did not install; the web UI browser tests will be skipped" >&2
    else
        echo "warning: no root or sudo for apt-get install chromium chromium-driver;" \
            "the web UI browser tests will be skipped" >&2
    fi
else
    echo "warning: no apt-get: install chromium and chromedriver yourself for the web UI" \
        "browser tests (they are skipped without them)" >&2
fi
echo "setup: done" >&2
