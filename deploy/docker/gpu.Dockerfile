# syntax=docker/dockerfile:1
# TorchServe with CUDA, built from the repository root:
#
#   docker build -f deploy/docker/gpu.Dockerfile -t npas-serve/torchserve:gpu .
#   docker run --gpus all -p 7070:7070 -p 8082:8082 npas-serve/torchserve:gpu
#
# The torch wheel from PyPI carries its own CUDA runtime libraries, so the base image only has
# to provide a userland the NVIDIA container toolkit can attach the host driver to; the driver
# must be new enough for that wheel's CUDA. TorchServe gives each worker a GPU (gpu_id) and the
# handler builds the engine on cuda:<gpu_id>. Same user, ports, config and healthcheck as the
# CPU image (cpu.Dockerfile).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NPAS_MODEL=npas NPAS_CACHE=/home/model-server/.cache/npas PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin model-server \
 && python3 -m venv /opt/venv
RUN pip install "torch==2.13.0"
WORKDIR /opt/npas
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY npas_serve/ npas_serve/
RUN pip install . && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
COPY deploy/docker/healthcheck.py deploy/docker/torchserve_config.py /opt/npas/deploy/
COPY --chown=model-server:model-server model_store/ /home/model-server/model_store/

USER model-server
WORKDIR /home/model-server/run
RUN python /opt/npas/deploy/torchserve_config.py /home/model-server/run /home/model-server/model_store \
 && mkdir -p logs
ENV LOG_LOCATION=/home/model-server/run/logs METRICS_LOCATION=/home/model-server/run/logs \
    TMPDIR=/home/model-server/run
EXPOSE 8080 8081 8082 7070 7071
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "/opt/npas/deploy/healthcheck.py", "torchserve", "/home/model-server/run"]
ENTRYPOINT ["tini", "-g", "--"]
CMD ["sh", "-c", "exec torchserve --start --foreground --ncs --ts-config /home/model-server/run/config.properties --model-store /home/model-server/model_store --models ${NPAS_MODEL}=${NPAS_MODEL}.mar"]
