#!/usr/bin/env bash
# Benchmark every runtime this host runs side by side, in-process and served, and write the table.
#
# Usage: scripts/bench.sh [--quick] [--layout] [--sequential] [--rounds N] [--seconds S]
#   --quick       a few requests per configuration, one server at a time (a smoke test)
#   --layout      measure layouts instead of runtimes: micro-batch 1, 2, 4, 8 per runtime
#                 in-process; the chosen runtime served with 2 workers x 1 thread, micro-batch 4
#                 and (OpenVINO) the THROUGHPUT hint, beside the deploy defaults. Writes
#                 docs/LAYOUT.md, docs/layout.json and docs/layout.png
#   --sequential  one server at a time (less memory; rounds no longer interleave the servers)
#   --rounds N    rounds the measurements are split into and interleaved (default 3); the
#                 report gives each ratio per round, for its spread
#   --seconds S   length of each in-process measurement, over all rounds (default 12)
# Prints the host's CPU capabilities (AVX2, AVX-512, BF16, AMX) and what --runtime auto chose.
# Serves: ours with the deploy defaults (auto), every other runtime pinned (bf16 ones with the
# demo's bf16 tolerance, named so), fp32 TorchScript, the seed's own handler. Writes
# docs/PERFORMANCE.md, docs/performance.json and its picture docs/performance.png (served and
# in-process TTA images/s per runtime, latency against clients; --quick: all three into
# $B4_CACHE_DIR/bench). Redraw a picture from its record with
# `python -m b4serve.lab.plots bench docs/performance.json docs/performance.png`. Starts its
# own throwaway TorchServes on free loopback ports; a server you run is left alone, but it
# competes for the cores: stop it first for figures worth comparing. A full run takes about
# 12 minutes on 2 cores with up to seven servers up at once (about 8 GiB).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

"$B4_ROOT/scripts/bootstrap.sh"
# The picture needs matplotlib: a lab tool, pinned in requirements-dev.txt, not a server's need.
"$PY" -c "import matplotlib" 2>/dev/null \
  || "$PY" -m pip install -q "$(grep -E '^matplotlib==' "$B4_ROOT/requirements-dev.txt")"
out="$B4_ROOT/docs"
name=PERFORMANCE.md
json=performance.json
for arg in "$@"; do
  case "$arg" in
    --quick) out="$B4_CACHE_DIR/bench" ;;
    --layout) name=LAYOUT.md; json=layout.json ;;
  esac
done
mkdir -p "$out"
cd "$B4_ROOT"
"$PY" -m b4serve.lab.bench --output "$out/$name" --json "$out/$json" --plot "$out/${json%.json}.png" \
  "$@"
