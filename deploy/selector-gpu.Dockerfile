# CREST selector, GPU: `crest serve` and Ray nodes whose selector actors run FAISS on the GPU (faiss-gpu; the
# engine moves its kNN index to the GPU when faiss.get_num_gpus() > 0).
#   docker build -f deploy/selector-gpu.Dockerfile -t crest-selector-gpu:0.1.0 .
# Python 3.11 from Ubuntu 22.04 on NVIDIA's CUDA runtime image; torch from PyPI is the CUDA build.
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
# The project itself (a local path, not a PyPI name) with the faiss-gpu extra (never together with [cpu]).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]" \
    && python -c "import faiss, ray, selector_service, crest.selector.v1"

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="crest-selector-gpu" \
      org.opencontainers.image.description="CREST selection service and Ray nodes with faiss-gpu"
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE
# Ubuntu's python3.11 without pinned versions: the CUDA base tag pins the distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 crest \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/crest crest \
    && install -d -o crest -g crest /var/lib/crest
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py deploy/entrypoint.sh /app/
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["crest", "serve", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/crest", "--metrics-port", "9090"]
