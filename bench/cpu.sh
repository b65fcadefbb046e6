#!/usr/bin/env bash
# The CPU table of docs/PERFORMANCE.md for one machine type, from one run (about 13 minutes on
# 2 cores): resnet50 model-only at fp32, bf16 and int8 (random weights) and OpenVINO beside it,
# then imgcls (default precision), imgcls with resnet50:int8, the naive baseline and LitServe over
# HTTP with ImageNet-size and phone-size uploads at 1, 4, 16 and 32 clients, 8 s measured per point.
#   bench/cpu.sh [OUT_DIR]      (run it on an otherwise idle machine; it records the load average)
# The servers' batch limit is the best model-only batch of the run for the default precision
# (the int8 server: int8's own best), or MAX_BATCH for both if set (run to run, that best moves
# between 8 and 32 on the same 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-bench-results}"
uptime
"$PY" -m app.cli bench --model resnet50 --device cpu --concurrency 1,4,16,32 \
  --duration 8 --warmup 2 --batch-sizes 1,8,16,32 --model-seconds 3 \
  --image-sets imagenet,phone --model-precisions fp32,bf16,int8 \
  --servers imgcls,imgcls-int8,naive,litserve ${MAX_BATCH:+--max-batch "$MAX_BATCH"} --out "$OUT"
uptime
