# syntax=docker/dockerfile:1
#
# medgemma-deploy GPU worker: loads MedSigLIP and MedGemma once on one GPU and serves every app
# instance (listener, MAPs) over gRPC, with grpc.health.v1 and Prometheus metrics on :9400.
#
# Build from the repository root (the build context is the whole checkout, filtered by .dockerignore):
#   docker build -f deploy/docker/worker.Dockerfile -t medgemma-deploy-worker:0.1.0 .
# Run (models are mounted read-only, never baked into the image). On a non-loopback address the
# worker wants TLS (--tls-cert/--tls-key[/--client-ca]), or --allow-insecure on a trusted network:
#   docker run --gpus 1 -p 50051:50051 -p 9400:9400 -v /srv/models:/models:ro -v /srv/tls:/tls:ro \
#     medgemma-deploy-worker:0.1.0 --listen 0.0.0.0:50051 --medsiglip /models/medsiglip \
#     --medgemma /models/medgemma --metrics-port 9400 --tls-cert /tls/worker.crt \
#     --tls-key /tls/worker.key --client-ca /tls/ca.crt --require-all-models
#
# Base images are pinned by exact tag, the same in both stages (the venv needs the same Python).
# For a validated site build, also pin the digest, found with
#   docker buildx imagetools inspect nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# The torch wheels bring their own CUDA libraries: the host needs an NVIDIA driver recent enough for
# them (see docs/deployment.md), not a matching CUDA toolkit.

# ---- build: a virtual environment with torch (CUDA wheels) and the package ---------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first: this layer (torch and its CUDA libraries, several GB) is reused until the
# constraints change.
COPY deploy/docker/constraints.txt /src/deploy/docker/constraints.txt
RUN pip install --no-cache-dir -c deploy/docker/constraints.txt \
        "torch>=2.8,<3" "transformers>=5.17,<6" "grpcio>=1.63,<2" "grpcio-health-checking>=1.63,<2"

COPY pyproject.toml README.md /src/
COPY protos /src/protos
COPY medgemma_deploy /src/medgemma_deploy
COPY operators /src/operators
COPY apps /src/apps
RUN pip install --no-cache-dir -c deploy/docker/constraints.txt "/src[worker,compression]" \
    && medgemma-deploy --help > /dev/null

# ---- runtime: the same CUDA runtime, Python, the venv and nothing else ------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS runtime

ENV DEBIAN_FRONTEND=noninteractive

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.3-* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 medgemma \
    && useradd --system --uid 10001 --gid medgemma --create-home --home-dir /home/medgemma medgemma

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/medgemma-deploy/healthcheck.py

# Offline by design: the models come from the mounted /models, never from a hub at run time.
# MEDGEMMA_DEPLOY_DEVICE=cuda: a worker started without a GPU exits with a clear message
# instead of silently serving from the CPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MEDGEMMA_DEPLOY_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /home/medgemma

# 50051: gRPC (inference + grpc.health.v1); 9400: Prometheus metrics.
EXPOSE 50051 9400

# Loading MedGemma 27B from network storage can take minutes: unhealthy only after the start period.
HEALTHCHECK --interval=15s --timeout=6s --start-period=600s --retries=3 \
    CMD ["python", "/opt/medgemma-deploy/healthcheck.py", "--timeout", "5", "grpc", "127.0.0.1:50051"]

ENTRYPOINT ["medgemma-deploy", "worker"]
# --require-all-models: a missing or broken model folder stops the worker with a message naming it,
# instead of serving only the other model.
CMD ["--listen", "0.0.0.0:50051", "--medsiglip", "/models/medsiglip", "--medgemma", "/models/medgemma", \
     "--metrics-port", "9400", "--require-all-models"]
