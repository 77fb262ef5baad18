# syntax=docker/dockerfile:1
#
# GPU image of the Coupled Mamba sentiment service.
#
#   docker build -t cmamba-service .
#   docker run --gpus all -p 8000:8000 cmamba-service
#
# Three stages on the official PyTorch images (same torch, CUDA and Python in all):
#   kernels  (-devel, has nvcc): compiles causal-conv1d's CUDA kernels (the causal conv of every
#            model) and, with --build-arg MAMBA_SSM=1, mamba-ssm's (the scan of uncoupled
#            checkpoints only; the default checkpoint is coupled, so it is off by default);
#   build    (-devel): the project's own wheel;
#   runtime  (-runtime, no compiler): the pinned third-party dependencies in a layer of their
#            own (from pyproject.toml and constraints.txt only, so a source edit reuses it), then
#            the kernel wheels, then the project with --no-deps; runs `cmamba serve` as a
#            non-root user under tini.
# pip's downloads and builds are kept in BuildKit cache mounts, outside every layer.
# Every model the service uses ships inside the image: the checkpoint embedded in the repository
# (model/checkpoints/default) and the ASR, text-encoder and face-mesh models of the pinned
# registry packages. Nothing is downloaded at run time. docs/DEPLOY.md explains each setting.

ARG BASE_REPO=pytorch/pytorch
ARG TORCH_VERSION=2.13.0
ARG CUDA_FLAVOR=cuda12.6-cudnn9
# 1: also compile and install mamba-ssm's selective-scan kernels, which serve only checkpoints
# with uncoupled layers (state_coupling "none"); the coupled default cannot use them.
ARG MAMBA_SSM=0

# --------------------------------------------------------------------------------------------
FROM ${BASE_REPO}:${TORCH_VERSION}-${CUDA_FLAVOR}-devel AS kernels

ARG TORCH_VERSION
ARG MAMBA_SSM
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
# Compute capabilities to compile for: A100 (8.0) and H100 (9.0). Both packages also add their
# own fixed -gencode list (sm_75..sm_90 on CUDA 12.6), which covers these.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
# Parallel nvcc jobs; each takes several GB of memory.
ARG MAX_JOBS=4

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS}

WORKDIR /src
COPY docker/image_check.py docker/requirements-build.txt docker/
# Fail early, with a clear message, if the base image is not the torch/Python/CUDA assumed.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 docker/image_check.py base --torch "${TORCH_VERSION}" --python 3.11 --cuda \
    && python3 -m pip install -r docker/requirements-build.txt

# FORCE_BUILD makes both setup.py files compile here instead of fetching prebuilt wheels; no
# build isolation, so they compile against this image's torch. mamba-ssm only with MAMBA_SSM=1.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "${MAMBA_SSM}" = 1 ]; then mamba_ssm="mamba-ssm==${MAMBA_SSM_VERSION}"; \
    elif [ "${MAMBA_SSM}" = 0 ]; then mamba_ssm=""; \
    else echo "MAMBA_SSM must be 0 or 1, not '${MAMBA_SSM}'" >&2; exit 1; fi \
    && python3 -m pip wheel --no-deps --no-build-isolation --no-binary causal-conv1d,mamba-ssm \
        --wheel-dir /wheels "causal-conv1d==${CAUSAL_CONV1D_VERSION}" ${mamba_ssm:+"$mamba_ssm"}

# --------------------------------------------------------------------------------------------
FROM ${BASE_REPO}:${TORCH_VERSION}-${CUDA_FLAVOR}-devel AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY model model
COPY preprocessing preprocessing
COPY service service
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip wheel --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------------------------
FROM ${BASE_REPO}:${TORCH_VERSION}-${CUDA_FLAVOR}-runtime AS runtime

ARG TORCH_VERSION
ARG MAMBA_SSM
ARG APP_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CMAMBA_LOG_FORMAT=json

# tini reaps children and forwards SIGTERM so the service can drain; libGL and GLib are what
# OpenCV and MediaPipe load. Versions follow the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# 1. Third-party dependencies, around the image's own torch (and triton): their pins are dropped
# from the project's constraints and replaced by the exact installed versions, so pip can never
# swap them. Only pyproject.toml, constraints.txt and docker/ are mounted here: a source edit
# reuses this layer. Build files are bind-mounted, so none of them stays in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=pyproject.toml,target=/tmp/build/pyproject.toml \
    --mount=type=bind,source=constraints.txt,target=/tmp/build/constraints.txt \
    --mount=type=bind,source=docker,target=/tmp/build/docker \
    python3 /tmp/build/docker/image_check.py base --torch "${TORCH_VERSION}" --python 3.11 --cuda \
    && python3 /tmp/build/docker/image_check.py constraints /tmp/build/constraints.txt \
        > /tmp/constraints-image.txt \
    && python3 /tmp/build/docker/image_check.py requirements /tmp/build/pyproject.toml \
        > /tmp/requirements-project.txt \
    && python3 -m pip install -c /tmp/constraints-image.txt -r /tmp/requirements-project.txt \
    && rm /tmp/constraints-image.txt /tmp/requirements-project.txt

# 2. The kernel wheels, with --no-deps (mamba-ssm's other dependencies, tilelang and
# quack-kernels, serve Mamba-3 only), and the little they need at run time (einops).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=kernels,source=/wheels,target=/tmp/kernels \
    --mount=type=bind,source=docker/requirements-gpu.txt,target=/tmp/build/requirements-gpu.txt \
    python3 -m pip install --no-deps /tmp/kernels/*.whl \
    && python3 -m pip install -r /tmp/build/requirements-gpu.txt

# 3. The project last, with --no-deps: a source edit rebuilds only this layer. Then the checks:
# torch unchanged, every model on disk, the kernels import.
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker,target=/tmp/build/docker \
    python3 -m pip install --no-cache-dir --no-deps /tmp/wheels/coupled_mamba_service-*.whl \
    && if [ "${MAMBA_SSM}" = 1 ]; then check_scan="--mamba-ssm"; else check_scan=""; fi \
    && python3 /tmp/build/docker/image_check.py final --torch "${TORCH_VERSION}" --kernels \
        ${check_scan:+"$check_scan"}

RUN groupadd --gid "${APP_UID}" cmamba \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --shell /usr/sbin/nologin cmamba
USER ${APP_UID}:${APP_UID}
WORKDIR /home/cmamba

# The commit the image is built from, for cmamba_build_info (docker build --build-arg
# GIT_SHA=$(git rev-parse HEAD)); last, so a new commit rebuilds nothing above.
ARG GIT_SHA=""
ENV CMAMBA_GIT_SHA=${GIT_SHA}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cmamba", "serve", "--host", "0.0.0.0", "--port", "8000"]
