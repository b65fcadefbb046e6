#!/usr/bin/env bash
# The prepared GPU run (an H100 or H200), in one go, inside BUDGET_S seconds (default 540), or
# until DEADLINE_EPOCH (seconds since 1970, set by bench/device/run.sh for the whole call):
#   1. resnet50: model-only fp16 ceiling (torch.compile) and the service end to end over HTTP with
#      JPEG uploads of three sizes (8 API processes, each with its own CUDA worker, which decodes
#      the JPEGs with nvjpeg: IMGCLS_DECODE=worker, the default) at two concurrencies;
#   2. the GPU tests (CUDA workers over HTTP, fp16 and nvjpeg accuracy guards, the hostile corpus
#      through nvjpeg, CUDA OOM batch splitting), then the soak's GPU memory check;
#   3. resnet18: model-only, and the service with ImageNet-size uploads; vgg16: model-only.
# Each step has its own time limit, cut to what is left of the budget; a step that cannot have
# 30 s is skipped and says so (the limits add up to more than the budget: where the first steps
# use all of theirs, vgg16 is the one skipped). A step stopped at its limit stops its servers.
# Results (JSON, PNG, logs) go to $OUT (default bench-results/gpu); with PACK=FILE.tgz the folder
# is packed into FILE after every step, so that a run cut short still hands back what it measured
# (the device tool returns at most 8 files). Exits non-zero if a step failed or was skipped.
#   OUT=bench-results/gpu bash bench/gpu.sh        (on the device: bash bench/device/run.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
PY=${PYTHON:-python3}
API_WORKERS=${API_WORKERS:-8}
CLIENTS=${CLIENT_PROCESSES:-8}
if [ -n "${DEADLINE_EPOCH:-}" ]; then
    END=$((SECONDS + DEADLINE_EPOCH - $(date +%s)))
else
    END=$((SECONDS + ${BUDGET_S:-540}))
fi
FAILED=0
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The service side runs fp16 eager: eight API processes compiling at once would spend the time
# budget on compilation. The model-only ceiling is measured compiled.
export IMGCLS_COMPILE=${IMGCLS_COMPILE:-0}

pack() {
    if [ -n "${PACK:-}" ]; then tar czf "$PACK.part" -C "$OUT" . && mv "$PACK.part" "$PACK"; fi
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left), logs to $OUT/NAME.log
step() {
    local name=$1 limit=$2 left=$((END - SECONDS))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, ${left} s left of the budget" | tee "$OUT/$name.log"
        FAILED=$((FAILED + 1))
        return
    fi
    echo "== $name (limit ${limit} s, $((END - SECONDS)) s left)"
    timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v "Warning\|warn(" \
        | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - ${T0:-0})) s in all"
    [ "$status" -eq 0 ] || FAILED=$((FAILED + 1))
    pack
}

# Fail fast: with --workers N, uvicorn restarts API processes that cannot import the app forever.
$PY -c "import app.main" || { echo "cannot import the app (missing packages?)"; exit 1; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
    nproc
    grep -m1 "model name" /proc/cpuinfo
} 2>&1 | tee "$OUT/machine.txt"
T0=$SECONDS

BENCH=($PY -m app.cli bench --device cuda:0 --servers imgcls --duration 6 --batch-sizes 64,128,256
       --model-seconds 3 --max-batch 64 --api-workers "$API_WORKERS" --client-processes "$CLIENTS"
       --out "$OUT")

step bench-resnet50 230 "${BENCH[@]}" --model resnet50 --image-sets small,imagenet,phone \
    --concurrency 64,256
step gpu-tests 150 $PY -m pytest tests/test_gpu.py -v -s -p no:cacheprovider -o addopts="" --timeout 120
IMGCLS_SOAK_REQUESTS=${IMGCLS_SOAK_REQUESTS:-4000} \
    step soak 90 $PY -m pytest tests/test_soak.py -v -s -p no:cacheprovider -o addopts=""
step bench-resnet18 100 "${BENCH[@]}" --model resnet18 --image-sets imagenet --concurrency 256
step bench-vgg16 70 "${BENCH[@]}" --model vgg16 --servers ""
echo "gpu.sh done after $((SECONDS - T0)) s, $FAILED step(s) failed or skipped; results in $OUT"
pack
[ "$FAILED" -eq 0 ]
