#!/usr/bin/env bash
# Run TorchServe in the foreground, for a service manager (deploy/systemd/b4serve.service).
#
# Usage: scripts/serve.sh
# One life of the server: config.properties' settings with the models of TorchServe's newest
# snapshot in $B4_LOG_DIR/config (the versions registered when it last stopped or died, the
# default one, their workers and batches); none before the first scripts/deploy.sh. Exits 0
# when TorchServe was stopped (`torchserve --stop`, or SIGTERM, which stops it cleanly) and 1
# when it died, for systemd's Restart=on-failure. scripts/deploy.sh keeps its own supervisor.
# Env: the B4_* variables of scripts/env.sh (ports, B4_RUN_DIR, B4_LOG_DIR, B4_TMPDIR,
#   B4_MODEL_STORE, B4_TS_CONFIG...) and VENV; it installs nothing (run scripts/bootstrap.sh once).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac
[ -x "$PY" ] || die "no virtual env at $VENV: run scripts/bootstrap.sh first"
exec "$PY" -m b4serve.ops.supervise run
