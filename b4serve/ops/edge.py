"""The edge: HAProxy in front of one or more TorchServe replicas (docs/EDGE.md).

``scripts/edge.sh`` starts or reloads HAProxy with the config rendered here from
``deploy/edge/`` and runs :func:`keep` beside it. This module also issues and revokes client
credentials, and drains replicas, through HAProxy's runtime API (its admin socket): credentials,
TorchServe keys and drains change without a reload.

Two maps live in ``B4_EDGE_DIR``:

- ``credentials.map``: ``<sha256 of a credential> <name>``, one line per client credential; the
  edge lets a request through when ``Authorization: Bearer <credential>`` hashes to a key here.
- ``keys.map``: ``<replica> <TorchServe inference key>``; each replica's tier adds its key.

TorchServe voids an inference key the moment it hands out the next, so :func:`keep` renews a
replica's key while the edge sends it nothing (drained) when another replica can serve; with
a single replica it renews in place (a request already forwarded with the old key may be
refused with InvalidKeyException, which the bundled client sends again).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

from b4serve.ops.endpoints import REPO_ROOT, Endpoints
from b4serve.ops.keys import KeyFile, KeyFileError, read_key_file
from b4serve.serving.config import MAX_BODY_BYTES

__all__ = [
    "EdgeSettings",
    "Replica",
    "Runtime",
    "credential_hash",
    "drain",
    "issue",
    "keep",
    "load_replicas",
    "main",
    "make_ready",
    "render",
    "revoke",
    "server_states",
    "sync_keys",
]

TEMPLATES = REPO_ROOT / "deploy" / "edge"
APIS = ("predictions", "v2")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class Replica:
    """One TorchServe behind the edge: where it listens and where its key file is."""

    name: str
    host: str
    inference_port: int
    v2_port: int
    management_port: int
    key_file: Path

    def keys(self) -> KeyFile:
        """Its key file, renewed through its own management API."""
        return KeyFile(self.key_file, f"http://{self.host}:{self.management_port}")

    def address(self, api: str) -> str:
        port = self.inference_port if api == "predictions" else self.v2_port
        return f"{self.host}:{port}"


@dataclass(frozen=True)
class EdgeSettings:
    """The edge's settings, from the ``B4_EDGE_*`` variables (defaults: scripts/env.sh)."""

    dir: Path
    bind_address: str
    port: int
    cert: str
    cert_key: str
    replicas_file: str
    request_timeout_s: int
    client_timeout_s: int
    idle_timeout_s: int
    response_timeout_s: int
    queue_timeout_s: int
    max_connections: int
    server_max_connections: int
    check_interval_ms: int
    renew_before_s: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EdgeSettings:
        """Every ``B4_EDGE_*`` must be set: scripts/env.sh is their one home."""

        def value(name: str) -> str:
            if name not in environ:
                raise ValueError(f"{name} is not set: run through scripts/edge.sh (env.sh)")
            return environ[name]

        def number(name: str) -> int:
            text = value(name)
            if not text.isdigit():
                raise ValueError(f"{name} must be a whole number, got {text!r}")
            return int(text)

        return cls(
            dir=Path(value("B4_EDGE_DIR")),
            bind_address=value("B4_EDGE_BIND"),
            port=number("B4_EDGE_PORT"),
            cert=value("B4_EDGE_CERT"),
            cert_key=value("B4_EDGE_KEY"),
            replicas_file=value("B4_EDGE_REPLICAS"),
            request_timeout_s=number("B4_EDGE_REQUEST_TIMEOUT_S"),
            client_timeout_s=number("B4_EDGE_CLIENT_TIMEOUT_S"),
            idle_timeout_s=number("B4_EDGE_IDLE_TIMEOUT_S"),
            response_timeout_s=number("B4_EDGE_RESPONSE_TIMEOUT_S"),
            queue_timeout_s=number("B4_EDGE_QUEUE_TIMEOUT_S"),
            max_connections=number("B4_EDGE_MAX_CONNECTIONS"),
            server_max_connections=number("B4_EDGE_SERVER_MAX_CONNECTIONS"),
            check_interval_ms=number("B4_EDGE_CHECK_INTERVAL_MS"),
            renew_before_s=number("B4_EDGE_RENEW_BEFORE_S"),
        )

    @property
    def config_file(self) -> Path:
        return self.dir / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        return self.dir / "admin.sock"

    @property
    def credentials_map(self) -> Path:
        return self.dir / "credentials.map"

    @property
    def keys_map(self) -> Path:
        return self.dir / "keys.map"

    @property
    def tls_pem(self) -> Path:
        return self.dir / "tls.pem"

    @property
    def tls(self) -> bool:
        """TLS when both a certificate and its key are given."""
        if bool(self.cert) != bool(self.cert_key):
            raise ValueError("TLS needs both B4_EDGE_CERT and B4_EDGE_KEY (or neither)")
        return bool(self.cert)


