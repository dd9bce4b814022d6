#!/usr/bin/env bash
# (Re)deploy model b4 on a local TorchServe: set up, export, archive, start, register, verify.
#
# Usage: scripts/deploy.sh [--checkpoint PATH] [--version V] [--trust-checkpoint] [--force]
#   --checkpoint PATH    your checkpoint (env B4_CHECKPOINT); default: the DEMO checkpoint,
#                        built once (about a minute) and cached in $B4_CACHE_DIR/demo
#   --version V          model version (env B4_VERSION); default: the build's id (a hash of the
#                        checkpoint, every archive setting and the code), with -r<hash>
#                        when batch size, delay, response or client timeout differ from defaults
#   --trust-checkpoint   allow unpickling a whole pickled module (env B4_TRUST_CHECKPOINT=1)
#   --force              export and build again, served as a new version (<id>-f<UTC time>)
# What it does, in one line at the end: any change to the checkpoint or to a setting that changes
# the archive (B4_ARCH, B4_NUM_CLASSES, B4_CLASS_NAMES, B4_RUNTIME, ... see build_mar.sh --help)
# builds a new version and rolls it out; a change of batch size, delay, response or client
# timeout packs the same build as a new version (no export) and rolls it out; a change of
# workers scales the serving version in place; nothing changed: nothing is done.
# Runtime (env, see scripts/build_mar.sh --help): B4_RUNTIME (auto: the fastest runtime this
#   host runs that matches fp32 TorchScript, chosen at build; or a name to pin one),
#   B4_CHECK_IMAGES (your .npy images for that check). The choice is printed at the end.
# Registration (env; defaults in b4serve/ops/manage.py): B4_BATCH_SIZE (4),
#   B4_MAX_BATCH_DELAY (5 ms), B4_INITIAL_WORKERS (1), B4_RESPONSE_TIMEOUT (120 s);
#   B4_DRAIN_SECONDS (1 s: extra wait after an old version answered all it had taken);
#   B4_DEPLOY_TIMEOUT (600 s) bounds each wait.
#   When TorchServe will give workers GPUs (B4_GPUS; default: counted as TorchServe counts
#   them): batch size 64, 5 ms, B4_WORKERS_PER_GPU (2) workers on each GPU.
# Server (env, defaults in scripts/env.sh): B4_HOST, B4_INFERENCE_PORT (8080),
#   B4_MANAGEMENT_PORT (8081), B4_METRICS_PORT (8082), B4_V2_PORT (8083),
#   B4_GRPC_INFERENCE_PORT (7070), B4_GRPC_MANAGEMENT_PORT (7071), B4_RUN_DIR (.run),
#   B4_LOG_DIR, B4_MODEL_STORE (model-store),
#   B4_TMPDIR, B4_TOKEN_EXPIRATION_MIN, B4_TS_CONFIG, B4_LOG_CONFIG, B4_METRICS_CONFIG,
#   B4_PROTOCOL (raw, v1 or v2: what the smoke test sends; the server takes all three),
#   B4_V2_PLUGIN (auto: serve the v2 REST API on B4_V2_PORT (8083) when a JDK can build its
#   plugin; 1: required; 0: off), B4_PLUGINS_DIR, B4_ENVELOPE (empty; kserve or kservev2 starts
#   TorchServe's KServe envelope, as KServe's retired TorchServe runtime did, and registers
#   batch size 1: the envelopes answer one request per batch), VENV.
# Starts TorchServe if it is not running, under a supervisor that starts it again within seconds
# if it dies, with the versions it had (logs: $B4_LOG_DIR/supervisor.log); `torchserve --stop`
# stops both. Running it twice changes nothing; a new checkpoint is registered beside the old
# version, made the default once it answers, then the old one retired. Refuses to start when
# config.properties' memory cannot hold its worst case (python -m b4serve.ops.budget shows it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

parse_model_args "$@"
force=0
for other in "${others[@]}"; do
  case "$other" in
    --force) force=1 ;;
    *) die "unknown argument: $other (see --help)" ;;
  esac
done
case "$B4_PROTOCOL" in
  raw|v1|v2) ;; *) die "B4_PROTOCOL must be raw, v1 or v2: $B4_PROTOCOL" ;;
