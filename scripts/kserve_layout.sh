#!/usr/bin/env bash
# Lay out a built archive the way our KServe runtime (deploy/kserve/servingruntime.yaml) reads it
# under the InferenceService's storageUri.
#
# Usage: scripts/kserve_layout.sh [MAR]
#   MAR   archive file name in the model store (b4-<version>.mar); default: the newest b4-*.mar
# Writes $B4_KSERVE_DIR/<version>/config/config.properties (deploy/kserve/config.properties with
# the model name, version and archive filled into model_snapshot), config/metrics.yaml and
# $B4_KSERVE_DIR/<version>/model-store/<MAR>, then prints that version directory on stdout: copy
# it to <volume or bucket>/b4/<version> and point the InferenceService's storageUri there.
# Builds nothing: run scripts/build_mar.sh (or scripts/deploy.sh) first.
# Env: B4_KSERVE_DIR (default $B4_CACHE_DIR/kserve), B4_KSERVE_CONFIG (default
#   deploy/kserve/config.properties), B4_METRICS_CONFIG, B4_MODEL_STORE, B4_MODEL_NAME, B4_CACHE_DIR, VENV.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

: "${B4_KSERVE_DIR:=$B4_CACHE_DIR/kserve}"
: "${B4_KSERVE_CONFIG:=$B4_ROOT/deploy/kserve/config.properties}"

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) die "unknown argument: $1 (see --help)" ;;
esac
[ $# -le 1 ] || die "one archive at most (see --help)"
mar="${1:-}"
if [ -z "$mar" ]; then
  mar=$(cd "$B4_MODEL_STORE" 2>/dev/null && ls -t -- "$B4_MODEL_NAME"-*.mar 2>/dev/null | head -1) \
    || true
  [ -n "$mar" ] || die "no $B4_MODEL_NAME-*.mar in $B4_MODEL_STORE: run scripts/build_mar.sh first"
fi
mar="${mar##*/}"
[[ "$mar" =~ ^$B4_MODEL_NAME-([A-Za-z0-9._-]+)\.mar$ ]] \
  || die "archive name must be $B4_MODEL_NAME-<version>.mar, as build_mar.sh writes it: $mar"
version="${BASH_REMATCH[1]}"
[ -f "$B4_MODEL_STORE/$mar" ] || die "archive not found: $B4_MODEL_STORE/$mar"
[ -f "$B4_KSERVE_CONFIG" ] || die "config not found: $B4_KSERVE_CONFIG"

# TorchServe registers the model the snapshot names: the archive's manifest must agree.
"$PY" - "$B4_MODEL_STORE/$mar" "$B4_MODEL_NAME" "$version" <<'PYTHON' || exit 1
import json, sys, zipfile
path, name, version = sys.argv[1:]
try:
    with zipfile.ZipFile(path) as archive:
        model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
    sys.exit(f"error: {path} is not a model archive: {error}")
found = (model.get("modelName"), model.get("modelVersion"))
if found != (name, version):
    sys.exit(f"error: {path} holds model {found[0]} version {found[1]}, not {name} {version}")
PYTHON

out="$B4_KSERVE_DIR/$version"
rm -rf "$out.partial"
mkdir -p "$out.partial/config" "$out.partial/model-store"
# Names and versions hold only [A-Za-z0-9._-]: safe in a sed replacement.
sed -e "s|@MODEL@|$B4_MODEL_NAME|g" -e "s|@VERSION@|$version|g" -e "s|@MAR@|$mar|g" \
  "$B4_KSERVE_CONFIG" > "$out.partial/config/config.properties"
if grep -n '@[A-Z]*@' "$out.partial/config/config.properties" >&2; then
  die "unfilled placeholder in $B4_KSERVE_CONFIG (above)"
fi
cp "$B4_METRICS_CONFIG" "$out.partial/config/metrics.yaml"
cp "$B4_MODEL_STORE/$mar" "$out.partial/model-store/$mar"
# Appear whole or not at all: a half-written layout must never be uploaded.
rm -rf "$out"
mv "$out.partial" "$out"
log "laid out $mar for KServe in $out"
echo "$out"
