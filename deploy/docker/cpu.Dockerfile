# syntax=docker/dockerfile:1
# npas-serve on CPU: two images from one file, built from the repository root.
#
#   docker build -f deploy/docker/cpu.Dockerfile --target torchserve -t npas-serve/torchserve:cpu .
#   docker build -f deploy/docker/cpu.Dockerfile --target embedded   -t npas-serve/embedded:cpu .
#
# Both serve model_store/npas.mar (build it first: `npas-serve archive runs/default`), which is
# baked in; mount another model store over /home/model-server/model_store to serve a different one.
# Both run as the unprivileged user model-server (uid 1000) and report healthy only when a
# prediction can be served (see healthcheck.py).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 NPAS_MODEL=npas NPAS_CACHE=/home/model-server/.cache/npas
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin model-server
# exactly this torch, from the CPU index: the PyPI wheel would pull CUDA libraries
RUN pip install --index-url ${TORCH_INDEX} "torch==2.13.0"
WORKDIR /opt/npas
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY npas_serve/ npas_serve/
RUN pip install . && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
COPY deploy/docker/healthcheck.py deploy/docker/torchserve_config.py /opt/npas/deploy/
COPY --chown=model-server:model-server model_store/ /home/model-server/model_store/
ENTRYPOINT ["tini", "-g", "--"]

# --- TorchServe (Java frontend) ----------------------------------------------------------------
FROM base AS torchserve
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*
USER model-server
WORKDIR /home/model-server/run
# config.properties and metrics.yaml come from npas_serve.servers.torchserve.launcher; token auth stays on,
# and TorchServe writes key_file.json here (the healthcheck reads the management key from it)
RUN python /opt/npas/deploy/torchserve_config.py /home/model-server/run /home/model-server/model_store \
 && mkdir -p logs
ENV LOG_LOCATION=/home/model-server/run/logs METRICS_LOCATION=/home/model-server/run/logs \
    TMPDIR=/home/model-server/run
# inference 8080, management 8081, metrics 8082, gRPC inference 7070, gRPC management 7071
EXPOSE 8080 8081 8082 7070 7071
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "/opt/npas/deploy/healthcheck.py", "torchserve", "/home/model-server/run"]
CMD ["sh", "-c", "exec torchserve --start --foreground --ncs --ts-config /home/model-server/run/config.properties --model-store /home/model-server/model_store --models ${NPAS_MODEL}=${NPAS_MODEL}.mar"]

# --- the embedded server (grpcio, no Java) -----------------------------------------------------
FROM base AS embedded
USER model-server
WORKDIR /home/model-server
# gRPC inference 7070, Prometheus /metrics 8082
EXPOSE 7070 8080 8082
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/npas/deploy/healthcheck.py", "embedded"]
CMD ["sh", "-c", "exec npas-serve serve /home/model-server/model_store/${NPAS_MODEL}.mar --name ${NPAS_MODEL} --host 0.0.0.0 --grpc-port 7070 --http-port 8080 --metrics-port 8082"]