def load_replicas(settings: EdgeSettings, environ: Mapping[str, str] = os.environ) -> list[Replica]:
    """The replicas in ``B4_EDGE_REPLICAS`` (lines of ``name host inference_port v2_port
    management_port key_file``, ``#`` comments), or this host's server (B4_* ports) if empty."""
    if not settings.replicas_file:
        endpoints = Endpoints.from_env(environ)
        host = endpoints.inference_url.split("//", 1)[1].rsplit(":", 1)[0]

        def port(url: str) -> int:
            return int(url.rsplit(":", 1)[1])

        return [
            Replica(
                "local",
                host,
                port(endpoints.inference_url),
                port(endpoints.v2_url),
                port(endpoints.management_url),
                endpoints.key_file,
            )
        ]
    replicas = []
    path = Path(settings.replicas_file)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 6 or not all(f.isdigit() for f in fields[2:5]):
            raise ValueError(
                f"{path}:{number}: expected 'name host inference_port v2_port management_port "
                f"key_file', got {line!r}"
            )
        name, host, inference, v2, management, key_file = fields
        _check_name(name)
        replicas.append(
            Replica(name, host, int(inference), int(v2), int(management), Path(key_file))
        )
    if not replicas or len({r.name for r in replicas}) != len(replicas):
        raise ValueError(f"{path}: no replicas, or two with one name")
    return replicas


def _check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS:
        raise ValueError(f"names are letters, digits, '.', '_', '-': got {name!r}")
    return name


def _socket_name(settings: EdgeSettings, replica: str, api: str) -> str:
    # Abstract sockets share one namespace per host: the edge's port keeps two edges apart.
    return f"b4edge-{settings.port}-{replica}-{api}"


def render(settings: EdgeSettings, replicas: Sequence[Replica]) -> str:
    """haproxy.cfg for ``replicas`` from the templates in deploy/edge/."""
    main_template = Template((TEMPLATES / "haproxy.cfg.tmpl").read_text(encoding="utf-8"))
    tier = Template((TEMPLATES / "replica.cfg.tmpl").read_text(encoding="utf-8"))
    servers = {
        api: "\n".join(
            f"    server {r.name} abns@{_socket_name(settings, r.name, api)}" for r in replicas
        )
        for api in APIS
    }
    tiers = "".join(
        tier.substitute(
            replica=r.name,
            api=api,
            socket=_socket_name(settings, r.name, api),
            keys_map=settings.keys_map,
            address=r.address(api),
        )
        for r in replicas
        for api in APIS
    )
    tls = f" ssl crt {settings.tls_pem}" if settings.tls else ""
    return main_template.substitute(
        pid_file=settings.dir / "haproxy.pid",
        max_connections=settings.max_connections,
        admin_socket=settings.admin_socket,
        hard_stop_after=f"{settings.response_timeout_s + 10}s",
        client_timeout=f"{settings.client_timeout_s}s",
        response_timeout=f"{settings.response_timeout_s}s",
        queue_timeout=f"{settings.queue_timeout_s}s",
        idle_timeout=f"{settings.idle_timeout_s}s",
        request_timeout=f"{settings.request_timeout_s}s",
        errors_dir=TEMPLATES / "errors",
        bind_address=settings.bind_address,
        port=settings.port,
        tls=tls,
        scheme="https" if settings.tls else "http",
        credentials_map=settings.credentials_map,
        max_body_bytes=MAX_BODY_BYTES,
        check_interval=f"{settings.check_interval_ms}ms",
        server_max_connections=settings.server_max_connections,
        predictions_servers=servers["predictions"],
        v2_servers=servers["v2"],
        replica_tiers=tiers,
    )


class Runtime:
    """HAProxy's runtime API on its admin socket: one command per connection."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def command(self, line: str) -> str:
        """Send ``line``; HAProxy's answer (it closes the connection after it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows (pxname, svname, scur, qcur, status, ...)."""
        text = self.command("show stat").lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))


def credential_hash(credential: str) -> str:
    """What credentials.map keeps of a credential: its SHA-256, hex (the edge computes the same)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def _read_map(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2:
            rows.append((fields[0], fields[1]))
    return rows


def _write_map(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """Rewrite a map file whole (a reload reads it); mode 600, it holds secrets or their hashes."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(f"{key} {value}\n" for key, value in rows)
    tmp.replace(path)


