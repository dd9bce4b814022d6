#!/usr/bin/env bash
# Create or reuse the virtual env and install what is missing, in the order that works.
#
# Usage: scripts/bootstrap.sh [--dev]
#   --dev   also install the test tools (requirements-dev.txt, requirements-kserve-dev.txt)
# Env: VENV (default .venv), PYTHON (interpreter to create it with, default python3).
# A second run installs nothing: a stamp in the venv records what was installed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

dev=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dev) dev=1 ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac

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

check_java
requirements=("$B4_ROOT/requirements.txt")
[ "$dev" = 1 ] && requirements+=("$B4_ROOT/requirements-dev.txt")
# The optional runtime's packages: for archives built with it, and for its tests.
if [ "$dev" = 1 ] || [ "${B4_RUNTIME:-torchscript}" = onnxruntime ]; then
  requirements+=("$B4_ROOT/requirements-onnxruntime.txt")
fi
# Installed with --no-deps (step 3): test-only SDKs whose dependencies would replace ours.
no_deps=()
[ "$dev" = 1 ] && no_deps+=("$B4_ROOT/requirements-kserve-dev.txt")
stamp="$VENV/.b4-installed-$(printf '%s\n' "${requirements[@]##*/}" | tr '\n' '+')"
wanted=$(cat "${requirements[@]}" "${no_deps[@]}" | sha256sum | cut -c1-16)
if [ -x "$PY" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  log "creating virtual env $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# 1. torch alone and pinned, or pip resolves a CUDA build (~5 GB) for the packages below.
pip_install "$(grep -E '^torch==' "$B4_ROOT/requirements.txt")"
# 2. everything else but geffnet (it declares torchvision, which would replace torch).
for file in "${requirements[@]}"; do
  grep -vE '^(torch==|geffnet|#|-r|$)' "$file" | xargs -r "$PY" -m pip install \
    --disable-pip-version-check -q
done
# 3. geffnet without its declared deps: it never imports torchvision. Same for the test SDKs.
pip_install --no-deps "$(grep -E '^geffnet' "$B4_ROOT/requirements.txt")"
for file in "${no_deps[@]}"; do pip_install --no-deps -r "$file"; done
"$PY" -c "import torch, ts, model_archiver, geffnet, yaml, numpy, requests" \
  || die "installed packages do not import; see the pip output above"
echo "$wanted" > "$stamp"
log "environment ready in $VENV"
