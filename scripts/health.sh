#!/usr/bin/env bash
# Report the health of the local TorchServe: server, model version, workers (status, pid,
# memory), requests by outcome since it started, and the latest errors from its model log.
#
# Usage: scripts/health.sh [--json] [--errors N]
#   --json       machine-readable output
#   --errors N   how many recent error lines to show (default 5)
# Exit status: 0 when the server answers /ping and the default version has a READY worker,
# 1 otherwise. Env (defaults in scripts/env.sh): B4_HOST, B4_*_PORT, B4_RUN_DIR, B4_KEY_FILE,
# B4_LOG_DIR, B4_MODEL_NAME, VENV.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ -x "$PY" ] || die "no virtual env at $VENV: run scripts/deploy.sh first"
exec "$PY" -m b4serve.ops.health --log-dir "$B4_LOG_DIR" "$@"
