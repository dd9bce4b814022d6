#!/usr/bin/env bash
# The GPU check, one command on a GPU machine without network or Java: install the carried
# wheels, build the DEMO checkpoint and export it there (with GPU parity required), run the
# GPU tests, measure (b4serve/lab/gpu_bench.py), and write the markdown table into $OUT.
#
# Usage: scripts/gpu_check.sh [--wheels DIR]           on the GPU machine (about 4 minutes)
#        scripts/gpu_check.sh --prepare-wheels DIR     beforehand, where PyPI is reachable
#   --wheels DIR          the carried folder (env B4_GPU_WHEELS; default .cache/gpu-wheels)
#   --prepare-wheels DIR  fill DIR with what the GPU machine lacks, for Python 3.12 on x86-64
#                         Linux: geffnet, pytest (and its dependencies), PyYAML and psutil
#                         (TorchServe's worker imports them), and TorchServe's Python package
#                         without its Java frontend (42 MB that the check never starts);
#                         B4_GPU_WHEELS_PYTHON (3.12) picks another Python's wheels
# Env: OUT (where the results go; default $B4_GPU_CHECK_DIR/out), B4_GPU_CHECK_DIR (scratch:
#   installed wheels, checkpoint, export; default .cache/gpu-check), B4_GPU_DEVICE (cuda:0;
#   cpu runs a dry run here), B4_GPU_CHECK_PRECISIONS (fp32,fp16,bf16), B4_GPU_CHECK_SECONDS
#   (1.5: each timed row), B4_GPU_CHECK_WORKERS (1,2: worker processes on the GPU),
#   B4_GPU_CHECK_BATCH (64: the handler's batch), B4_GPU_CHECK_BUCKETS (the export's default),
#   B4_GPU_CHECK_DEMO_DIR (default: built in the scratch dir), PYTHON (python3: the machine's
#   interpreter and its torch; no virtual env is made there).
# Results in $OUT: gpu-check.md (its figures go into docs/GPU.md), gpu-check.json,
#   export.txt, gpu-tests.txt, install.txt. Exits 1 if a step or a check failed; the table
#   is still written.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

wheels="${B4_GPU_WHEELS:-$B4_ROOT/.cache/gpu-wheels}"
prepare=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --prepare-wheels) prepare="${2:?--prepare-wheels needs a folder}"; shift 2 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

prepare_wheels() {
  local dir="$1" download=("$PY" -m pip download --disable-pip-version-check -q)
  local version="${B4_GPU_WHEELS_PYTHON:-3.12}"
  local target=(--only-binary=:all: --python-version "$version" --implementation cp
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --abi "cp${version//./}" --abi abi3 --abi none)
  mkdir -p "$dir"
  "${download[@]}" --no-deps -d "$dir" "$(grep -E '^geffnet' "$B4_ROOT/requirements.txt")"
  "${download[@]}" "${target[@]}" -d "$dir" "pytest>=8" "pyyaml>=6.0" psutil
  local scratch
  scratch=$(mktemp -d)
  "${download[@]}" --no-deps -d "$scratch" "$(grep -E '^torchserve==' "$B4_ROOT/requirements.txt")"
  rm -rf "$dir/torchserve-worker"
  "$PY" - "$scratch"/torchserve-*.whl "$dir/torchserve-worker" <<'EXTRACT'
import sys, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.startswith("ts/") and not n.startswith("ts/frontend/")]
    archive.extractall(target, names)
print(f"extracted {len(names)} files of ts/ (all but the Java frontend) from {wheel}")
EXTRACT
  rm -rf "$scratch"
  log "prepared $dir ($(du -sh "$dir" | cut -f1)); carry it to the GPU machine"
  ls "$dir"
}

if [ -n "$prepare" ]; then
  prepare_wheels "$prepare"
  exit 0
fi

python="${PYTHON:-python3}"
device="${B4_GPU_DEVICE:-cuda:0}"
work="${B4_GPU_CHECK_DIR:-$B4_ROOT/.cache/gpu-check}"
out="${OUT:-$work/out}"
site="$work/site-packages"
mkdir -p "$work" "$out"
[ -d "$wheels" ] || die "no wheels folder $wheels: run scripts/gpu_check.sh --prepare-wheels $wheels where PyPI is reachable, and carry it along"
wheels=$(cd "$wheels" && pwd) out=$(cd "$out" && pwd)  # the tests run from the repository root
command -v "$python" >/dev/null || die "$python not found: set PYTHON to the interpreter with torch"
failed=()
started=$(date +%s)

