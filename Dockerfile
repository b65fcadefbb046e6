# syntax=docker/dockerfile:1
# imgcls image: a CUDA runtime base for GPU hosts (default) or a slim CPU-only image.
#   docker build -t imgcls .
#   docker build -t imgcls:cpu --build-arg VARIANT=cpu .
#   docker build --build-arg BAKE_MODELS="resnet50 vgg16" .   # weights baked in at build time
#   docker build -t imgcls:cpu-openvino --build-arg VARIANT=cpu --build-arg EXTRAS=openvino .
#     (pyproject's extras: openvino, for IMGCLS_CPU_RUNTIME=openvino)
ARG VARIANT=cuda

# ---- bases: the same OS and Python for building and running -------------------------------
# torch's default wheels bring their own CUDA 13 libraries (cuDNN, cuBLAS, ...) and torchvision
# its nvjpeg: the base only has to match their CUDA major (its NVIDIA_REQUIRE_CUDA makes the
# container toolkit refuse a driver too old for CUDA 13 at start, instead of torch quietly
# finding no GPU and the service serving on the CPU).
FROM nvidia/cuda:13.0.1-base-ubuntu24.04 AS base-cuda
# python3 (3.12) for the app; python3-dev, gcc and g++ for torch.compile (inductor's CPU kernels
# and Triton's launcher include Python.h: without it every compile fails and the models run
# eager); curl for the healthcheck.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ curl \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS base-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ curl \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtualenv with imgcls and its pinned dependencies ---------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY app ./app
# CPU-only images take torch's CPU wheels (a fraction of the size); CUDA images the default ones.
# ".[EXTRAS]" is this project (its dependencies pinned in pyproject.toml), not a PyPI package.
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1; \
    fi \
    && pip install ".${EXTRAS:+[$EXTRAS]}"

# ---- runtime --------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG BAKE_MODELS=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IMGCLS_WEIGHTS_DIR=/app/weights \
    HOST=0.0.0.0 \
    PORT=8000 \
    IMGCLS_GRPC_HOST=0.0.0.0
RUN groupadd --system --gid 10001 imgcls \
    && useradd --system --uid 10001 --gid imgcls --home-dir /app --create-home imgcls
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
RUN mkdir -p /app/weights && chown imgcls:imgcls /app/weights
USER 10001
# Weights come from a volume at /app/weights, or are baked in here (verified downloads).
RUN if [ -n "$BAKE_MODELS" ]; then imgcls weights pull --quiet $BAKE_MODELS; fi
VOLUME ["/app/weights"]
# HTTP (REST, /v2, the page) and gRPC (the Open Inference Protocol, IMGCLS_GRPC_PORT)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/readyz || exit 1"]
# uvicorn through `imgcls serve`: HOST, PORT and every IMGCLS_* setting come from the environment.
CMD ["imgcls", "serve"]
