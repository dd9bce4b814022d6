#!/usr/bin/env bash
# Create or reuse the virtual env and install what is missing, in the order that works.
#
# Usage: scripts/bootstrap.sh [--dev] [--minimal]
#   --dev       also install the test tools (requirements-dev.txt, requirements-kserve-dev.txt)
#               and the Debian packages the tests run (requirements-debian.txt: real proxies,
#               servers and tools, installed with apt-get where missing)
#   --minimal   leave out the optional CPU runtimes (OpenVINO, ONNX Runtime, onnx: the end of
#               requirements.txt); --runtime auto then chooses between the TorchScript ones
#               (env B4_MINIMAL_INSTALL=1). Installed runtimes are not removed.
# Env: VENV (default .venv), PYTHON (interpreter to create it with, default python3),
#   B4_TORCH_BUILD (auto: the CPU build of torch where no NVIDIA GPU is present, from PyTorch's
#   CPU index (B4_TORCH_CPU_INDEX) when it answers within 5 s, else from pip's default index;
#   the default index's build where a GPU is, which on Linux x86-64 is the CUDA one; cpu; cuda).
# A second run installs nothing: a stamp in the venv records what was installed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

dev=0
minimal="${B4_MINIMAL_INSTALL:-0}"
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dev) dev=1 ;;
    --minimal) minimal=1 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

check_java() {
  local java="java"
  [ -n "${JAVA_HOME:-}" ] && java="$JAVA_HOME/bin/java"
  if ! command -v "$java" >/dev/null 2>&1; then
    die "Java not found: TorchServe's frontend needs Java 11 or newer (17 tested).
  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless
  macOS:         brew install openjdk@17
  or set JAVA_HOME to an installed JDK/JRE."
  fi
  local major
  major=$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$major" ] || [ "$major" -lt 11 ]; then
    die "Java ${major:-?} found at $(command -v "$java"); TorchServe needs Java 11+ (17 tested)."
  fi
}

# Debian packages the tests need (their binaries, never mocks), installed where missing.
install_debian_packages() {
  local wanted missing=()
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get: install the equivalents of requirements-debian.txt yourself"; return 0
  fi
  wanted=$(grep -vE '^\s*(#|$)' "$B4_ROOT/requirements-debian.txt" | awk '{print $1}')
  for package in $wanted; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  log "installing Debian packages: ${missing[*]}"
  { "${sudo[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null; } \
    || die "could not install ${missing[*]}: run as root: apt-get install -y ${missing[*]}"
}

# Where torch comes from: the CUDA build only where an NVIDIA GPU is, or pip would download
# several GB of CUDA libraries onto CPU hosts.
has_nvidia_gpu() {
  ls /dev/nvidia[0-9]* >/dev/null 2>&1 || { command -v nvidia-smi >/dev/null 2>&1 \
    && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
}
torch_index_args() {
  local build="${B4_TORCH_BUILD:-auto}"
  local index="${B4_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  case "$build" in
    auto) if has_nvidia_gpu; then build=cuda; else build=cpu; fi ;;
    cpu|cuda) ;;
    *) die "B4_TORCH_BUILD must be auto, cpu or cuda: $build" ;;
  esac
  if [ "$build" = cuda ]; then
    log "torch: the default index's build (CUDA on Linux x86-64)" ; return 0
  fi
  if curl -fsS -m 5 -o /dev/null "$index/torch/" 2>/dev/null; then
    log "torch: CPU build from $index"
    echo "--index-url=$index"
  else
    log "torch: $index did not answer within 5 s: from pip's default index instead (a CUDA" \
      "build of several GB on Linux x86-64, unless your pip serves a CPU one)"
  fi
}

check_java
[ "$dev" = 1 ] && install_debian_packages
requirements=("$B4_ROOT/requirements.txt")
[ "$dev" = 1 ] && requirements+=("$B4_ROOT/requirements-dev.txt")
# The requirement lines of one file; for the minimal install, requirements.txt without its
# closing section of optional runtimes.
requirement_lines() {
  if [ "$minimal" = 1 ] && [ "$1" = "$B4_ROOT/requirements.txt" ]; then
    sed '/^# The CPU runtimes that --runtime auto chooses from/,$d' "$1"
  else
    cat "$1"
  fi
}
# Installed with --no-deps (step 3): test-only SDKs whose dependencies would replace ours.
no_deps=()
[ "$dev" = 1 ] && no_deps+=("$B4_ROOT/requirements-kserve-dev.txt")
stamp="$VENV/.b4-installed-$(printf '%s\n' "${requirements[@]##*/}" | tr '\n' '+')"
wanted=$(for file in "${requirements[@]}" "${no_deps[@]}"; do requirement_lines "$file"; done \
  | sha256sum | cut -c1-16)
if [ -x "$PY" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  log "creating virtual env $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# 1. torch alone and pinned, or pip resolves a CUDA build (~5 GB) for the packages below.
started=$SECONDS
mapfile -t torch_args < <(torch_index_args)
pip_install "${torch_args[@]}" "$(grep -E '^torch==' "$B4_ROOT/requirements.txt")"
log "torch $("$PY" -W ignore -c 'import torch; print(torch.__version__)') ready ($((SECONDS - started)) s)"
# 2. everything else but geffnet (it declares torchvision, which would replace torch).
for file in "${requirements[@]}"; do
  requirement_lines "$file" | grep -vE '^(torch==|geffnet|#|-r|$)' | xargs -r "$PY" -m pip \
    install --disable-pip-version-check -q
done
# 3. geffnet without its declared deps: it never imports torchvision. Same for the test SDKs.
pip_install --no-deps "$(grep -E '^geffnet' "$B4_ROOT/requirements.txt")"
for file in "${no_deps[@]}"; do pip_install --no-deps -r "$file"; done
"$PY" -c "import torch, ts, model_archiver, geffnet, yaml, numpy, requests" \
  || die "installed packages do not import; see the pip output above"
echo "$wanted" > "$stamp"
log "environment ready in $VENV"