log "installing the carried wheels from $wheels into $site"
rm -rf "$site"
{
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install --disable-pip-version-check --no-index --no-deps -q \
      --target "$site" "$wheels"/*.whl
  else  # a wheel is a zip laid out for site-packages: unpacking it installs it
    for wheel in "$wheels"/*.whl; do "$python" -m zipfile -e "$wheel" "$site"; done
  fi
} >"$out/install.txt" 2>&1 || { cat "$out/install.txt" >&2; die "installing $wheels failed"; }
export PYTHONPATH="$B4_ROOT:$site:$wheels/torchserve-worker"
"$python" - "$device" >>"$out/install.txt" 2>&1 <<'PROBE' || { cat "$out/install.txt" >&2; die "the environment is not ready (see above)"; }
import sys
import geffnet, numpy, pytest, torch, ts.service, yaml  # noqa: F401  everything the check imports
device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device visible to torch {torch.__version__}")
    print(f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
PROBE
cat "$out/install.txt" >&2

demo_dir="${B4_GPU_CHECK_DEMO_DIR:-$work/demo}"
log "building (or reusing) the DEMO checkpoint in $demo_dir"
checkpoint=$(timeout 300 "$python" -m b4serve.lab.demo --cache-dir "$demo_dir" --print-path)

build="$work/build"
rm -rf "$build"
export_args=(--checkpoint "$checkpoint" --trust-checkpoint --output "$build/model.pt")
[ "$device" = cpu ] || export_args+=(--gpu-parity require)  # refused unless fp16 holds parity
[ -n "${B4_GPU_CHECK_BUCKETS:-}" ] && export_args+=(--gpu-buckets "$B4_GPU_CHECK_BUCKETS")
export_model() { timeout 300 "$python" "$B4_ROOT/export_torchscript.py" "$@" 2>&1; }
log "exporting on this machine (its torch need not load a file saved by another version)"
if ! export_model "${export_args[@]}" | tee "$out/export.txt" >&2; then
  grep -q "the GPU model disagrees" "$out/export.txt" || die "export failed (see $out/export.txt)"
  failed+=("GPU parity at export")  # refused with the figures; measured all the same
  log "GPU parity refused the export (figures above); exporting without it to measure"
  export_model "${export_args[@]}" --gpu-parity off | tee -a "$out/export.txt" >&2
fi

log "running the GPU tests"
tests=(tests/serving/test_gpu_cuda.py tests/serving/test_gpu_path.py tests/build/test_gpu_parity.py
  tests/test_handler_out_of_memory.py)
(cd "$B4_ROOT" && timeout 300 "$python" -m pytest -p no:cacheprovider -q -rs "${tests[@]}") \
  >"$out/gpu-tests.txt" 2>&1 || failed+=("GPU tests")
tail -n 25 "$out/gpu-tests.txt" >&2

log "measuring on $device"
timeout 420 "$python" -m b4serve.lab.gpu_bench --model "$build/model.pt" --out "$out" \
  --device "$device" --precisions "${B4_GPU_CHECK_PRECISIONS:-fp32,fp16,bf16}" \
  --seconds "${B4_GPU_CHECK_SECONDS:-1.5}" --workers "${B4_GPU_CHECK_WORKERS:-1,2}" \
  --handler-batch "${B4_GPU_CHECK_BATCH:-64}" \
  --command "scripts/gpu_check.sh (B4_GPU_DEVICE=$device)" >&2 || failed+=("measurement checks")

if [ -f "$out/gpu-check.md" ]; then
  {
    echo
    echo "## GPU tests and export"
    echo
    echo "- GPU tests: $(grep -E '(passed|failed|error)' "$out/gpu-tests.txt" | tail -n 1)"
    echo "- export: $(grep -E '^GPU parity' "$out/export.txt" || echo 'no GPU parity line')"
    echo "- the whole check took $(( $(date +%s) - started )) s"
  } >>"$out/gpu-check.md"
fi
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: ${failed[*]}; results in $out"
  exit 1
fi
log "done in $(( $(date +%s) - started )) s; results in $out (its figures go into docs/GPU.md)"
