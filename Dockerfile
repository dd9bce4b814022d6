# TorchServe 0.12 serving one b4 archive on the CPU, configured as scripts/deploy.sh does.
#
#   scripts/build_mar.sh --checkpoint model.pth        # prints b4-<version>.mar
#   docker build --build-arg MAR=b4-<version>.mar -t b4serve:<version> .
#   docker network create b4-metrics                   # only this container and Prometheus
#   docker run --rm --network b4-metrics -p 8080:8080 b4serve:<version>
#
# The archive is baked in: one image per model version, so a rollout is an image tag. Token
# authorization stays on (deploy/docker.md says how clients get a key); the management API only
# listens inside the container. The metrics API takes no token, so only Prometheus may reach
# it: it is neither exposed nor published, only reachable on a network that only Prometheus
# shares with the container. Under KServe, see deploy/kserve/ instead.
FROM python:3.11-slim-bookworm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# TorchServe's frontend is Java (17 tested). Debian's packages follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# Same three steps as scripts/bootstrap.sh, from the same pins in requirements.txt.
WORKDIR /opt/b4
COPY requirements.txt ./
# 1. torch alone, the CPU build: from PyPI, pip would pull a CUDA torch (~5 GB).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "$(grep -E '^torch==' requirements.txt)"
# 2. everything else but geffnet (it declares torchvision, which would replace torch).
RUN grep -vE '^(torch==|geffnet|#|-r|$)' requirements.txt \
        | xargs pip install --no-cache-dir
# 3. geffnet without its declared deps: it never imports torchvision. (Pinned in requirements.txt.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps "$(grep -E '^geffnet' requirements.txt)" \
    && python -c "import torch, ts, model_archiver, geffnet, yaml, numpy, requests"

# The v2 REST API plugin (plugins/v2, scripts/build_plugin.sh), compiled against the TorchServe
# just installed. The JDK goes again in the same step: the server needs only the JRE.
COPY scripts/env.sh scripts/build_plugin.sh ./scripts/
COPY plugins/ ./plugins/
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
    && VENV=/usr/local B4_PLUGINS_DIR=/opt/b4/plugins scripts/build_plugin.sh \
    && apt-get purge -y openjdk-17-jdk-headless && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* /opt/b4/plugins/.b4serve-v2.sha

# The server runs as an unprivileged user; it writes key_file.json and logs in its home.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin model-server

# Our server settings, logging and metrics, and b4serve for the health check's key handling. It is left
# off PYTHONPATH: the workers import the copy inside the archive, never this one.
COPY config.properties log4j.properties metrics.yaml ./
COPY b4serve/ ./b4serve/

# The archive, built beforehand by scripts/build_mar.sh into the model store.
ARG MAR
COPY model-store/${MAR} ./model-store/
# Register it at start with b4serve.ops.manage.Registration's batch settings (their one home), as
# deploy.sh does through the management API: TorchServe reads `load_models` and `models`.
RUN test -n "$MAR" || { echo "error: --build-arg MAR=b4-<version>.mar is required" >&2; exit 1; } \
    && python -c "import json, re, sys; \
from b4serve.ops.manage import Registration; \
mar = sys.argv[1]; name = re.fullmatch(r'b4-([A-Za-z0-9._-]+)[.]mar', mar); \
name or sys.exit('error: MAR must be b4-<version>.mar, as build_mar.sh names it: ' + mar); \
version = name.group(1); r = Registration(); \
entry = {'defaultVersion': True, 'marName': mar, 'minWorkers': r.initial_workers, \
'maxWorkers': r.initial_workers, 'batchSize': r.batch_size, \
'maxBatchDelay': r.max_batch_delay_ms, 'responseTimeout': r.response_timeout_s}; \
print('load_models=' + mar); print('models=' + json.dumps({'b4': {version: entry}}))" "$MAR" \
        >> config.properties

USER 1000
WORKDIR /home/model-server
# Inference and the v2 REST API (the plugin's listener) on every interface of the container;
# management on its loopback only (never published); metrics on the container's interfaces for
# Prometheus on the container's network (never published: it takes no token). Read by TorchServe
# and the plugin (enable_envvars_config=true) and by b4serve.ops.manage in the health check.
ENV TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    B4_V2_ADDRESS=http://0.0.0.0:8083 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
    B4_INFERENCE_PORT=8080 \
    B4_MANAGEMENT_PORT=8081 \
    B4_METRICS_PORT=8082 \
    B4_V2_PORT=8083 \
    TS_METRICS_CONFIG=/opt/b4/metrics.yaml \
    B4_KEY_FILE=/home/model-server/key_file.json \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs
EXPOSE 8080 8083

# scripts/health.sh's check: /ping answers and the default version has a READY worker.
# TorchServe 0.12 wants a token even on /ping: it reads the key file the server wrote and renews
# an expired key, as clients do.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["bash", "-c", "cd /opt/b4 && python -m b4serve.ops.health --log-dir \"$LOG_LOCATION\" > /dev/null"]

# --ncs: no snapshots; the image's config is the registration, every start the same.
CMD ["torchserve", "--foreground", "--ncs", "--ts-config", "/opt/b4/config.properties", "--model-store", "/opt/b4/model-store", "--log-config", "/opt/b4/log4j.properties", "--plugins-path", "/opt/b4/plugins"]
