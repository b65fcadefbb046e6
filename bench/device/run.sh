#!/usr/bin/env bash
# The GPU run on the device machine, prepared by bench/device/prepare.sh: with the device tool,
#   run(command="bash bench/device/run.sh", carry=[".whl", ".devdata"], timeout_s=590)
# Installs the carried wheels (the web stack the device's Python 3.12 lacks, and the versions
# tested here of the packages it has at other versions) into /tmp/site, first on PYTHONPATH;
# points the tests and benchmarks at the carried shared data, and runs bench/gpu.sh inside a
# budget (BUDGET_S, 555 s from the start) that leaves time to hand the results back. What comes
# back under $OUT: run.log and gpu-results.tgz (every JSON, PNG and log of the run, packed after
# each step).
# On a machine without Python 3.12 (a dry run on the CPU) the wheels are not installed and the
# local environment is used: PYTHON=.venv/bin/python OUT=/tmp/dry bash bench/device/run.sh
set -uo pipefail
# The whole call's budget, wheel installation included: 555 s of a 590 s command, the rest for a
# step's kill grace (10 s) and packing.
export DEADLINE_EPOCH=$(($(date +%s) + ${BUDGET_S:-555}))
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
    rm -rf bench-results/gpu  # a warm machine keeps ignored files: no earlier run's results
    OUT=bench-results/gpu PACK="$PACKED" bash bench/gpu.sh
    status=$?
    date -u
    exit $status
} 2>&1 | tee "$OUT/run.log"