def _runtime_if_running(settings: EdgeSettings) -> Runtime | None:
    return Runtime(settings.admin_socket) if settings.admin_socket.exists() else None


def issue(settings: EdgeSettings, name: str) -> str:
    """A new credential for client ``name`` (replacing any it had), effective at once."""
    _check_name(name)
    credential = secrets.token_urlsafe(32)
    digest = credential_hash(credential)
    with _locked(settings):
        rows = _read_map(settings.credentials_map)
        stale = [key for key, owner in rows if owner == name]
        _write_map(
            settings.credentials_map, [row for row in rows if row[1] != name] + [(digest, name)]
        )
        runtime = _runtime_if_running(settings)
        if runtime is not None:
            runtime.command(f"add map {settings.credentials_map} {digest} {name}")
            for key in stale:
                runtime.command(f"del map {settings.credentials_map} {key}")
    return credential


def revoke(settings: EdgeSettings, name: str) -> bool:
    """Remove ``name``'s credential; False if it had none. Effective for the next request."""
    with _locked(settings):
        rows = _read_map(settings.credentials_map)
        stale = [key for key, owner in rows if owner == name]
        _write_map(settings.credentials_map, [row for row in rows if row[1] != name])
        runtime = _runtime_if_running(settings)
        if runtime is not None:
            for key in stale:
                runtime.command(f"del map {settings.credentials_map} {key}")
    return bool(stale)


