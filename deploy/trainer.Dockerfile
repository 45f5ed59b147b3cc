# The CREST trainer image: PyTorch with the trainer client and the examples, run by torchrun (no Ray, faiss or
# numba). deploy/selector.Dockerfile is the selector's; both start the same way (deploy/python-base.sh), and
# their variants differ only in the base image and the faiss/torch builds (deploy/README.md has the commands).
#   docker build -f deploy/trainer.Dockerfile -t crest-trainer:0.1.0 .
# Build arguments:
#   PYTHON_IMAGE     the base: python:3.11 slim (default, CPU); NVIDIA's CUDA runtime image for GPU trainers; a
#                    local image where no registry is reachable (deploy/base-image.sh)
#   TORCH_INDEX_URL  a package index for torch (PyTorch's CPU wheel index for a small CPU image); empty: PyPI's
#                    build, which is CUDA's on Linux
#   REQUIRE_CUDA     non-empty (the GPU trainer of docker-compose.yml): fail the build unless the torch installed is a
#                    CUDA build; a CPU wheel left in deploy/wheels/ would otherwise win over PyPI's CUDA build
# Wheels put in deploy/wheels/ are preferred to any index (a local CPU torch wheel; the deploy tests put one there).
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
ARG TORCH_INDEX_URL=""
ARG REQUIRE_CUDA=""
# torch first, then the other dependencies, in a layer of their own: rebuilt when pyproject.toml changes rather
# than with every source change. (Pinned: hadolint misreads the optional index argument as a package.)
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --find-links /wheels torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && if [ -n "$REQUIRE_CUDA" ] && ! /opt/venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; \
       then echo "REQUIRE_CUDA: torch $(/opt/venv/bin/python -c 'import torch; print(torch.__version__)') is a CPU build (a CPU wheel in deploy/wheels/?)" >&2; exit 1; fi \
    && python requirements.py trainer > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --find-links /wheels -r /tmp/requirements.txt

FROM deps AS wheel
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
COPY proto ./proto
COPY selector_service ./selector_service
COPY trainer_client ./trainer_client
COPY benchmarks ./benchmarks
RUN /opt/venv/bin/pip wheel --no-deps --find-links /wheels -w /dist .

FROM base AS trainer
LABEL org.opencontainers.image.title="crest-trainer" \
      org.opencontainers.image.description="PyTorch DDP trainer with CREST coreset selection over gRPC"
ENV PATH=/opt/venv/bin:$PATH
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist /tmp/dist
# The project and a check that the image holds its side and not the other (from /tmp, away from the sources).
WORKDIR /tmp
RUN pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && python -c "import torch, trainer_client, crest.selector.v1" \
    && if python -c "import ray" 2>/dev/null; then echo "ray in the trainer image" >&2; exit 1; fi \
    && if python -c "import faiss" 2>/dev/null; then echo "faiss in the trainer image" >&2; exit 1; fi
COPY examples /app/examples
COPY deploy/entrypoint.sh /app/
WORKDIR /app
USER 10001:10001
# A batch job: its exit status is its health, and a probe must not restart a long run that is busy on the GPU.
HEALTHCHECK NONE
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["torchrun", "--nproc-per-node", "gpu", "examples/ddp_train.py", "--endpoint", "selector:50051"]
