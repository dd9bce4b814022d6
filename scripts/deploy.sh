#!/usr/bin/env bash
# (Re)deploy model b4 on a local TorchServe: set up, export, archive, start, register, verify.
#
# Usage: scripts/deploy.sh [--checkpoint PATH] [--version V] [--trust-checkpoint]
#   --checkpoint PATH    your checkpoint (env B4_CHECKPOINT); default: the DEMO checkpoint,
#                        built once (about a minute) and cached in $B4_CACHE_DIR/demo
#   --version V          model version (env B4_VERSION); default: the checkpoint's content hash
#   --trust-checkpoint   allow unpickling a whole pickled module (env B4_TRUST_CHECKPOINT=1)
# Registration (env; defaults in b4serve/ops/manage.py): B4_BATCH_SIZE (4), B4_MAX_BATCH_DELAY (5 ms),
#   B4_INITIAL_WORKERS (1), B4_RESPONSE_TIMEOUT (120 s); B4_DRAIN_SECONDS (1 s: extra wait
#   after an old version answered all it had taken); B4_DEPLOY_TIMEOUT (600 s) bounds each wait.
# Server (env, defaults in scripts/env.sh): B4_HOST, B4_INFERENCE_PORT (8080),
#   B4_MANAGEMENT_PORT (8081), B4_METRICS_PORT (8082), B4_GRPC_INFERENCE_PORT (7070),
#   B4_GRPC_MANAGEMENT_PORT (7071), B4_RUN_DIR (.run), B4_LOG_DIR, B4_MODEL_STORE (model-store),
#   B4_TMPDIR, B4_TOKEN_EXPIRATION_MIN, B4_TS_CONFIG, B4_LOG_CONFIG, B4_METRICS_CONFIG,
#   B4_PROTOCOL (raw: .npy bodies; v1 or v2: the server starts with TorchServe's KServe
#   envelope for that protocol, and the model is registered with batch size 1), VENV.
# Starts TorchServe if it is not running, under a supervisor that starts it again within seconds
# if it dies, with the versions it had (logs: $B4_LOG_DIR/supervisor.log); `torchserve --stop`
# stops both. Running it twice changes nothing; a new checkpoint is registered beside the old
# version, made the default once it answers, then the old one retired. Refuses to start when
# config.properties' memory cannot hold its worst case (python -m b4serve.ops.budget shows it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

parse_model_args "$@"
[ ${#others[@]} -eq 0 ] || die "unknown argument: ${others[0]} (see --help)"
timeout="${B4_DEPLOY_TIMEOUT:-600}"

"$B4_ROOT/scripts/bootstrap.sh"
manage() { "$PY" -m b4serve.ops.manage --log-dir "$B4_LOG_DIR" --timeout "$timeout" "$@"; }

if [ -z "$checkpoint" ]; then
  log "no --checkpoint given: using the DEMO checkpoint (synthetic classes, not a real model)"
  checkpoint=$("$PY" -m b4serve.lab.demo --cache-dir "$B4_CACHE_DIR/demo" --print-path)
  trust=1  # built on this machine by b4serve.lab.demo, in the seed's whole-module format
fi
[ -f "$checkpoint" ] || die "checkpoint not found: $checkpoint"
[ -n "$version" ] || version=$(sha256sum "$checkpoint" | cut -c1-12)
# The frontend's memory must hold its worst case with these workers and batches (config.properties).
budget_args=(--config "$B4_TS_CONFIG")
[ -n "${B4_INITIAL_WORKERS:-}" ] && budget_args+=(--workers "$B4_INITIAL_WORKERS")
[ -n "${B4_BATCH_SIZE:-}" ] && budget_args+=(--batch-size "$B4_BATCH_SIZE")
"$PY" -m b4serve.ops.budget "${budget_args[@]}" >/dev/null

start_server() {
  # Under its supervisor (b4serve/ops/supervise.py): checks that the ports are free, quotes
  # TorchServe's reason if it refuses to start, and starts it again if it dies (with the models
  # of TorchServe's snapshot). `torchserve --stop` stops both. setsid inside: Ctrl-C on this
  # script stops neither.
  "$PY" -m b4serve.ops.supervise start
  manage --timeout 120 wait-ping
}

if manage ping 2>/dev/null; then
  log "TorchServe is running on $B4_HOST:$B4_INFERENCE_PORT"
else
  start_server
fi

if manage status --deployed "$version" >/dev/null 2>&1; then
  log "$B4_MODEL_NAME $version is already deployed: nothing to build"
  manage rollout --mar "$B4_MODEL_NAME-$version.mar" --version "$version" \
    --drain "${B4_DRAIN_SECONDS:-1}"  # proves it answers, retires leftovers
else
  build_args=(--checkpoint "$checkpoint" --version "$version")
  [ "$trust" = 1 ] && build_args+=(--trust-checkpoint)
  mar=$("$B4_ROOT/scripts/build_mar.sh" "${build_args[@]}")
  # Unset variables leave b4serve.ops.manage.Registration's defaults in force: one home for them.
  register_args=()
  [ -n "${B4_BATCH_SIZE:-}" ] && register_args+=(--batch-size "$B4_BATCH_SIZE")
  [ -n "${B4_MAX_BATCH_DELAY:-}" ] && register_args+=(--max-batch-delay "$B4_MAX_BATCH_DELAY")
  [ -n "${B4_INITIAL_WORKERS:-}" ] && register_args+=(--initial-workers "$B4_INITIAL_WORKERS")
  [ -n "${B4_RESPONSE_TIMEOUT:-}" ] && register_args+=(--response-timeout "$B4_RESPONSE_TIMEOUT")
  manage rollout --mar "$mar" --version "$version" --drain "${B4_DRAIN_SECONDS:-1}" \
    "${register_args[@]}"
fi

cat <<DONE
$B4_MODEL_NAME $version is serving at http://$B4_HOST:$B4_INFERENCE_PORT/predictions/$B4_MODEL_NAME
Try it (the key is re-read each time: keys expire and get renewed):
  curl -s http://$B4_HOST:$B4_INFERENCE_PORT/predictions/$B4_MODEL_NAME \\
    -H "Authorization: Bearer \$($PY -m b4serve.ops.keys inference --key-file $B4_KEY_FILE \\
      --management-url http://$B4_HOST:$B4_MANAGEMENT_PORT)" \\
    -H "Content-Type: application/octet-stream" --data-binary @image.npy
Logs: $B4_LOG_DIR (ts_log.log, model_log.log, access_log.log)
Stop: $( [ -n "$B4_TMPDIR" ] && echo "TMPDIR=$B4_TMPDIR ")$VENV/bin/torchserve --stop
DONE
