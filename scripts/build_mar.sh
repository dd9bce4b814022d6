#!/usr/bin/env bash
# Export a checkpoint to TorchScript and package it as a model archive in the model store.
#
# Usage: scripts/build_mar.sh --checkpoint PATH [--version V] [--trust-checkpoint] [--force]
#   --checkpoint PATH    checkpoint to export (env B4_CHECKPOINT)
#   --version V          archive version (env B4_VERSION); default: the checkpoint's content hash
#   --trust-checkpoint   allow unpickling a whole pickled module (env B4_TRUST_CHECKPOINT=1)
#   --force              rebuild even if the model store already holds this version
# Env: B4_ARCH (default: told from a whole module; set it for a state dict, whose keys cannot
#   tell padding variants apart), B4_NUM_CLASSES (6), B4_CLASS_NAMES (names, or a .json/.txt
#   file; default: the checkpoint's), B4_MICRO_BATCH (images per forward; default 1 on CPU,
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
#   B4_MODEL_STORE, B4_CACHE_DIR, B4_MODEL_NAME, VENV.
# Prints the archive's file name (relative to B4_MODEL_STORE) on stdout.
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
[ -n "$checkpoint" ] || die "--checkpoint is required (see --help)"
[ -f "$checkpoint" ] || die "checkpoint not found: $checkpoint"
[ -n "$version" ] || version=$(sha256sum "$checkpoint" | cut -c1-12)
[[ "$version" =~ ^[A-Za-z0-9._-]+$ ]] || die "version may hold letters, digits, '.', '_', '-': $version"

mar="$B4_MODEL_NAME-$version.mar"
if [ -f "$B4_MODEL_STORE/$mar" ] && [ "$force" = 0 ]; then
  log "model store already holds $mar"
  echo "$mar"
  exit 0
fi

build="$B4_CACHE_DIR/build/$version"
rm -rf "$build"
mkdir -p "$build/extra/b4serve/serving" "$build/tmp" "$B4_MODEL_STORE"
export_args=(--checkpoint "$checkpoint" --num-classes "${B4_NUM_CLASSES:-6}"
  --output "$build/model.pt" --meta-dir "$build/extra")
[ -n "${B4_ARCH:-}" ] && export_args+=(--arch "$B4_ARCH")
[ -n "${B4_CLASS_NAMES:-}" ] && export_args+=(--class-names "$B4_CLASS_NAMES")
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
gpus="${B4_GPUS:-$("$PY" -m b4serve.ops.gpus --ts-config "$B4_TS_CONFIG")}"
export_args+=(--gpus "$gpus")
# A choice made for this checkpoint, settings, CPU kind and packages is reused (empty: re-time).
choice_cache="${B4_RUNTIME_CHOICE_CACHE-$B4_CACHE_DIR/runtime-choice}"
[ -n "$choice_cache" ] && export_args+=(--choice-cache "$choice_cache")
[ -n "${B4_OPENVINO_HINT:-}" ] && export_args+=(--openvino-hint "$B4_OPENVINO_HINT")
[ -n "${B4_OPENVINO_STREAMS:-}" ] && export_args+=(--openvino-streams "$B4_OPENVINO_STREAMS")
[ "$trust" = 1 ] && export_args+=(--trust-checkpoint)
log "exporting $checkpoint to TorchScript, runtime $runtime"
"$PY" "$B4_ROOT/export_torchscript.py" "${export_args[@]}" >&2
# model.pt always travels: the reference, and what a worker falls back to on a host that cannot
# run the chosen runtime. The export put the chosen runtime's own file (model.onnx) in extra/.

# The handler imports b4serve from the unpacked archive: the serving core's sources alone travel
# (never ops/ or lab/; tests/deploy/test_kserve_manifests.py reads the archive's file list).
cp "$B4_ROOT"/b4serve/__init__.py "$build/extra/b4serve/"
cp "$B4_ROOT"/b4serve/serving/*.py "$build/extra/b4serve/serving/"
# The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps builds apart.
TMPDIR="$build/tmp" "$VENV/bin/torch-model-archiver" --model-name "$B4_MODEL_NAME" \
  --version "$version" --serialized-file "$build/model.pt" --handler "${B4_HANDLER:-$B4_ROOT/handler.py}" \
  --extra-files "$build/extra" --export-path "$build" --force
# Appear in the store whole or not at all.
cp "$build/$B4_MODEL_NAME.mar" "$B4_MODEL_STORE/.$mar.partial"
mv "$B4_MODEL_STORE/.$mar.partial" "$B4_MODEL_STORE/$mar"
rm -rf "$build/tmp"
log "built $B4_MODEL_STORE/$mar"
echo "$mar"
