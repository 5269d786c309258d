#!/usr/bin/env bash
# GPU readiness: one prepared check of every CUDA path, about 5 minutes (at most --budget,
# 470 s) on one H200. Writes one results file (JSON, rewritten after every step) and a log.
#
#   bash bench/gpu_check.sh [--out FILE] [--cache DIR] [--wheels DIR] [--peak-tflops N]
#   bash bench/gpu_check.sh --dry-run --out /tmp/gpu_check.json      # CPU, smallest sizes
#
# Steps (each bounded by `timeout`, all by the --budget deadline):
#   tests          tests/test_gpu.py on cuda: fast path == dense reference (fp64, fp32, bf16
#                  autocast, frozen core, aux-k), SAETrainer steps with fused Adam and pinned
#                  copies vs the CPU, attribution on the tiny Gemma-2 vs the CPU (fp32, bf16)
#   sae_step       bench/sae_step.py: fast vs eager vs SAELens, d 2304, k 320, widths 16k/65k,
#                  batch 4096/16384, bf16 autocast, achieved TFLOP/s and fraction of --peak-tflops
#   sae_step_fp32  the same step in fp32 (what SAETrainer runs in a `dmsae run`: no autocast),
#                  width 65536, batch 4096, fast vs eager
#   activations    bench/activations.py: stop-after-layer tokens/s vs a full forward, bf16, a
#                  random Gemma-2 of gemma-2-2b's full shape at layer 12 (+ stories15M if cached)
#   run_config     `dmsae config` with the overrides of run_ray: the GPU run's config validates
#   run_ray        a whole `dmsae run` on Ray with ray.use_gpu=true (bf16 LM, NCCL, GPU actors):
#                  the embedded default (stories15M) when --cache holds it, else the tiny Gemma-2
#                  of tests/tiny.py (built here, no download); cycle 0 + 1 distillation cycle
#   run_gemma3     the same on configs/gemma3-270m.yaml once the study issue adds it, if
#                  DMSAE_CACHE holds its converted model (the device cannot fetch it);
#                  --dry-run validates that config with the GPU overrides
#
# --dry-run runs every step on the CPU at the smallest sizes (about a minute on 2 cores), with
# DMSAE_TEST_DEVICE=cpu so tests/test_gpu.py runs instead of skipping; run_ray becomes
# run_inprocess (the tiny Gemma-2, ray.enabled=false: a Ray cluster on 2 cores takes minutes),
# and run_config still validates the exact GPU run's config. tests/test_gpu_check.py runs it in
# CI so this script never rots.
#
# The device machine has no network and lacks some packages (see BENCHMARKS.md, "GPU"):
#   --cache DIR    DMSAE_CACHE holding stories15M-hf/ and its corpus (copy ~/.cache/dmsae_ray
#                  without the .tgz into an ignored folder, e.g. runs/gpu_cache, and carry it)
#   --wheels DIR   wheels to install first (default: .whl/ when it exists; not in --dry-run;
#                  bench/gpu_wheels.sh fetches them), into --site DIR (default
#                  /tmp/dmsae_gpu_site, kept on a warm machine, on PYTHONPATH whenever it exists)
#   --peak-tflops N, --peak-tflops-fp32 N   the device's peaks (default 989 and 67: H200 SXM)
#   --budget S     seconds for all steps (470); --keep: keep the work dir (run dirs, step logs)
#   --install-only install the wheels and stop: a first call carries the wheels, a second one
#                  (on the still-warm machine) carries the --cache, which cannot travel with Ray
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
COMMAND_LINE="$0 $*"

