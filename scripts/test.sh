#!/usr/bin/env bash
# Run every test: lint, unit tests, then integration tests against a real TorchServe.
#
# Usage: scripts/test.sh [pytest args...]     e.g. scripts/test.sh -m "not integration"
# Env: VENV (default .venv); B4_TEST_WORKERS (default 2: pytest-xdist workers; the integration
#   tests all run on one of them, in order, the rest beside them; 0 runs everything in this
#   process). Sets up the venv with the test tools first (bootstrap.sh --dev).
# Integration tests start their own servers on free loopback ports, with their own run dir,
# model store and TMPDIR: a server you deployed yourself is left alone.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

"$B4_ROOT/scripts/bootstrap.sh" --dev
cd "$B4_ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$PY" -m pytest -n "${B4_TEST_WORKERS:-2}" --dist loadgroup "$@"
