# syntax=docker/dockerfile:1.7
# dfserve: one image for both roles (DESIGN §1), chosen by the command:
#   docker run -p 8000:8000 dfserve                       # the API (default CMD)
#   docker run --gpus all dfserve dfserve worker          # a worker
# CPU PyTorch by default; a CUDA build for GPU workers:
#   docker build -t dfserve .                                          # CPU (default)
#   docker build -t dfserve:cu130 --build-arg TORCH_VARIANT=cu130 .    # NVIDIA GPUs
# TORCH_INDEX_URL may point at a mirror of the PyTorch wheel index instead.
# docker-compose.yml builds it and docs/deployment.md explains the whole topology.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
# Builds /opt/venv: torch from the PyTorch index (the variant's wheels), then the project
# (a regular, non-editable install that carries the bundled model, model/bundles/).
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# torch first and alone: its layer is the big one (CUDA wheels are GBs) and stays cached
# while the project's source changes. `==2.13.0` matches the local build 2.13.0+cpu/+cu130.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY clients ./clients
# `pip install .` keeps the torch above (the pin is already satisfied) and adds the rest;
# then the installed package (-I: not ./model) must carry a model bundle.
RUN pip install --no-cache-dir . \
    && python -I -c "from dfserve.model.bundle import find_bundles; import sys; b = find_bundles(); \
print('bundled models:', sorted(b)); sys.exit(0 if b else 'no model bundle in the package')"

# ---------------------------------------------------------------------------- runtime
# Only the venv (and the healthcheck script) are copied: no compiler, no pip cache, no source.
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="dfserve" \
      org.opencontainers.image.description="Inference service for diffusion-forcing video world models" \
      io.dfserve.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    DFSERVE_MODELS_DIR=/models

# A fixed, unprivileged uid/gid (10001) so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 dfserve \
    && useradd --system --uid 10001 --gid dfserve --create-home --home-dir /home/dfserve \
       --shell /usr/sbin/nologin dfserve \
    && mkdir -p /models \
    && chown dfserve:dfserve /models

COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/dfserve/healthcheck.py

USER 10001:10001
WORKDIR /home/dfserve
EXPOSE 8000

# api/serve: GET /healthz answers; worker: its heartbeat in Redis is fresh and the model is
# warmed up. The script finds the role from the running command (docker/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/dfserve/healthcheck.py"]

# exec form: dfserve is PID 1 (or docker-init's child) and gets SIGTERM directly; the worker
# hands its jobs back to the queue on SIGTERM.
STOPSIGNAL SIGTERM
CMD ["dfserve", "api", "--host", "0.0.0.0", "--port", "8000"]