esac
case "$B4_ENVELOPE:$B4_PROTOCOL" in
  :*|kserve:v1|kservev2:v2) ;;
  kserve:*|kservev2:*) die "B4_ENVELOPE=$B4_ENVELOPE reads KServe JSON only: set B4_PROTOCOL=$(
    [ "$B4_ENVELOPE" = kserve ] && echo v1 || echo v2) for deploy's smoke test" ;;
  *) die "B4_ENVELOPE must be empty, kserve or kservev2: $B4_ENVELOPE" ;;
esac
case "$B4_V2_PLUGIN" in
  auto|0|1) ;; *) die "B4_V2_PLUGIN must be auto, 0 or 1: $B4_V2_PLUGIN" ;;
esac
timeout="${B4_DEPLOY_TIMEOUT:-600}"

step "environment ($VENV)" "$B4_ROOT/scripts/bootstrap.sh"
manage() { "$PY" -m b4serve.ops.manage --log-dir "$B4_LOG_DIR" --timeout "$timeout" "$@"; }

# Unset variables leave b4serve.ops.manage.Registration's defaults in force: one home for them.
register_args=()
[ -n "${B4_BATCH_SIZE:-}" ] && register_args+=(--batch-size "$B4_BATCH_SIZE")
if [ -n "$B4_ENVELOPE" ]; then  # TorchServe's envelopes answer only a batch's first request
  log "$B4_ENVELOPE envelope: batch size 1"
  register_args+=(--batch-size 1)
fi
[ -n "${B4_MAX_BATCH_DELAY:-}" ] && register_args+=(--max-batch-delay "$B4_MAX_BATCH_DELAY")
[ -n "${B4_INITIAL_WORKERS:-}" ] && register_args+=(--initial-workers "$B4_INITIAL_WORKERS")
[ -n "${B4_RESPONSE_TIMEOUT:-}" ] && register_args+=(--response-timeout "$B4_RESPONSE_TIMEOUT")
[ -n "${B4_CLIENT_TIMEOUT_MS:-}" ] && register_args+=(--client-timeout-ms "$B4_CLIENT_TIMEOUT_MS")
# GPUs the server gives workers, counted once as TorchServe counts them: registration, the
# budget and the build (a GPU host's archive serves TorchScript) all use this count.
B4_GPUS="${B4_GPUS:-$("$PY" -m b4serve.ops.gpus --ts-config "$B4_TS_CONFIG")}"
export B4_GPUS
register_args+=(--gpus "$B4_GPUS")
[ -n "${B4_WORKERS_PER_GPU:-}" ] && register_args+=(--workers-per-gpu "$B4_WORKERS_PER_GPU")
# The frontend's memory must hold its worst case with these workers and batches
# (config.properties): checked before anything is built or started.
budget_args=(--config "$B4_TS_CONFIG")  # unset: what rollout registers (its GPU defaults too)
[ -n "${B4_INITIAL_WORKERS:-}" ] && budget_args+=(--workers "$B4_INITIAL_WORKERS")
[ -n "${B4_BATCH_SIZE:-}" ] && budget_args+=(--batch-size "$B4_BATCH_SIZE")
[ -n "$B4_ENVELOPE" ] && budget_args+=(--batch-size 1)
budget_args+=(--gpus "$B4_GPUS")
[ -n "${B4_WORKERS_PER_GPU:-}" ] && budget_args+=(--workers-per-gpu "$B4_WORKERS_PER_GPU")
"$PY" -m b4serve.ops.budget "${budget_args[@]}" >/dev/null

if [ -z "$checkpoint" ]; then
  log "no --checkpoint given: using the DEMO checkpoint (synthetic classes, not a real model)"
  # a state dict: it loads without unpickling, so no --trust-checkpoint
  checkpoint=$(step "DEMO checkpoint (built once, then cached)" \
    "$PY" -m b4serve.lab.demo --cache-dir "$B4_CACHE_DIR/demo" --print-path)
fi
[ -f "$checkpoint" ] || die "checkpoint not found: $checkpoint"
# What is served: the build (checkpoint, archive settings, code) and its registration.
archive_id=$("$PY" -m b4serve.build.identity --checkpoint "$checkpoint" \
  --record-dir "$B4_CACHE_DIR/identity")
