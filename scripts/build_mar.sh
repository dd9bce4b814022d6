#!/usr/bin/env bash
# Export a checkpoint to TorchScript and package it as a model archive in the model store.
#
# Usage: scripts/build_mar.sh --checkpoint PATH [--version V] [--archive-id ID]
#                             [--trust-checkpoint] [--force]
#   --checkpoint PATH    checkpoint to export (env B4_CHECKPOINT)
#   --archive-id ID      the build's id (python -m b4serve.build.identity); default: computed
#   --version V          archive version (env B4_VERSION); default: the build's id
#   --trust-checkpoint   allow unpickling a whole pickled module (env B4_TRUST_CHECKPOINT=1)
#   --force              export again even if this build or version exists
# A build is keyed by its id: the checkpoint's bytes, every setting below and the code that
# builds and serves it (b4serve/build/identity.py). Another version of the same build (other
# registration settings) is packed from it in seconds, with no export.
# Env: B4_ARCH (default: told from a whole module; set it for a state dict, whose keys cannot
#   tell padding variants apart), B4_NUM_CLASSES (6), B4_CLASS_NAMES (names, or a .json/.txt
#   file; default: the checkpoint's), B4_INPUT_SIZE (pixels of the model's square input;
#   default: the arch's), B4_MICRO_BATCH (images per forward; default 1 on CPU,
#   the whole batch on GPU), B4_THREADS (intra-op threads per worker; default: one per core),
#   B4_MALLOC_KEEP_MB (512: freed memory each worker keeps for reuse; 0: glibc's default),
#   B4_OPTIMIZE (1; 0 serves the plain scripted model, a baseline), B4_ONEDNN_FUSION (1; 0
#   serves TorchScript without oneDNN Graph fusion on the CPU; scripts/bench.sh measures both),
#   B4_RUNTIME (auto: build the runtimes this host runs, check each against fp32 TorchScript,
#   keep the fastest, and record it all in the archive; or pin one of torchscript,
#   torchscript-bf16, openvino, onnxruntime: an error where this host cannot run it),
#   B4_CHECK_IMAGES (a directory of your .npy images for that check; default: demo examples
#   and varied probes), B4_REDUCED_TOLERANCE (0.02: how far a bf16 runtime's probabilities may
#   be from fp32 TorchScript's), B4_GPUS (GPUs the workers get; default: counted as TorchServe
#   counts them; with any, the archive serves TorchScript on them and nothing is timed),
#   B4_RUNTIME_CHOICE_CACHE ($B4_CACHE_DIR/runtime-choice: earlier choices by checkpoint,
#   settings, CPU model and flags, package versions; empty re-times), B4_OPENVINO_HINT (LATENCY or THROUGHPUT), B4_OPENVINO_STREAMS
#   (0: the hint's), B4_GPU_PRECISION (fp16: weights and inputs on a GPU worker; bf16 or
#   fp32), B4_GPU_PARITY (auto: the GPU model is checked against fp32 on the CPU when this
#   machine has a GPU, and the export refused if they disagree; require or off), B4_HANDLER
#   (handler.py; the bench builds its seed baseline with b4serve/lab/seed_handler.py),
#   B4_CLIENT_TIMEOUT_MS (60000: a request queued longer is dropped unanswered before its
#   forward; 0 keeps all), B4_MODEL_STORE, B4_CACHE_DIR, B4_MODEL_NAME, VENV.
# Prints the archive's file name (relative to B4_MODEL_STORE) on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

parse_model_args "$@"
force=0
archive_id=""
set -- "${others[@]}"
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1; shift ;;
    --archive-id) archive_id="${2:?--archive-id needs a value}"; shift 2 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -n "$checkpoint" ] || die "--checkpoint is required (see --help)"
[ -f "$checkpoint" ] || die "checkpoint not found: $checkpoint"
# GPUs the server gives workers (as TorchServe counts them): a GPU host's archive serves TorchScript.
B4_GPUS="${B4_GPUS:-$("$PY" -m b4serve.ops.gpus --ts-config "$B4_TS_CONFIG")}"
export B4_GPUS
[ -n "$archive_id" ] || archive_id=$("$PY" -m b4serve.build.identity --checkpoint "$checkpoint" \
  --record-dir "$B4_CACHE_DIR/identity")
[ -n "$version" ] || version="$archive_id"
[[ "$version" =~ ^[A-Za-z0-9._-]+$ ]] || die "version may hold letters, digits, '.', '_', '-': $version"

mar="$B4_MODEL_NAME-$version.mar"
if [ -f "$B4_MODEL_STORE/$mar" ] && [ "$force" = 0 ]; then
  log "model store already holds $mar"
  echo "$mar"
  exit 0
fi

