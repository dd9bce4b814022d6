#!/usr/bin/env bash
# Run every test: lint, unit tests, and integration tests against a real TorchServe.
#
# Usage: scripts/test.sh [pytest args...]     e.g. scripts/test.sh -m "not integration"
# With no arguments (the whole suite, as CI runs it) two pytest processes run side by side:
# the integration tests in order in one (they share the session's server, and two servers
# exporting at once on 2 cores would slow each other past their timeouts), the rest in the
# other at a lower priority (nice 5), so that it takes the cores while the servers wait; its
# report follows. With arguments, one pytest runs exactly what they select.
# Env: VENV (default .venv); B4_TEST_SPLIT (default 1; 0 runs the whole suite in one process).
# Sets up the venv with the test tools first (bootstrap.sh --dev).
# Integration tests start their own servers on free loopback ports, with their own run dir,
# model store and TMPDIR: a server you deployed yourself is left alone.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

"$B4_ROOT/scripts/bootstrap.sh" --dev
cd "$B4_ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
if [ $# -gt 0 ] || [ "${B4_TEST_SPLIT:-1}" = 0 ]; then
  exec "$PY" -m pytest "$@"
fi

# Each process its own base temp dir: pytest prunes old numbered ones, never a neighbour's.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/b4-tests.XXXXXX")
unit_pid=""
cleanup() {
  [ -n "$unit_pid" ] && kill "$unit_pid" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
nice -n 5 "$PY" -m pytest -m "not integration" -p no:cacheprovider --basetemp "$scratch/unit" \
  > "$scratch/unit.log" 2>&1 &
unit_pid=$!
status=0
"$PY" -m pytest -m integration --basetemp "$scratch/integration" || status=$?
unit_status=0
wait "$unit_pid" || unit_status=$?
unit_pid=""
echo
echo "=== the other tests (not integration), run beside them ==="
cat "$scratch/unit.log"
if [ "$status" != 0 ] || [ "$unit_status" != 0 ]; then
  echo "FAILED: integration tests exit $status, the other tests exit $unit_status" >&2
  exit 1
fi
