# syntax=docker/dockerfile:1
#
# Two images of the gateway, built from the same sources:
#   docker build --target cuda -t REGISTRY/llama-vision-gateway:0.1.0-cuda .
#       the gateway with the local GPU engine (CUDA build of PyTorch); needs the NVIDIA
#       container toolkit (or the GPU operator) on the host.
#   docker build --target cpu  -t REGISTRY/llama-vision-gateway:0.1.0-cpu .
#       the slim gateway alone: in front of upstream engines, or with the guards on CPU.
#
# Base images are pinned to exact version tags; to pin by content as well, pass the digest:
#   --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:<digest>
# Build stages hold the compilers; the final stages copy only the virtualenv, run as a non-root
# user and start `gateway serve`, bound to 0.0.0.0:8000 (GATEWAY_HOST, GATEWAY_PORT).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
# The torch release and where its wheels come from: the CPU build from PyTorch's CPU index for
# the slim image; the CUDA build (PyPI's default Linux wheel, which bundles the CUDA libraries)
# for the CUDA image. Use TORCH_CUDA_INDEX_URL to pick another CUDA variant.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX_URL=""

# ---------------------------------------------------------------------------------------------
# CPU build: a virtualenv at /opt/venv with the CPU build of torch and the gateway.
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY guards ./guards
COPY model ./model
RUN pip install .

# ---------------------------------------------------------------------------------------------
# CUDA build: the same on the CUDA base (its Python, so the venv runs unchanged in the final
# stage), with the CUDA build of torch.
FROM ${CUDA_IMAGE} AS cuda-build
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN if [ -n "${TORCH_CUDA_INDEX_URL}" ]; then \
        pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY guards ./guards
COPY model ./model
# With Code Shield (the optional extra: Meta's codeshield + semgrep-core, ~130 MB).
RUN pip install ".[codeshield]"

# ---------------------------------------------------------------------------------------------
# The slim CPU image: no compilers, non-root, `gateway serve`.
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="llama-vision-gateway (CPU)" \
      org.opencontainers.image.description="Safety-guarded OpenAI-compatible gateway for Llama 3.2-Vision, without the GPU engine" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/gateway --create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/llama-gateway \
    && chown 10001:10001 /var/lib/llama-gateway
COPY --from=cpu-build /opt/venv /opt/venv
COPY policies /app/policies
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gateway \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_DEVICE=cpu \
    GATEWAY_STATE_DIR=/var/lib/llama-gateway \
    GATEWAY_POLICY_DIR=/app/policies
WORKDIR /home/gateway
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["gateway", "serve"]

# ---------------------------------------------------------------------------------------------
# The CUDA image: the GPU engine. No compilers; the NVIDIA runtime mounts the driver.
FROM ${CUDA_IMAGE} AS cuda
LABEL org.opencontainers.image.title="llama-vision-gateway (CUDA)" \
      org.opencontainers.image.description="Safety-guarded OpenAI-compatible gateway for Llama 3.2-Vision with the local GPU engine" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/gateway --create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/llama-gateway \
    && chown 10001:10001 /var/lib/llama-gateway
COPY --from=cuda-build /opt/venv /opt/venv
COPY policies /app/policies
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gateway \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_DEVICE=cuda \
    GATEWAY_STATE_DIR=/var/lib/llama-gateway \
    GATEWAY_POLICY_DIR=/app/policies
WORKDIR /home/gateway
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["gateway", "serve"]
