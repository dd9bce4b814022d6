# Shared defaults for every script; each one can be overridden from the environment.
# Sourced, not run. The Python side (b4serve/ops/endpoints.py) reads the same B4_* names.
B4_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export B4_ROOT
: "${VENV:=$B4_ROOT/.venv}"
: "${B4_HOST:=127.0.0.1}"
: "${B4_INFERENCE_PORT:=8080}"
: "${B4_MANAGEMENT_PORT:=8081}"
: "${B4_METRICS_PORT:=8082}"
: "${B4_V2_PORT:=8083}"   # the v2 REST API (Open Inference Protocol) of the b4serve plugin
: "${B4_GRPC_INFERENCE_PORT:=7070}"          # TorchServe always starts its gRPC servers too
: "${B4_GRPC_MANAGEMENT_PORT:=7071}"
: "${B4_MODEL_NAME:=b4}"
: "${B4_RUN_DIR:=$B4_ROOT/.run}"            # TorchServe's working dir: key file, logs
: "${B4_KEY_FILE:=$B4_RUN_DIR/key_file.json}"
: "${B4_LOG_DIR:=$B4_RUN_DIR/logs}"
: "${B4_TMPDIR:=}"    # pid file, worker sockets; empty: system temp, so `torchserve --stop` works
: "${B4_MODEL_STORE:=$B4_ROOT/model-store}"
: "${B4_CACHE_DIR:=$B4_ROOT/.cache}"         # demo checkpoint, exported models
: "${B4_TS_CONFIG:=$B4_ROOT/config.properties}"
: "${B4_LOG_CONFIG:=$B4_ROOT/log4j.properties}"
: "${B4_METRICS_CONFIG:=$B4_ROOT/metrics.yaml}"  # metrics the Prometheus endpoint exports
: "${B4_TOKEN_EXPIRATION_MIN:=}"            # empty: config.properties' value
: "${B4_PROTOCOL:=raw}"   # what deploy's smoke test sends: raw .npy, or KServe v1 / v2 JSON
: "${B4_ENVELOPE:=}"       # empty: none; kserve or kservev2: TorchServe's envelope (legacy runtime)
: "${B4_V2_PLUGIN:=auto}"  # the /v2 REST plugin: auto (when a JDK can build it), 1 (required), 0
: "${B4_PLUGINS_DIR:=$B4_CACHE_DIR/plugins}"  # built frontend plugins (scripts/build_plugin.sh)
# The edge (scripts/edge.sh, HAProxy; docs/EDGE.md). Times in seconds.
: "${B4_EDGE_PORT:=8000}"
: "${B4_EDGE_BIND:=0.0.0.0}"                # the edge is for other machines
: "${B4_EDGE_DIR:=$B4_RUN_DIR/edge}"         # config, maps (credentials, keys), admin socket
: "${B4_EDGE_CERT:=}"                        # PEM certificate and key: TLS when both are given
: "${B4_EDGE_KEY:=}"
: "${B4_EDGE_REPLICAS:=}"   # file of replicas (docs/EDGE.md); empty: this host's server
: "${B4_EDGE_REQUEST_TIMEOUT_S:=15}"    # the whole request, body included, or 408
: "${B4_EDGE_CLIENT_TIMEOUT_S:=30}"     # a client that sends or reads nothing this long is cut
: "${B4_EDGE_IDLE_TIMEOUT_S:=30}"       # an idle keep-alive connection is closed
: "${B4_EDGE_RESPONSE_TIMEOUT_S:=130}"  # above TorchServe's default_response_timeout (120)
: "${B4_EDGE_QUEUE_TIMEOUT_S:=30}"      # a request waits this long at the edge for a free slot
: "${B4_EDGE_MAX_CONNECTIONS:=4096}"
: "${B4_EDGE_SERVER_MAX_CONNECTIONS:=64}"  # requests in flight per replica and API; more queue
: "${B4_EDGE_CHECK_INTERVAL_MS:=1000}"  # health checks of each replica
: "${B4_EDGE_RENEW_BEFORE_S:=600}"      # renew a replica's TorchServe key this long before expiry
: "${B4_EDGE_HAPROXY:=haproxy}"
export B4_EDGE_PORT B4_EDGE_BIND B4_EDGE_DIR B4_EDGE_CERT B4_EDGE_KEY B4_EDGE_REPLICAS \
  B4_EDGE_REQUEST_TIMEOUT_S B4_EDGE_CLIENT_TIMEOUT_S B4_EDGE_IDLE_TIMEOUT_S \
  B4_EDGE_RESPONSE_TIMEOUT_S B4_EDGE_QUEUE_TIMEOUT_S B4_EDGE_MAX_CONNECTIONS \
  B4_EDGE_SERVER_MAX_CONNECTIONS B4_EDGE_CHECK_INTERVAL_MS B4_EDGE_RENEW_BEFORE_S B4_EDGE_HAPROXY
export VENV B4_HOST B4_INFERENCE_PORT B4_MANAGEMENT_PORT B4_METRICS_PORT B4_V2_PORT B4_MODEL_NAME \
  B4_GRPC_INFERENCE_PORT B4_GRPC_MANAGEMENT_PORT \
  B4_RUN_DIR B4_KEY_FILE B4_LOG_DIR B4_TMPDIR B4_MODEL_STORE B4_CACHE_DIR B4_TS_CONFIG \
  B4_LOG_CONFIG B4_METRICS_CONFIG B4_TOKEN_EXPIRATION_MIN B4_PROTOCOL B4_ENVELOPE B4_V2_PLUGIN \
  B4_PLUGINS_DIR
PY="$VENV/bin/python"
# `$PY -m b4serve...` works from any directory. deploy.sh starts TorchServe without it, so that
# workers import b4serve from the archive they serve, never from this checkout.
export PYTHONPATH="$B4_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# Run one long step of a deploy, saying when it starts and how long it took (on stderr, so that
# a caller can still capture its stdout). A step that fails adds nothing: its own error stays
# the last line the user reads. Commands only: a shell function run here loses set -e.
step() {
  local what="$1" started=$SECONDS
  shift
  log "$what ..."
  "$@" || return $?
  log "$what: done in $((SECONDS - started)) s"
}

# Print a script's leading comment block (after the shebang) as its --help.
usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

# Flags shared by deploy.sh and build_mar.sh: sets checkpoint, version, trust (env defaults
# B4_CHECKPOINT, B4_VERSION, B4_TRUST_CHECKPOINT) and leaves any other argument in `others`.
parse_model_args() {
  checkpoint="${B4_CHECKPOINT:-}"
  version="${B4_VERSION:-}"
  trust="${B4_TRUST_CHECKPOINT:-0}"
  others=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --checkpoint) checkpoint="${2:?--checkpoint needs a path}"; shift 2 ;;
      --version) version="${2:?--version needs a value}"; shift 2 ;;
      --trust-checkpoint) trust=1; shift ;;
      *) others+=("$1"); shift ;;
    esac
  done
}
