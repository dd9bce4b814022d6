#!/usr/bin/env bash
# The edge: HAProxy in front of TorchServe (docs/EDGE.md). Clients on other machines send
# `Authorization: Bearer <credential>` to B4_EDGE_PORT; only /predictions/ and /v2/ pass, each
# replica's request goes on with that replica's current TorchServe key.
#
# Usage: scripts/edge.sh                 start HAProxy, or reload it with a fresh config
#        scripts/edge.sh --issue NAME    print a new credential for client NAME (replaces its old)
#        scripts/edge.sh --revoke NAME   revoke NAME's credential (at once, no reload)
#        scripts/edge.sh --list          names holding a credential
#        scripts/edge.sh --drain NAME    take replica NAME out of the pool; returns once the
#                                        edge holds nothing for it (then stop it)
#        scripts/edge.sh --ready NAME    back in the pool (its health checks decide when)
#        scripts/edge.sh --stop          stop HAProxy and the key keeper
# HAProxy is installed with apt-get where missing (as root; otherwise it says what to run).
# Env (defaults in scripts/env.sh): B4_EDGE_PORT (8000), B4_EDGE_BIND, B4_EDGE_DIR,
# B4_EDGE_CERT and B4_EDGE_KEY (TLS when both), B4_EDGE_REPLICAS (empty: this host's server
# from B4_HOST, B4_*_PORT, B4_KEY_FILE), B4_EDGE_*_TIMEOUT_S, B4_EDGE_MAX_CONNECTIONS,
# B4_EDGE_SERVER_MAX_CONNECTIONS, B4_EDGE_CHECK_INTERVAL_MS, B4_EDGE_RENEW_BEFORE_S,
# B4_EDGE_HAPROXY, VENV.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

edge_py() { "$PY" -m b4serve.ops.edge "$@"; }
pid_in() { if [ -f "$1" ]; then head -1 "$1"; fi; }
haproxy_pid() { pid_in "$B4_EDGE_DIR/haproxy.pid"; }
keeper_pid() { pid_in "$B4_EDGE_DIR/keeper.pid"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

install_haproxy() {
  command -v "$B4_EDGE_HAPROXY" >/dev/null 2>&1 && return 0
  [ "$B4_EDGE_HAPROXY" = haproxy ] || die "B4_EDGE_HAPROXY=$B4_EDGE_HAPROXY not found"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing haproxy (Debian package)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; } \
      >&2 || die "apt-get could not install haproxy"
  else
    die "HAProxy is not installed: sudo apt-get install -y haproxy (or set B4_EDGE_HAPROXY)"
  fi
}

start_or_reload() {
  install_haproxy
  [ -x "$PY" ] || die "no virtual env at $VENV: run scripts/bootstrap.sh first"
  edge_py render
  local cfg="$B4_EDGE_DIR/haproxy.cfg" old
  "$B4_EDGE_HAPROXY" -c -q -f "$cfg" || die "HAProxy refused $cfg"
  old=$(haproxy_pid)
  if alive "$old"; then
    # -sf: the new process takes the port; the old one finishes what it holds, then exits.
    "$B4_EDGE_HAPROXY" -f "$cfg" -sf "$old"
    log "edge reloaded on port $B4_EDGE_PORT"
  else
    rm -f "$B4_EDGE_DIR/admin.sock"
    "$B4_EDGE_HAPROXY" -f "$cfg"
    log "edge started on $B4_EDGE_BIND:$B4_EDGE_PORT"
  fi
  for _ in $(seq 50); do [ -S "$B4_EDGE_DIR/admin.sock" ] && break; sleep 0.1; done
  # A fresh keeper each time: it reads the replicas (B4_EDGE_REPLICAS) when it starts.
  old=$(keeper_pid)
  if alive "$old"; then kill "$old"; fi
  nohup "$PY" -m b4serve.ops.edge keep >>"$B4_EDGE_DIR/keeper.log" 2>&1 &
  echo $! >"$B4_EDGE_DIR/keeper.pid"
}

stop() {
  local pid
  pid=$(haproxy_pid)
  if alive "$pid"; then kill "$pid"; log "edge stopped"; fi
  rm -f "$B4_EDGE_DIR/admin.sock"   # the keeper ends when the socket is gone
  pid=$(keeper_pid)
  if alive "$pid"; then kill "$pid"; fi
  rm -f "$B4_EDGE_DIR/keeper.pid"
}

case "${1:-}" in
  -h|--help) usage ;;
  "") start_or_reload ;;
  --issue|--revoke|--drain|--ready)
    [ $# -eq 2 ] || die "$1 needs a NAME (see --help)"
    edge_py "${1#--}" "$2" ;;
  --list) edge_py list ;;
  --stop) stop ;;
  *) die "unknown argument $1 (see --help)" ;;
esac
