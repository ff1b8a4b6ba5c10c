# The one image of the UniToken platform: every pipeline component, the multi-node training
# runtime (k8s/base/training-runtime.yaml) and the MLflow server (k8s/base/mlflow.yaml) run it.
#   Build:  docker build -t ghcr.io/unitoken/unitoken:0.1.0 .
#   Check:  docker run --rm --read-only --tmpfs /tmp ghcr.io/unitoken/unitoken:0.1.0 unitoken model summary --recipe unitoken-7b
# Pinned like the local install (requirements.lock as constraints); on x86_64 Linux the PyPI
# torch==2.13.0 wheel is the CUDA build. DeepSpeed's FusedAdam is compiled here, in the devel
# stage, for Hopper (TORCH_CUDA_ARCH_LIST=9.0: torch's "9.0a" breaks DeepSpeed's parser), so
# training pods never JIT-compile and the root filesystem can stay read-only.

ARG CUDA_VERSION=12.8.1
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/unitoken
ENV PATH=/opt/unitoken/bin:$PATH
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY unitoken ./unitoken
COPY components ./components
COPY pipelines ./pipelines
# torch first (DeepSpeed's build imports it), then everything else in one pinned install.
RUN grep -E '^torch==' requirements.lock | sed 's/+cpu//' > /tmp/torch.txt && pip install -r /tmp/torch.txt
RUN sed 's/+cpu//' requirements.lock > /tmp/constraints.txt \
    && TORCH_CUDA_ARCH_LIST=9.0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_OPS=0 \
       pip install -c /tmp/constraints.txt ".[pipeline]" psycopg==3.3.9 psycopg-binary==3.3.9

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 unitoken && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin unitoken
COPY --from=build /opt/unitoken /opt/unitoken
ENV PATH=/opt/unitoken/bin:$PATH \
    HOME=/tmp \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT []
CMD ["unitoken", "--help"]
