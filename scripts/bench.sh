#!/usr/bin/env bash
# Benchmark everything side by side in one run and write the table.
#
# Usage: scripts/bench.sh [--quick] [--rounds N] [--seconds S]
#   --quick      a few requests per configuration (a smoke test, about 6 minutes)
#   --rounds N   rounds the measurements are split into and interleaved (default 3); the
#                report gives each ratio per round, for its spread
#   --seconds S  length of each in-process measurement, over all rounds (default 24)
# Writes docs/PERFORMANCE.md and docs/performance.json (--quick: into $B4_CACHE_DIR/bench).
# Starts its own throwaway TorchServe on free loopback ports; a server you run is left alone,
# but it competes for the cores: stop it first for figures worth comparing. Takes about 28
# minutes on 2 cores, with four servers up at once (about 6 GiB).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

"$B4_ROOT/scripts/bootstrap.sh"
out="$B4_ROOT/docs"
for arg in "$@"; do [ "$arg" = --quick ] && out="$B4_CACHE_DIR/bench"; done
mkdir -p "$out"
cd "$B4_ROOT"
"$PY" -m b4serve.lab.bench --output "$out/PERFORMANCE.md" --json "$out/performance.json" "$@"
