# syntax=docker/dockerfile:1
# The serving image: `transfigure serve` on ONNX Runtime, without PyTorch or the training stack.
#   docker build -t transfigure .                          GPU (onnxruntime-gpu 1.31: CUDA 13 + cuDNN 9 from
#                                                          NVIDIA's PyPI wheels; the host needs driver >= 580)
#   docker build --build-arg VARIANT=gpu-cu12 -t transfigure:cu12 .   GPU on older drivers (onnxruntime-gpu 1.26:
#                                                          CUDA 12 + cuDNN 9; the host needs driver >= 525)
#   docker build --build-arg VARIANT=cpu -t transfigure:cpu .
#   docker build --build-arg MODEL_FILE=artifacts/cyclegan/AtoB.onnx -t transfigure:horse2zebra .   (baked in,
#                                                          with its companions, served as AtoB)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# gpu | gpu-cu12 | cpu: which lock file (requirements/serve-${VARIANT}.txt, hashed, made by `make lock`)
ARG VARIANT=gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/serve-${VARIANT}.txt requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/serve-${VARIANT}.txt
COPY pyproject.toml README.md ./
COPY models models
COPY pipeline pipeline
# The package itself, without its training dependencies (the lock above holds everything serving imports).
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/transfigure-*.whl

FROM ${PYTHON_IMAGE} AS runtime
# A model inside the build context to bake in, e.g. artifacts/cyclegan/AtoB.onnx; empty: mount one at run time.
ARG MODEL_FILE=""
# Its file name, which MODEL_URI names (the served name is its stem); trimming needs Dockerfile syntax >= 1.7.
ARG MODEL_FILE_NAME=${MODEL_FILE##*/}
RUN useradd --create-home --no-log-init --uid 10001 transfigure
COPY --from=build /opt/venv /opt/venv
# The model and every file named after it, names kept: the engine finds its int8 and tiling companions
# (AtoB.int8.onnx, AtoB.statistics.onnx, AtoB.tile.onnx) and external data (AtoB.onnx.data) beside it.
RUN --mount=type=bind,source=.,target=/context \
    mkdir -p /models \
    && if [ -n "${MODEL_FILE}" ]; then \
        for file in "/context/${MODEL_FILE%.onnx}".*; do cp "${file}" /models/; done; \
    fi
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    MODEL_URI=/models/${MODEL_FILE_NAME:-model.onnx} \
    TRANSFIGURE_HOST=0.0.0.0 \
    TRANSFIGURE_PORT=8000
USER 10001
WORKDIR /home/transfigure
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['TRANSFIGURE_PORT']}/healthz\", timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (graceful shutdown, then exit 0).
CMD ["transfigure", "serve"]
