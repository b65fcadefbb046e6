#!/usr/bin/env bash
# The GPU run on the device machine, prepared by bench/device/prepare.sh: with the device tool,
#   run(command="bash bench/device/run.sh", carry=[".whl", ".devdata"], timeout_s=590)
# Installs the carried wheels (the web stack the device's Python 3.12 lacks) into /tmp/site,
# points the tests and benchmarks at the carried shared data, and runs bench/gpu.sh inside a
# budget that leaves time to hand the results back. What comes back under $OUT: run.log and
# gpu-results.tgz (every JSON, PNG and log of the run, packed after each step).
# On a machine without Python 3.12 (a dry run on the CPU) the wheels are not installed and the
# local environment is used: PYTHON=.venv/bin/python OUT=/tmp/dry bash bench/device/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-results/device}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
{
    date -u
    if $PYTHON -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' && [ -d .whl ]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "the carried wheels did not install"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed $(ls .whl | wc -l) carried wheels into /tmp/site"
    else
        echo "not Python 3.12 or no .whl: the carried wheels are not installed (dry run)"
    fi
    if [ -d .devdata ]; then
        export IMGCLS_SHARED_DATA=$PWD/.devdata IMGCLS_BENCH_IMAGES=$PWD/.devdata/images
    fi
    $PYTHON -c "import fastapi, uvicorn, pydantic, multipart, grpc, app.main; print('app imports: ok')" \
        || exit 1
    PACKED="$OUT/gpu-results.tgz"
    OUT=bench-results/gpu PACK="$PACKED" BUDGET_S=${BUDGET_S:-540} bash bench/gpu.sh
    date -u
} 2>&1 | tee "$OUT/run.log"