build="$B4_CACHE_DIR/build/$archive_id"
# One export of a build at a time (two deploys on one host, replicas started together): the
# second waits, then finds the build complete.
mkdir -p "$B4_CACHE_DIR/build"
exec 9>"$B4_CACHE_DIR/build/.$archive_id.lock"
flock 9
if [ "$force" = 1 ] || [ ! -f "$build/.complete" ]; then
  rm -rf "$build"
  mkdir -p "$build/extra/b4serve/serving" "$B4_MODEL_STORE"
  export_args=(--checkpoint "$checkpoint" --num-classes "${B4_NUM_CLASSES:-6}"
    --output "$build/model.pt" --meta-dir "$build/extra")
  [ -n "${B4_ARCH:-}" ] && export_args+=(--arch "$B4_ARCH")
  [ -n "${B4_CLASS_NAMES:-}" ] && export_args+=(--class-names "$B4_CLASS_NAMES")
  [ -n "${B4_INPUT_SIZE:-}" ] && export_args+=(--input-size "$B4_INPUT_SIZE")
  [ -n "${B4_MICRO_BATCH:-}" ] && export_args+=(--micro-batch "$B4_MICRO_BATCH")
  [ -n "${B4_THREADS:-}" ] && export_args+=(--threads "$B4_THREADS")
  [ -n "${B4_MALLOC_KEEP_MB:-}" ] && export_args+=(--malloc-keep-mb "$B4_MALLOC_KEEP_MB")
  [ "${B4_OPTIMIZE:-1}" = 0 ] && export_args+=(--no-optimize)
  [ "${B4_ONEDNN_FUSION:-1}" = 0 ] && export_args+=(--no-onednn-fusion)
  [ -n "${B4_GPU_PRECISION:-}" ] && export_args+=(--gpu-precision "$B4_GPU_PRECISION")
  [ -n "${B4_GPU_PARITY:-}" ] && export_args+=(--gpu-parity "$B4_GPU_PARITY")
  runtime="${B4_RUNTIME:-auto}"
  case "$runtime" in
    auto|torchscript|torchscript-bf16|openvino|onnxruntime) ;;
    *) die "B4_RUNTIME must be auto, torchscript, torchscript-bf16, openvino or onnxruntime, not $runtime" ;;
  esac
  export_args+=(--runtime "$runtime")
  [ -n "${B4_CHECK_IMAGES:-}" ] && export_args+=(--check-images "$B4_CHECK_IMAGES")
  [ -n "${B4_REDUCED_TOLERANCE:-}" ] && export_args+=(--reduced-tolerance "$B4_REDUCED_TOLERANCE")
  # Workers that get GPUs run TorchScript on them: the choice times no CPU runtime for them.
  export_args+=(--gpus "$B4_GPUS")
  # A choice made for this checkpoint, settings, CPU kind and packages is reused (empty: re-time;
  # --force re-times too).
  choice_cache="${B4_RUNTIME_CHOICE_CACHE-$B4_CACHE_DIR/runtime-choice}"
  [ "$force" = 1 ] && choice_cache=""
  [ -n "$choice_cache" ] && export_args+=(--choice-cache "$choice_cache")
  [ -n "${B4_OPENVINO_HINT:-}" ] && export_args+=(--openvino-hint "$B4_OPENVINO_HINT")
  [ -n "${B4_OPENVINO_STREAMS:-}" ] && export_args+=(--openvino-streams "$B4_OPENVINO_STREAMS")
  [ "$trust" = 1 ] && export_args+=(--trust-checkpoint)
  step "export of $checkpoint (parity, runtime $runtime)" \
    "$PY" "$B4_ROOT/export_torchscript.py" "${export_args[@]}" >&2
  # model.pt always travels: the reference, and what a worker falls back to on a host that cannot
  # run the chosen runtime. The export put the chosen runtime's own file (model.onnx) in extra/.

  # The handler imports b4serve from the unpacked archive: the serving core's sources alone travel
  # (never ops/ or lab/; tests/deploy/test_kserve_manifests.py reads the archive's file list).
  cp "$B4_ROOT"/b4serve/__init__.py "$build/extra/b4serve/"
  cp "$B4_ROOT"/b4serve/serving/*.py "$build/extra/b4serve/serving/"
  touch "$build/.complete"
else
  log "build $archive_id already exported: packing it as version $version, no export"
fi

# The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps builds apart.
pack=$(mktemp -d "$build/pack.XXXXXX")
trap 'rm -rf "$pack"' EXIT
mkdir -p "$pack/tmp" "$B4_MODEL_STORE"
# TorchServe 0.12 reads clientTimeoutInMills (a request that waited longer in the queue is
# dropped before its forward) from the archive's model config only; its value is a
# registration setting (b4serve.ops.manage.Registration; B4_CLIENT_TIMEOUT_MS overrides it), so
# it is packed with each version, not exported with the build.
"$PY" -m b4serve.ops.manage model-config \
  ${B4_CLIENT_TIMEOUT_MS:+--client-timeout-ms "$B4_CLIENT_TIMEOUT_MS"} > "$pack/model-config.yaml"
step "archive $mar" env TMPDIR="$pack/tmp" "$VENV/bin/torch-model-archiver" \
  --model-name "$B4_MODEL_NAME" --version "$version" --serialized-file "$build/model.pt" \
  --handler "${B4_HANDLER:-$B4_ROOT/handler.py}" --extra-files "$build/extra" \
  --config-file "$pack/model-config.yaml" --export-path "$pack" --force
# Appear in the store whole or not at all.
cp "$pack/$B4_MODEL_NAME.mar" "$B4_MODEL_STORE/.$mar.partial"
mv "$B4_MODEL_STORE/.$mar.partial" "$B4_MODEL_STORE/$mar"
# Each version finds its build under its own name too (health, tests, the bench).
[ "$version" = "$archive_id" ] || ln -sfn "$archive_id" "$B4_CACHE_DIR/build/$version"
log "built $B4_MODEL_STORE/$mar"
echo "$mar"
