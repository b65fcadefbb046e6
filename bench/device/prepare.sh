#!/usr/bin/env bash
# Prepare, on this (CPU) machine, everything the GPU run (bench/device/run.sh) needs on the
# device machine, whose Python 3.12 has torch, torchvision, numpy, Pillow and matplotlib but not
# the service's web stack (FastAPI, Starlette, pydantic, uvicorn, python-multipart, ...):
#   - .whl/      the wheels for Python 3.12 / manylinux x86-64 of the packages the app imports
#                that the device lacks or has at other versions, at the versions tested here
#                (this venv's, dependencies included: pip freeze is the constraint), with their
#                whole dependency closure as pip resolves it (an import that failed there once:
#                FastAPI 0.165 needs opentelemetry-api);
#   - .devdata/  a copy of ../shared/data (the CIFAR-10 ResNets, test sample and photos), which
#                does not travel with the working tree.
# Both folders are ignored by git; the device tool carries them (carry: [".whl", ".devdata"]).
# Then checks that the wheels install together for Python 3.12 and that every requirement of
# every carried wheel is met by the carried wheels or by the device's own packages.
#   bash bench/device/prepare.sh          (PYTHON=.venv/bin/python by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SHARED=${IMGCLS_SHARED_DATA:-../shared/data}
WHL=.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform linux_x86_64)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:)

# The packages the service imports, pinned to the versions installed here (tested by make test).
mapfile -t PINS < <($PY bench/device/packages.py pins)
echo "device wheels: resolving ${PINS[*]}"
rm -rf "$WHL" && mkdir -p "$WHL"
report=$(mktemp)
constraints=$(mktemp)
$PY -m pip freeze --exclude-editable --disable-pip-version-check | grep -v "^-e \|@ file:" > "$constraints"
$PY -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed \
    --target /tmp/imgcls-device-resolve "${TARGET[@]}" "${PLATFORMS[@]}" --report "$report" \
    -c "$constraints" "${PINS[@]}"
mapfile -t CLOSURE < <($PY bench/device/packages.py closure "$report")
rm -f "$report" "$constraints"
echo "device wheels: downloading ${#CLOSURE[@]}: ${CLOSURE[*]}"
$PY -m pip download --quiet --disable-pip-version-check --no-deps "${TARGET[@]}" \
    "${PLATFORMS[@]}" -d "$WHL" "${CLOSURE[@]}"
# captum (explanations) without its requirements: torch, numpy, matplotlib, tqdm are there.
$PY -m pip download --quiet --disable-pip-version-check --no-deps "${TARGET[@]}" \
    "${PLATFORMS[@]}" -d "$WHL" $($PY bench/device/packages.py alone)

# They install together for Python 3.12 (into a throwaway folder; nothing runs them here).
rm -rf /tmp/imgcls-device-site
$PY -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target \
    /tmp/imgcls-device-site "${TARGET[@]}" "${PLATFORMS[@]}" "$WHL"/*.whl
rm -rf /tmp/imgcls-device-site
$PY bench/device/packages.py check "$WHL"

rm -rf .devdata && mkdir -p .devdata
for part in cifar10-resnets cifar10-test-sample images compose-spec.json; do
    cp -rL "$SHARED/$part" .devdata/
done
du -sh "$WHL" .devdata
echo "prepared: run on the device with carry [\".whl\", \".devdata\"]: bash bench/device/run.sh"
