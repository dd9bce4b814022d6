#!/usr/bin/env bash
# Load and soak test: N clients for a bounded time against real TorchServe; reports requests
# sent, lost and duplicated (counted from the server's own log, by request id), wrong, worker
# restarts, worker and frontend memory growth, and key turnover (renewals the server recorded).
#
# Usage: scripts/soak.sh [--duration S] [--clients N] [--warmup S] [--bad-every N]
#                        [--token-expiration-min M] [--use-running] [--log-dir DIR] [--json FILE]
#                        [--plot FILE]
#   defaults: 300 s at 16 clients after a warm-up of 30 s and 128 requests at least, then until
#   memory settles (at most 120 s more); one malformed body in 16; on a throwaway server (free
#   loopback ports) whose keys expire every minute. The frontend's memory is read after a full
#   collection with jcmd (a JDK's tool); without one, uncollected (docs/SOAK.md).
#   --use-running  load the server the B4_* variables point at (e.g. the one deploy.sh started);
#                  its log dir (B4_LOG_DIR, or --log-dir) must be readable
#   --json FILE    the run's record: its figures and every memory reading (default
#                  $B4_CACHE_DIR/soak/soak.json)
#   --plot FILE    memory over time, drawn from that record (default $B4_CACHE_DIR/soak/soak.png;
#                  redraw with `python -m b4serve.lab.plots soak RECORD PNG`)
# Exit status 1 when anything was lost, duplicated or wrong, a worker restarted, the worker's
# memory or the frontend's retained memory or live heap grew by 5% or more, or (throwaway
# server, runs over 90 s) the keys never turned over.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

"$B4_ROOT/scripts/bootstrap.sh"
# The picture needs matplotlib: a lab tool, pinned in requirements-dev.txt, not a server's need.
"$PY" -c "import matplotlib" 2>/dev/null \
  || "$PY" -m pip install -q "$(grep -E '^matplotlib==' "$B4_ROOT/requirements-dev.txt")"
out="$B4_CACHE_DIR/soak"
defaults=()
case " $* " in *" --json"*) ;; *) defaults+=(--json "$out/soak.json") ;; esac
case " $* " in *" --plot"*) ;; *) defaults+=(--plot "$out/soak.png") ;; esac
exec "$PY" -m b4serve.lab.soak "${defaults[@]}" "$@"
