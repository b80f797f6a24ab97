# syntax=docker/dockerfile:1
#
# medgemma-deploy app image: the DICOM listener (C-STORE SCP → pipeline → C-STORE of the SR/SEG to
# the destination) and the classify/report/study command line. No GPU: inference goes to the shared
# worker with --backend grpc://worker:50051; CPU torch is included so that --backend local still
# works (MedSigLIP on a CPU is usable; MedGemma on a CPU is slow).
#
# Build from the repository root:
#   docker build -f deploy/docker/app.Dockerfile -t medgemma-deploy-app:0.1.0 .
# Run the listener:
#   docker run -p 11112:11112 -p 9401:9401 -v spool:/var/spool/medgemma medgemma-deploy-app:0.1.0 \
#     listen --ae-title MEDGEMMA --port 11112 --spool /var/spool/medgemma --pipeline classify \
#     --destination ORTHANC@pacs.example.org:4242 --backend grpc://worker:50051 --metrics-port 9401
#
# Base images are pinned by exact tag, the same in both stages (the venv needs the same Python).

# ---- build ------------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch (a few hundred MB instead of several GB of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY deploy/docker/constraints.txt /src/deploy/docker/constraints.txt
RUN pip install --no-cache-dir -c deploy/docker/constraints.txt --index-url "${TORCH_INDEX_URL}" "torch>=2.8,<3"

COPY pyproject.toml README.md /src/
COPY protos /src/protos
COPY medgemma_deploy /src/medgemma_deploy
COPY operators /src/operators
COPY apps /src/apps
RUN pip install --no-cache-dir -c deploy/docker/constraints.txt \
        "/src[compression,worker,network]" \
    && medgemma-deploy --help > /dev/null

# ---- runtime ----------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS runtime

RUN groupadd --system --gid 10001 medgemma \
    && useradd --system --uid 10001 --gid medgemma --create-home --home-dir /home/medgemma medgemma \
    && mkdir -p /var/spool/medgemma \
    && chown medgemma:medgemma /var/spool/medgemma

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/medgemma-deploy/healthcheck.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface

USER 10001:10001
WORKDIR /home/medgemma
# The spool holds received studies until they are processed and delivered: keep it on a volume so
# a restart resumes instead of losing them.
VOLUME ["/var/spool/medgemma"]

# 11112: DICOM (C-STORE SCP, C-ECHO); 9401: Prometheus metrics.
EXPOSE 11112 9401

HEALTHCHECK --interval=30s --timeout=6s --start-period=60s --retries=3 \
    CMD ["python", "/opt/medgemma-deploy/healthcheck.py", "--timeout", "5", "echo", "MEDGEMMA@127.0.0.1:11112"]

ENTRYPOINT ["medgemma-deploy"]
CMD ["listen", "--ae-title", "MEDGEMMA", "--port", "11112", "--spool", "/var/spool/medgemma", \
     "--pipeline", "classify", "--destination", "ORTHANC@orthanc:4242", \
     "--backend", "grpc://worker:50051", "--metrics-port", "9401"]