[ -n "$version" ] || version=$(manage version --archive-id "$archive_id" "${register_args[@]}")
[ "$force" = 1 ] && version="$version-f$(date -u +%Y%m%d%H%M%S)"

start_server() {
  # The v2 REST API: a TorchServe frontend plugin, built here when a JDK can (B4_V2_PLUGIN).
  if [ "$B4_V2_PLUGIN" = 1 ] || { [ "$B4_V2_PLUGIN" = auto ] \
      && "$B4_ROOT/scripts/build_plugin.sh" --check 2>/dev/null; }; then
    B4_TS_PLUGINS_PATH="$("$B4_ROOT/scripts/build_plugin.sh")"
    B4_V2_ADDRESS="http://$B4_HOST:$B4_V2_PORT"
    export B4_TS_PLUGINS_PATH B4_V2_ADDRESS
  elif [ "$B4_V2_PLUGIN" = auto ]; then
    log "v2 REST API off: $("$B4_ROOT/scripts/build_plugin.sh" --check 2>&1 || true)"
  fi
  # Not running, so no service manager runs it here (systemd's unit would have started it):
  # start it under the bare host's supervisor (b4serve/ops/supervise.py, README "Back by
  # itself"), which checks that the ports are free, quotes TorchServe's reason if it refuses to
  # start, and starts it again if it dies (with the models of TorchServe's snapshot).
  # `torchserve --stop` stops both. setsid inside: Ctrl-C on this script stops neither.
  local started=$SECONDS
  log "TorchServe start ..."
  "$PY" -m b4serve.ops.supervise start
  manage --timeout 120 wait-ping
  log "TorchServe start: done in $((SECONDS - started)) s"
}

if manage ping 2>/dev/null; then
  log "TorchServe is running on $B4_HOST:$B4_INFERENCE_PORT"
else
  start_server  # not under step: a function keeps set -e only outside a || list
fi

mar="$B4_MODEL_NAME-$version.mar"
if manage status --deployed "$version" >/dev/null 2>&1; then
  built=stored  # serving: the rollout proves it answers and scales its workers if asked
else
  if [ -f "$B4_MODEL_STORE/$mar" ]; then built=stored
  elif [ -f "$B4_CACHE_DIR/build/$archive_id/.complete" ] && [ "$force" = 0 ]; then built=packed
  else built=built; fi
  build_args=(--checkpoint "$checkpoint" --version "$version" --archive-id "$archive_id")
  [ "$trust" = 1 ] && build_args+=(--trust-checkpoint)
  [ "$force" = 1 ] && build_args+=(--force)
  mar=$("$B4_ROOT/scripts/build_mar.sh" "${build_args[@]}")
fi
step "registration (workers load and warm up) and rollout of $version" \
  manage rollout --mar "$mar" --version "$version" --drain "${B4_DRAIN_SECONDS:-1}" \
    --archive-id "$archive_id" --identity "$B4_CACHE_DIR/identity/$archive_id.json" \
    --records-dir "$B4_CACHE_DIR/deploys" --built "$built" "${register_args[@]}"

choice="$B4_CACHE_DIR/build/$version/extra"
cat <<DONE
$B4_MODEL_NAME $version is serving at http://$B4_HOST:$B4_INFERENCE_PORT/predictions/$B4_MODEL_NAME
$( [ -f "$choice/model_meta.json" ] && "$PY" -m b4serve.build.runtimes describe "$choice")
Try it (the key is re-read each time: keys expire and get renewed):
  curl -s http://$B4_HOST:$B4_INFERENCE_PORT/predictions/$B4_MODEL_NAME \\
    -H "Authorization: Bearer \$($PY -m b4serve.ops.keys inference --key-file $B4_KEY_FILE \\
      --management-url http://$B4_HOST:$B4_MANAGEMENT_PORT)" \\
    -H "Content-Type: application/octet-stream" --data-binary @image.npy
v2 REST API (same key; if the plugin is on): http://$B4_HOST:$B4_V2_PORT/v2/models/$B4_MODEL_NAME
Logs: $B4_LOG_DIR (ts_log.log, model_log.log, access_log.log)
Stop: $( [ -n "$B4_TMPDIR" ] && echo "TMPDIR=$B4_TMPDIR ")$VENV/bin/torchserve --stop
DONE
