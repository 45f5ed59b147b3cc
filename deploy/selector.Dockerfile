# The CREST selector image: `crest serve` and the Ray head/worker nodes its actors run on (ray, faiss, numba; no
# torch). deploy/trainer.Dockerfile is the trainer's; both start the same way (deploy/python-base.sh), and their
# variants differ only in the base image and the faiss/torch builds (deploy/README.md has the commands).
#   docker build -f deploy/selector.Dockerfile -t crest-selector:0.1.0 .
# Build arguments:
#   PYTHON_IMAGE  the base: python:3.11 slim (default); NVIDIA's CUDA runtime image for GPU selectors; a local
#                 image where no registry is reachable (deploy/base-image.sh)
#   FAISS_EXTRA   cpu (faiss-cpu, default) or gpu (faiss-gpu)
# Wheels put in deploy/wheels/ are preferred to any index (every wheel of an offline site, say).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/python-base.sh /tmp/
RUN sh /tmp/python-base.sh && rm /tmp/python-base.sh

# The build starts from the same base; the runtime stage copies only its virtual environment.
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md deploy/requirements.py ./
COPY deploy/wheels /wheels

FROM build AS deps
# pip's index settings, passed through: a package mirror (PIP_INDEX_URL), or none at all (PIP_NO_INDEX=1, with every
# wheel in deploy/wheels/).
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG FAISS_EXTRA=cpu
# The dependencies in a layer of their own, rebuilt when pyproject.toml changes rather than with every source change.
RUN python -m venv /opt/venv \
    && python requirements.py "selector,${FAISS_EXTRA}" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --find-links /wheels -r /tmp/requirements.txt

FROM deps AS wheel
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
COPY proto ./proto
COPY selector_service ./selector_service
COPY trainer_client ./trainer_client
COPY benchmarks ./benchmarks
RUN /opt/venv/bin/pip wheel --no-deps --find-links /wheels -w /dist .

FROM base AS selector
LABEL org.opencontainers.image.title="crest-selector" \
      org.opencontainers.image.description="CREST selection service (crest serve) and Ray nodes"
ENV PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/opt/numba-cache
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist /tmp/dist
# The project, a check that the image holds its side and not the other, and numba's cache filled with the
# selection kernels, so that a server or actor starts without compiling them. (From /tmp: in a folder holding the
# sources Python would import those, and numba would cache them under their path.)
WORKDIR /tmp
RUN pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && python -c "import faiss, ray, selector_service.server" \
    && if python -c "import torch" 2>/dev/null; then echo "torch in the selector image" >&2; exit 1; fi \
    && python -m selector_service.warmup \
    && chown -R 10001:10001 /opt/numba-cache \
    && install -d -o crest -g crest /var/lib/crest
COPY deploy/healthcheck.py deploy/entrypoint.sh /app/
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9090
# Tolerates the Ray join and actor start-up; the Ray nodes in compose override it with `ray health-check`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["crest", "serve", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/crest", "--metrics-port", "9090"]
