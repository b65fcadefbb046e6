#!/usr/bin/env bash
# The prepared GPU run (an H100 or similar), in one go, under 8 minutes:
#   1. resnet50: model-only fp16 ceiling (torch.compile) and the service end to end over HTTP with
#      JPEG uploads (8 API processes, each with its own CUDA worker, which decodes the JPEGs with
#      nvjpeg: IMGCLS_DECODE=worker, the default) at two concurrencies;
#   2. the GPU tests (CUDA workers over HTTP, fp16 and nvjpeg accuracy guards, CUDA OOM batch
#      splitting, and the soak's GPU memory check);
#   3. the same benchmark for resnet18 and vgg16.
# Results (JSON, PNG, logs) go to $OUT (default bench-results/gpu).
#   OUT=bench-results/gpu bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
PY=${PYTHON:-python3}
API_WORKERS=${API_WORKERS:-8}
CLIENTS=${CLIENT_PROCESSES:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The service side runs fp16 eager: eight API processes compiling at once would spend the time
# budget on compilation. The model-only ceiling is measured compiled.
export IMGCLS_COMPILE=${IMGCLS_COMPILE:-0}

# Fail fast: with --workers N, uvicorn restarts API processes that cannot import the app forever.
$PY -c "import app.main" || { echo "cannot import the app (missing packages?)"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/nvidia-smi.txt"

bench() {
    timeout 200 $PY -m app.cli bench --model "$1" --device cuda:0 --servers imgcls \
        --concurrency 64,256 --duration 6 --batch-sizes 64,128,256 --model-seconds 3 \
        --max-batch 64 --api-workers "$API_WORKERS" --client-processes "$CLIENTS" --out "$OUT" \
        2>&1 | grep -v "Warning\|warn(" | tee "$OUT/bench-$1.log"
}

bench resnet50
timeout 180 $PY -m pytest tests/test_gpu.py -q -s -p no:cacheprovider -o addopts="" 2>&1 | tail -40 | tee "$OUT/gpu-tests.log"
IMGCLS_SOAK_REQUESTS=${IMGCLS_SOAK_REQUESTS:-4000} timeout 150 $PY -m pytest tests/test_soak.py -q -s \
    -p no:cacheprovider -o addopts="" 2>&1 | tail -30 | tee "$OUT/soak.log"
bench resnet18
bench vgg16
echo "gpu.sh done; results in $OUT"
