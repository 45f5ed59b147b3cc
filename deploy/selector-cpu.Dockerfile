# CREST selector, CPU: the gRPC frontend (`crest serve`) and the Ray head/worker nodes its actors run on.
#   docker build -f deploy/selector-cpu.Dockerfile -t crest-selector:0.1.0 .
# torch is a dependency of the package; PyPI's Linux wheel is the CUDA build (several GB). For a small image
# pass PyTorch's CPU wheel index: --build-arg TORCH_INDEX_URL=<index>.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch alone first: its own layer, rebuilt only when the pin changes. (Pinned: hadolint misreads the optional
# index argument as a package.)
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY selector_service ./selector_service
COPY trainer_client ./trainer_client
# The project itself (a local path, not a PyPI name) with its pinned extra.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]" \
    && python -c "import faiss, ray, selector_service, crest.selector.v1"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="crest-selector" \
      org.opencontainers.image.description="CREST selection service (CPU, faiss-cpu) and Ray nodes"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE
RUN groupadd --system --gid 10001 crest \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/crest crest \
    && install -d -o crest -g crest /var/lib/crest
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py deploy/entrypoint.sh /app/
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9090
# Tolerates the Ray join and actor start-up; the Ray nodes in compose override it with `ray health-check`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["crest", "serve", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/crest", "--metrics-port", "9090"]
