#!/usr/bin/env bash
# Wheels the device machine lacks for bench/gpu_check.sh, fetched here (where PyPI answers) for
# the device's Python (3.12, manylinux x86_64) into an ignored folder, to carry to the device.
#
#   bash bench/gpu_wheels.sh                 # pydantic & co: every step needs them -> .whl/
#   bash bench/gpu_wheels.sh --ray           # + Ray (trimmed to fit a carry) and its deps
#   bash bench/gpu_wheels.sh --saelens       # + SAELens and what its import pulls in
#   options: --dest DIR (default .whl), --python-version 3.12
#
# The device image (its package list: /work/.library/device/KINDS.md in the workplace) has
# torch, transformers, tokenizers, safetensors, pyarrow, pandas, pyyaml and pytest, but not
# pydantic (dmsae_ray.config), Ray or SAELens, and it reaches no network. A call carries at
# most 64 MiB: the Ray 2.60 wheel alone is 79 MB, so --ray repacks it without what a local
# CPU/GPU cluster never loads (the Java jars, RLlib, Serve, ray.llm, the dashboard's web
# client): about 40 MB. The pinned versions are the ones this project is tested with.
# Unverified on the device until a lent machine runs it: gpu_check.sh's results list the
# packages it found, and a step whose import fails keeps the traceback in its log_tail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
PYVER=3.12
RAY=0
SAELENS=0
while (($#)); do
  case $1 in
    --dest) DEST=$2; shift ;;
    --python-version) PYVER=$2; shift ;;
    --ray) RAY=1 ;;
    --saelens) SAELENS=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

PKGS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
if ((RAY)); then
  PKGS+=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==0.30.0 jsonpointer==3.1.1 rfc3339-validator==0.1.4 colorful==0.5.8 dill==0.4.1
    tensorboardX==2.6.5)
fi
if ((SAELENS)); then
  PKGS+=(sae-lens==6.54.12 transformer-lens==3.9.0 datasets multiprocess dill==0.4.1 xxhash
    wandb simple-parsing docstring-parser better-abc beartype fancy-einsum typeguard
    transformers-stream-generator python-dotenv tenacity babe nltk plotly plotly-express)
fi
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
PIP=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER"
  --implementation cp "${PLATFORMS[@]}")
"${PIP[@]}" -d "$DEST" "${PKGS[@]}"

if ((RAY)); then
  RAW=$(mktemp -d)
  "${PIP[@]}" -d "$RAW" ray==2.60.0
  "$PY" - "$RAW"/ray-*.whl "$DEST" <<'EOF'
import sys
import zipfile
from pathlib import Path

# Never loaded by ray.init, Ray Data, Ray Train or Ray Tune on one machine.
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
out = dest / src.name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(DROP):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            keep = [ln for ln in data.decode().splitlines() if not ln.startswith(DROP)]
            data = ("\n".join(keep) + "\n").encode()
        zout.writestr(info, data)
print(f"{src.name}: {src.stat().st_size / 2**20:.0f} MiB -> {out.stat().st_size / 2**20:.0f} MiB")
EOF
  rm -rf "$RAW"
fi
du -ch "$DEST"/*.whl | tail -n 1 | sed "s|total|in $DEST (a call carries at most 64 MiB)|"
