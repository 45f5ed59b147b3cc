# CREST trainer, GPU: PyTorch (CUDA build) with the trainer client and the examples, run by torchrun, one rank
# per GPU (NCCL). No faiss and no Ray: trainer_client imports neither.
#   docker build -f deploy/trainer-gpu.Dockerfile -t crest-trainer:0.1.0 .
# Fashion-MNIST is mounted at /usr/share/datasets/fashion-mnist (see docker-compose.yml).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY selector_service ./selector_service
COPY trainer_client ./trainer_client
# The project itself (a local path, not a PyPI name), without a faiss extra.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && python -c "import torch, trainer_client, crest.selector.v1"

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="crest-trainer" \
      org.opencontainers.image.description="PyTorch DDP trainer with CREST coreset selection over gRPC"
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 crest \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/crest crest
COPY --from=build /opt/venv /opt/venv
COPY examples /app/examples
COPY deploy/entrypoint.sh /app/
WORKDIR /app
USER 10001:10001
# A batch job: its exit status is its health, and a probe must not restart a long run that is busy on the GPU.
HEALTHCHECK NONE
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["torchrun", "--nproc-per-node", "gpu", "examples/ddp_train.py", "--endpoint", "selector:50051"]