@contextlib.contextmanager
def _locked(settings: EdgeSettings) -> Iterator[None]:
    """One change at a time: issuing, revoking, draining and key renewals take turns."""
    settings.dir.mkdir(parents=True, exist_ok=True)
    with open(settings.dir / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def server_states(runtime: Runtime) -> dict[tuple[str, str], dict[str, str]]:
    """``(backend, server) -> stat row`` for the replicas' servers in the two pools."""
    return {
        (row["pxname"], row["svname"]): row
        for row in runtime.stats()
        if row["pxname"] in APIS and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def _holds(runtime: Runtime, name: str) -> int:
    """Requests the edge has in flight or queued for replica ``name``."""
    states = server_states(runtime)
    return sum(
        int(states[(api, name)]["scur"] or 0) + int(states[(api, name)]["qcur"] or 0)
        for api in APIS
    )


def _set_state(runtime: Runtime, name: str, state: str) -> None:
    for api in APIS:
        answer = runtime.command(f"set server {api}/{name} state {state}").strip()
        if answer:
            raise RuntimeError(f"HAProxy refused 'set server {api}/{name} state {state}': {answer}")


def _drain_unlocked(runtime: Runtime, name: str, timeout_s: float) -> float:
    _set_state(runtime, name, "drain")
    started = time.monotonic()
    while _holds(runtime, name):
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"replica {name} still holds requests after {timeout_s:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


def drain(settings: EdgeSettings, name: str) -> float:
    """Take replica ``name`` out of the pool and return once the edge holds nothing for it
    (seconds waited); it is then safe to stop. :func:`make_ready` puts it back."""
    with _locked(settings):
        return _drain_unlocked(
            Runtime(settings.admin_socket),
            name,
            settings.response_timeout_s + settings.queue_timeout_s,
        )


def make_ready(settings: EdgeSettings, name: str) -> None:
    """Back in the pool: its health checks decide when it gets requests."""
    with _locked(settings):
        _set_state(Runtime(settings.admin_socket), name, "ready")


def _others_serving(runtime: Runtime, name: str) -> bool:
    """Whether a replica other than ``name`` is in the pool and passing its health checks."""
    states = server_states(runtime)
    return any(
        all(states[(api, other)]["status"] == "UP" for api in APIS)
        for (api_name, other) in states
        if api_name == "v2" and other != name
    )


def sync_keys(settings: EdgeSettings, replicas: Sequence[Replica], known: dict[str, str]) -> None:
    """One round of :func:`keep`: renew keys about to expire, give HAProxy the file's keys.

    ``known`` is what keys.map holds, updated in place.
    """
    runtime = Runtime(settings.admin_socket)
    for replica in replicas:
        try:
            entry = read_key_file(replica.key_file)["inference"]
            if entry.expires_within(settings.renew_before_s):
                _renew(settings, runtime, replica, entry.key)
                entry = read_key_file(replica.key_file)["inference"]
        except (KeyFileError, OSError, RuntimeError) as exc:  # replica down or restarting
            _say_once(f"{replica.name}: {exc}")
            continue
        if known.get(replica.name) != entry.key:
            runtime.command(f"set map {settings.keys_map} {replica.name} {entry.key}")
            known[replica.name] = entry.key
            _write_map(settings.keys_map, sorted(known.items()))


_last_said: dict[str, str] = {}


def _say_once(message: str) -> None:
    """Log ``message`` unless it is the one logged last for the same replica."""
    replica = message.split(":", 1)[0]
    if _last_said.get(replica) != message:
        _last_said[replica] = message
        print(f"[edge keep] {message}", file=sys.stderr, flush=True)


def _renew(settings: EdgeSettings, runtime: Runtime, replica: Replica, stale: str) -> None:
    """Renew ``replica``'s key while it holds nothing from the edge, when another can serve."""
    with _locked(settings):
        states = server_states(runtime)
        in_pool = states[("v2", replica.name)]["status"] not in ("DRAIN", "MAINT")
        rotate = in_pool and _others_serving(runtime, replica.name)
        if rotate:
            _drain_unlocked(runtime, replica.name, settings.response_timeout_s)
        try:
            fresh = replica.keys().renew("inference", stale_key=stale)
            runtime.command(f"set map {settings.keys_map} {replica.name} {fresh}")
        finally:
            if rotate:
                _set_state(runtime, replica.name, "ready")
        how = "drained" if rotate else "in place"
        print(
            f"[edge keep] {replica.name}: inference key renewed ({how})",
            file=sys.stderr,
            flush=True,
        )


def keep(settings: EdgeSettings, replicas: Sequence[Replica], interval_s: float = 1.0) -> None:
    """Run beside HAProxy: every ``interval_s``, :func:`sync_keys`. Ends with HAProxy."""
    # SIGTERM (edge.sh restarting it) ends the loop through finally blocks: a replica drained
    # for a renewal goes back into the pool.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    known = dict(_read_map(settings.keys_map))
    while settings.admin_socket.exists():
        try:
            sync_keys(settings, replicas, known)
        except OSError as exc:  # HAProxy reloading or gone: the next round sees which
            print(f"[edge keep] {exc}", file=sys.stderr, flush=True)
        time.sleep(interval_s)


def _initial_keys(settings: EdgeSettings, replicas: Sequence[Replica]) -> None:
    """keys.map as the key files say now (a replica without one gets a placeholder)."""
    rows = []
    for replica in replicas:
        try:
            key = read_key_file(replica.key_file)["inference"].key
        except KeyFileError:
            key = "none-yet"
        rows.append((replica.name, key))
    _write_map(settings.keys_map, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI used by scripts/edge.sh."""
    parser = argparse.ArgumentParser(prog="python -m b4serve.ops.edge")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("render", help="write haproxy.cfg and the maps in B4_EDGE_DIR")
    commands.add_parser("keep", help="renew TorchServe keys and hand them to HAProxy")
    for name in ("issue", "revoke", "drain", "ready"):
        commands.add_parser(name).add_argument("name")
    commands.add_parser("list", help="the names holding a credential")
    args = parser.parse_args(argv)
    try:
        settings = EdgeSettings.from_env()
        if args.command == "render":
            _render_files(settings)
        elif args.command == "keep":
            keep(settings, load_replicas(settings))
        elif args.command == "issue":
            print(issue(settings, args.name))
        elif args.command == "revoke":
            if not revoke(settings, args.name):
                print(f"edge: {args.name} holds no credential", file=sys.stderr)
                return 1
        elif args.command == "drain":
            waited = drain(settings, _check_name(args.name))
            print(f"edge: {args.name} drained in {waited:.1f} s", file=sys.stderr)
        elif args.command == "ready":
            make_ready(settings, _check_name(args.name))
        elif args.command == "list":
            for _, name in _read_map(settings.credentials_map):
                print(name)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    return 0


def _render_files(settings: EdgeSettings) -> None:
    """haproxy.cfg, keys.map, an empty credentials.map if none, and the TLS bundle."""
    settings.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.dir, 0o700)
    replicas = load_replicas(settings)
    if settings.tls:  # HAProxy takes the certificate and its key in one file
        bundle = Path(settings.cert).read_text() + Path(settings.cert_key).read_text()
        fd = os.open(settings.tls_pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(bundle)
    if not settings.credentials_map.exists():
        _write_map(settings.credentials_map, [])
    _initial_keys(settings, replicas)
    settings.config_file.write_text(render(settings, replicas), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