DRY=0
OUT_FILE=""
CACHE=""
WHEELS=""
SITE=/tmp/dmsae_gpu_site
PEAK=989      # H100/H200 SXM dense bf16 TFLOP/s (NVIDIA's figure, no structured sparsity)
PEAK_FP32=67  # H200 SXM fp32 without tensor cores (torch keeps TF32 off for matmuls)
BUDGET=470    # seconds for all steps: under 8 minutes with the set-up
KEEP=0
INSTALL_ONLY=0
usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT_FILE=$2; shift ;;
    --cache) CACHE=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --site) SITE=$2; shift ;;
    --peak-tflops) PEAK=$2; shift ;;
    --peak-tflops-fp32) PEAK_FP32=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --keep) KEEP=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ -z $OUT_FILE ]]; then
  # $OUT: the folder the device tool brings back; elsewhere an ignored folder of the repo.
  OUT_FILE=${OUT:-runs/gpu_check}/gpu_check_results.json
fi
mkdir -p "$(dirname "$OUT_FILE")"
OUT_FILE=$(cd "$(dirname "$OUT_FILE")" && pwd)/$(basename "$OUT_FILE")
STEPS_LOG=${OUT_FILE%.json}.steps.log  # every step's full output; stdout gets the tails
: >"$STEPS_LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if ((KEEP)); then echo "work dir kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# -- environment -------------------------------------------------------------------------------
CACHE=${CACHE:-${DMSAE_CACHE:-$HOME/.cache/dmsae_ray}}
[[ -d $CACHE ]] && CACHE=$(cd "$CACHE" && pwd)  # absolute: Ray workers start elsewhere
export DMSAE_CACHE=$CACHE
if ((!DRY)) && [[ -z $WHEELS && -d $REPO/.whl ]]; then WHEELS=$REPO/.whl; fi
if [[ -n $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  WHLS=("$WHEELS"/*.whl)
  echo "installing ${#WHLS[@]} wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
fi
if ((INSTALL_ONLY)); then
  DISTS=("$SITE"/*.dist-info)
  echo "installed into $SITE: ${#DISTS[@]} packages"
  exit 0
fi
if ((DRY)) && [[ -z $WHEELS ]]; then SITE=""; fi  # a dry run uses this machine's packages
PYPATH=$REPO  # this checkout's dmsae_ray, installed or not
if [[ -n $SITE && -d $SITE ]]; then PYPATH=$PYPATH:$SITE; fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
# Ray on a shared or small machine: no usage reporting, no token auth, no progress bars.
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export DMSAE_RAY_TMP=${DMSAE_RAY_TMP:-/tmp/ray_gpu_check}

MODE=gpu; ((DRY)) && MODE=dry-run
"$PY" bench/gpu_check_results.py init "$OUT_FILE" --mode "$MODE" --command-line "$COMMAND_LINE"
has_cuda() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }
has_module() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)"; }
record() {  # NAME STATUS SECONDS [options of gpu_check_results.py step]
  "$PY" bench/gpu_check_results.py step "$OUT_FILE" "$@"
}

if ((!DRY)) && ! has_cuda; then
  echo "no CUDA device: nothing to check (bash bench/gpu_check.sh --dry-run runs on the CPU)"
  for s in tests sae_step sae_step_fp32 activations run_config run_ray run_gemma3; do
    record "$s" skipped 0 --reason "no CUDA device on this machine"
  done
  "$PY" bench/gpu_check_results.py finish "$OUT_FILE" || true
  exit 2
fi

DEADLINE=$((SECONDS + BUDGET))
# run_step NAME CAP KIND DATA -- COMMAND...: at most CAP seconds and never past the deadline.
run_step() {
  local name=$1 cap=$2 kind=$3 data=$4
  shift 5
  local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc=0 status=passed
  local t=$((cap < left ? cap : left))
  if ((t < 10)); then
    record "$name" skipped 0 --reason "out of time: ${left} s of --budget ${BUDGET} left"
    return 0
  fi
  echo "== $name (at most ${t} s): $*"
  # timeout signals its whole process group: Ray's and pytest's children go with it.
  timeout --kill-after=15 "$t" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  { echo "===== $name (rc $rc): $*"; cat "$WORK/$name.log"; } >>"$STEPS_LOG"
  tail -n 12 "$WORK/$name.log" | cut -c1-300
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  local args=(--log "$WORK/$name.log")
  [[ $kind != - ]] && args+=(--kind "$kind" --data "$data")
  ((rc == 124 || rc == 137)) && args+=(--reason "killed after ${t} s")
  record "$name" "$status" $((SECONDS - t0)) "${args[@]}"
}

HAVE_EMBEDDED=0
if [[ -f $DMSAE_CACHE/stories15M-hf/config.json ]] \
  && compgen -G "$DMSAE_CACHE/stories15M-corpus-*.jsonl" >/dev/null; then
  HAVE_EMBEDDED=1
fi
echo "mode $MODE, DMSAE_CACHE=$DMSAE_CACHE (stories15M cached: $HAVE_EMBEDDED), results $OUT_FILE"

# -- 1. the GPU-marked tests ---------------------------------------------------------------------
TEST_DEVICE=cuda; ((DRY)) && TEST_DEVICE=cpu
run_step tests 150 tests "$WORK/tests.xml" -- env DMSAE_TEST_DEVICE=$TEST_DEVICE \
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$WORK/tests.xml"

# -- 2. the SAE step: fast vs eager vs SAELens, bf16 TFLOP/s -------------------------------------
if ((DRY)); then
  DEV=cpu
  SHAPE=(--d-in 64 --width 1024 --k 8 --batch 256 --steps 1 --warmup 1 --threads 1)
  SHAPE_FP32=("${SHAPE[@]}")
else
  DEV=cuda
  SHAPE=(--d-in 2304 --width 16384 65536 --k 320 --batch 4096 16384 --steps 3 --warmup 2)
  SHAPE_FP32=(--d-in 2304 --width 65536 --k 320 --batch 4096 --steps 3 --warmup 2)
fi
run_step sae_step 200 json "$WORK/sae_step.json" -- "$PY" bench/sae_step.py --device $DEV \
  --precision bf16 "${SHAPE[@]}" --impl fast eager saelens --repeats 1 --timeout 60 \
  --tflops --peak-tflops "$PEAK" --json "$WORK/sae_step.json"
run_step sae_step_fp32 60 json "$WORK/sae_step_fp32.json" -- "$PY" bench/sae_step.py \
  --device $DEV --precision fp32 "${SHAPE_FP32[@]}" --impl fast eager --repeats 1 --timeout 40 \
  --tflops --peak-tflops "$PEAK_FP32" --json "$WORK/sae_step_fp32.json"

# -- 3. activation tokens/s of the stop-after-layer path -----------------------------------------
STORIES=(--no-stories15m)
((HAVE_EMBEDDED)) && STORIES=()
if ((DRY)); then
  ACTS=(--device cpu --threads 1 --repeats 1 --batch 2 --seq 64 --gemma-hidden 144
    --gemma-vocab 1024 --gemma-seq 64 --gemma-batch 2)
else
  # gemma-2-2b's own shape (random weights: none can be fetched), 8 x 1024 tokens per forward.
  ACTS=(--device cuda --repeats 3 --batch 64 --seq 256 --gemma-hidden 2304 --gemma-vocab 256000
    --gemma-seq 1024 --gemma-batch 8)
fi
run_step activations 90 json "$WORK/activations.json" -- "$PY" bench/activations.py \
  "${ACTS[@]}" ${STORIES[@]+"${STORIES[@]}"} --json "$WORK/activations.json"

# -- 4. a whole `dmsae run` ----------------------------------------------------------------------
DMSAE=("$PY" -m dmsae_ray.cli)
TINY_SETS=()
if ((DRY)) || ((!HAVE_EMBEDDED)); then
  # The tiny Gemma-2 of the tests: the same code paths, built in a second, no download.
  "$PY" - "$WORK/tiny" >>"$STEPS_LOG" 2>&1 <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from tiny import build_tiny_model, write_corpus

root = Path(sys.argv[1])
build_tiny_model(root / "model", write_corpus(root / "corpus.jsonl"))
EOF
  TINY_SETS=(--set "model.name=$WORK/tiny/model" --set "data.dataset=$WORK/tiny/corpus.jsonl"
    --set model.layer=1 --set data.context_length=64 --set data.attribution_sequences=8
    --set data.eval_sequences=4 --set sae.width=256 --set sae.k=8 --set sae.dead_tokens=5000
    --set sae.threshold_start_step=5 --set sae.norm_batches=2 --set train.tokens_per_cycle=4096
    --set train.batch_size=256 --set train.lr=3e-3 --set train.warmup_steps=2
    --set train.log_every=8 --set attribution.batch_size=4)
fi
GPU_SETS=(--set ray.enabled=true --set ray.use_gpu=true --set ray.num_workers=1
  --set model.dtype=auto --set distill.cycles=1 --set "run_dir=$WORK/run_ray")
# shellcheck disable=SC2016  # sh -c gets "$@" and "$0" unexpanded on purpose
run_step run_config 30 config "$WORK/run_config.json" -- sh -c '"$@" > "$0"' \
  "$WORK/run_config.json" "${DMSAE[@]}" config ${TINY_SETS[@]+"${TINY_SETS[@]}"} "${GPU_SETS[@]}"
if ((DRY)); then
  # A local Ray cluster with Train workers and actors takes minutes on 2 cores: the dry run
  # runs the same pipeline in-process (run_config above validated the Ray/GPU config).
  run_step run_inprocess 120 run "$WORK/run_inprocess" -- "${DMSAE[@]}" run "${TINY_SETS[@]}" \
    --set ray.enabled=false --set distill.cycles=1 --set "run_dir=$WORK/run_inprocess"
elif ! has_module ray; then
  record run_ray skipped 0 --reason "ray is not installed here: carry its wheels (--wheels)"
else
  run_step run_ray 240 run "$WORK/run_ray" -- "${DMSAE[@]}" run \
    ${TINY_SETS[@]+"${TINY_SETS[@]}"} "${GPU_SETS[@]}"
fi

GEMMA3=""
for f in configs/gemma3-270m.yaml configs/gemma-3-270m.yaml; do
  [[ -f $f ]] && GEMMA3=$f && break
done
G3_SETS=(--set ray.use_gpu=true --set model.dtype=auto --set distill.cycles=1
  --set "run_dir=$WORK/run_gemma3")
if [[ -z $GEMMA3 ]]; then
  record run_gemma3 skipped 0 \
    --reason "configs/gemma3-270m.yaml does not exist yet (the study issue adds it)"
elif ((DRY)); then
  # shellcheck disable=SC2016
  run_step run_gemma3 30 config "$WORK/run_gemma3.json" -- sh -c '"$@" > "$0"' \
    "$WORK/run_gemma3.json" "${DMSAE[@]}" config --config "$GEMMA3" "${G3_SETS[@]}"
elif ! has_module ray; then
  record run_gemma3 skipped 0 --reason "ray is not installed here: carry its wheels (--wheels)"
elif [[ ! -f $DMSAE_CACHE/gemma-3-270m-hf/config.json ]] \
  || ! compgen -G "$DMSAE_CACHE/gemma3-corpus-*.jsonl" >/dev/null; then
  # Its converted model is 1.07 GB (fp32): no carry takes it, and the device cannot fetch it.
  record run_gemma3 skipped 0 --reason "gemma-3-270m-hf and its corpus are not in $DMSAE_CACHE"
else
  run_step run_gemma3 150 run "$WORK/run_gemma3" -- "${DMSAE[@]}" run --config "$GEMMA3" \
    "${G3_SETS[@]}"
fi

"$PY" bench/gpu_check_results.py finish "$OUT_FILE"
