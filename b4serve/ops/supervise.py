"""Keep the local TorchServe up: start it, bring it back when it dies, stop with it.

``start`` (what ``scripts/deploy.sh`` runs) checks that the server's ports are free, starts
``watch`` in the background and returns once the frontend listens, or fails quoting the reason
TorchServe gave. ``watch`` runs ``torchserve --start --foreground`` and, when the frontend dies
(out of memory, SIGKILL), starts it again within seconds, with the models TorchServe's own
snapshot recorded (``{B4_LOG_DIR}/config``): every registered version, the default one, their
workers and batch settings. It ends when ``torchserve --stop`` stopped the server (that removes
TorchServe's pid file), or on SIGTERM, which stops the server first. ``run`` is one life of the
server in the foreground, restored from the newest snapshot, for systemd's ``Restart=on-failure``
(``deploy/systemd/b4serve.service``): exit 0 when stopped, 1 when it died.

Settings come from the ``B4_*`` variables ``scripts/env.sh`` exports; run it through the scripts
(``scripts/deploy.sh``, ``scripts/supervise.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "Holder",
    "Launch",
    "Life",
    "StartError",
    "describe",
    "latest_snapshot",
    "port_holder",
    "restart_config",
    "snapshot_models",
]

log = logging.getLogger("b4serve.supervise")

# Every port TorchServe binds, by the variable that sets it.
PORT_VARIABLES = (
    "B4_INFERENCE_PORT",
    "B4_MANAGEMENT_PORT",
    "B4_METRICS_PORT",
    "B4_GRPC_INFERENCE_PORT",
    "B4_GRPC_MANAGEMENT_PORT",
)
_TORCHSERVE_MAIN = "org.pytorch.serve.ModelServer"  # what model_server.py looks for, too
# TorchServe's KServe envelopes (B4_ENVELOPE): none by default; the legacy KServe runtime's ones.
ENVELOPES = ("", "kserve", "kservev2")
# After the frontend exits, how long `torchserve --stop --foreground` may take to remove the pid
# file (it does so right after the frontend is gone).
_STOP_GRACE_S = 1.0
# A life shorter than this counts as a crash loop: the next start waits twice as long (to 60 s).
_STEADY_S = 60.0
_MAX_DELAY_S = 60.0
# Snapshots kept in {B4_LOG_DIR}/config: TorchServe writes one per management change, forever.
_SNAPSHOTS_KEPT = 20
# Console lines that say why TorchServe would not start or died (model_server.py's and the
# JVM's own words); its warning about our vmargs is none of them.
_REASON = re.compile(
    r"already running|not found|Error:|Exception|Invalid|Unrecognized|Could not|Terminating due|"
    r"Address already in use|Failed"
)
_NOT_A_REASON = "is using non-default JVM parameters"
_SNAPSHOT_NAME = re.compile(r"\d{17}-\w+\.cfg")


class StartError(RuntimeError):
    """TorchServe cannot be started; the message says why and what to do, in one sentence."""


@dataclass(frozen=True)
class Launch:
    """How to start this checkout's TorchServe: the command, its environment and its files."""

    venv: Path
    host: str
    ports: dict[str, int]  # B4_*_PORT -> port
    run_dir: Path
    log_dir: Path
    tmpdir: Path | None  # pid file and worker sockets; None: the system's temp dir
    model_store: Path
    ts_config: Path
    log_config: Path
    metrics_config: Path
    envelope: str  # "" or one of TorchServe's KServe envelopes
    token_expiration_min: str
    plugins_path: Path | None = None  # frontend plugins (the v2 REST API), from B4_TS_PLUGINS_PATH
    v2_address: str = ""  # where the v2 plugin listens (B4_V2_ADDRESS), when it is on

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Launch:
        """Read the ``B4_*`` variables ``scripts/env.sh`` exports (their one home)."""

        def need(name: str) -> str:
            value = environ.get(name)
            if value is None:
                raise StartError(f"{name} is not set: run this through scripts/ (env.sh sets it)")
            return value

        ports = {}
        for name in PORT_VARIABLES:
            try:
                ports[name] = int(need(name))
            except ValueError:
                raise StartError(f"{name} must be a port number, not {need(name)!r}") from None
        envelope = environ.get("B4_ENVELOPE", "")
        if envelope not in ENVELOPES:
            raise StartError(f"B4_ENVELOPE must be empty, kserve or kservev2, not {envelope}")
        plugins = environ.get("B4_TS_PLUGINS_PATH")
        return cls(
            venv=Path(need("VENV")),
            host=need("B4_HOST"),
            ports=ports,
            run_dir=Path(need("B4_RUN_DIR")),
            log_dir=Path(need("B4_LOG_DIR")),
            tmpdir=Path(environ["B4_TMPDIR"]) if environ.get("B4_TMPDIR") else None,
            model_store=Path(need("B4_MODEL_STORE")),
            ts_config=Path(need("B4_TS_CONFIG")),
            log_config=Path(need("B4_LOG_CONFIG")),
            metrics_config=Path(need("B4_METRICS_CONFIG")),
            envelope=envelope,
            token_expiration_min=environ.get("B4_TOKEN_EXPIRATION_MIN", ""),
            plugins_path=Path(plugins) if plugins else None,
            v2_address=environ.get("B4_V2_ADDRESS", "") if plugins else "",
        )

    @property
    def torchserve(self) -> Path:
        return self.venv / "bin" / "torchserve"

    @property
    def pid_file(self) -> Path:
        """Where ``torchserve`` keeps the frontend's pid: its temp dir."""
        return (self.tmpdir or Path(tempfile.gettempdir())) / ".model_server.pid"

    @property
    def supervisor_pid_file(self) -> Path:
        return self.run_dir / "supervisor.pid"

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def snapshot_dir(self) -> Path:
        return self.log_dir / "config"  # TorchServe's {LOG_LOCATION}/config

    @property
    def restart_config_file(self) -> Path:
        return self.run_dir / "restart.properties"

    def command(self, config: Path) -> list[str]:
        """``torchserve --start --foreground`` with ``config``. Snapshots stay on (no --ncs):
        they are how the models come back after a crash."""
        return [
            str(self.torchserve),
            "--start",
            "--foreground",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
            "--log-config",
            str(self.log_config),
            *(["--plugins-path", str(self.plugins_path)] if self.plugins_path else []),
        ]

    def environment(self, base: Mapping[str, str] = os.environ) -> dict[str, str]:
        """The server's environment: ports as TS_* (config.properties has
        enable_envvars_config=true), logs in the log dir, no PYTHONPATH, so that workers import
        b4serve from the archive they serve, never from this checkout."""
        env = {name: value for name, value in base.items() if name != "PYTHONPATH"}
        url = f"http://{self.host}:"
        env.update(
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            TS_INFERENCE_ADDRESS=url + str(self.ports["B4_INFERENCE_PORT"]),
            TS_MANAGEMENT_ADDRESS=url + str(self.ports["B4_MANAGEMENT_PORT"]),
            TS_METRICS_ADDRESS=url + str(self.ports["B4_METRICS_PORT"]),
            TS_GRPC_INFERENCE_PORT=str(self.ports["B4_GRPC_INFERENCE_PORT"]),
            TS_GRPC_MANAGEMENT_PORT=str(self.ports["B4_GRPC_MANAGEMENT_PORT"]),
            TS_METRICS_CONFIG=str(self.metrics_config),
        )
        if self.tmpdir is not None:  # TMPDIR: the pid file; TEMP: the JVM's tmpdir (sockets)
            env.update(TMPDIR=str(self.tmpdir), TEMP=str(self.tmpdir))
        if self.token_expiration_min:
            env["TS_TOKEN_EXPIRATION_TIME_MIN"] = self.token_expiration_min
        if self.envelope:
            env["TS_SERVICE_ENVELOPE"] = self.envelope
        env.pop("B4_V2_ADDRESS", None)  # the plugin listens only when this launch says so
        if self.v2_address:
            env["B4_V2_ADDRESS"] = self.v2_address
        return env

    def stop_command(self) -> list[str]:
        return [str(self.torchserve), "--stop", "--foreground"]

    def make_dirs(self) -> None:
        for directory in (self.run_dir, self.log_dir, self.model_store, self.tmpdir):
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)


# --- TorchServe's snapshot -----------------------------------------------------------------------


def _snapshots(directory: Path) -> list[Path]:
    """TorchServe's snapshot files (``<yyyyMMddHHmmssSSS>-<kind>.cfg``), oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("*.cfg") if _SNAPSHOT_NAME.fullmatch(path.name)]
    return sorted(found, key=lambda path: path.name[:17])  # by the time in the name, as TS does


def latest_snapshot(directory: Path, since: float = 0.0) -> Path | None:
    """TorchServe's newest whole snapshot among those written at or after ``since`` (epoch s).

    TorchServe writes a snapshot in place, so a frontend killed while writing one leaves it cut
    short (seen: a startup.cfg without its model_snapshot line, after a SIGKILL the moment the
    frontend listened); the one before it is then the newest that says what was registered."""
    recent = [path for path in _snapshots(directory) if path.stat().st_mtime >= since]
    for path in reversed(recent):
        try:
            snapshot_models(path)
        except (ValueError, OSError):  # json.JSONDecodeError is a ValueError
            continue
        return path
    return None


def _java_unescape(value: str) -> str:
    """A value as java.util.Properties.load reads it (Properties.store writes one line per key,
    escaping ``=:#!`` and backslashes, and non-Latin-1 characters as \\uXXXX)."""
    controls = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}

    def replace(match: re.Match[str]) -> str:
        escaped = match.group(1)
        if escaped.startswith("u") and len(escaped) == 5:
            return chr(int(escaped[1:], 16))
        return controls.get(escaped, escaped)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", replace, value)


def snapshot_models(snapshot: Path) -> dict[str, object]:
    """The ``model_snapshot`` TorchServe recorded: models, versions, their settings."""
    for line in snapshot.read_text(encoding="latin-1").splitlines():
        if line.startswith("model_snapshot="):
            models = json.loads(_java_unescape(line.split("=", 1)[1]))
            if not isinstance(models, dict):
                break
            return models
    raise ValueError(f"{snapshot} holds no model_snapshot")


def restart_config(base: Path, snapshot: Path | None, out: Path) -> Path:
    """``base`` (config.properties: every setting) plus the snapshot's models, written to ``out``.

    TorchServe would restore a snapshot file as it is, but its copy of the settings is the one
    it started with, and model_server.py cannot read its escaped vmargs; so config.properties
    stays the source of every setting and the snapshot gives only what was registered.
    """
    text = base.read_text()
    if snapshot is not None:
        compact = json.dumps(snapshot_models(snapshot), separators=(",", ":"))
        # Properties.load reads backslashes as escapes; JSON escapes its own with them.
        text += (
            f"\n# Models registered when the server died: {snapshot.name}\n"
            f"model_snapshot={compact.replace(chr(92), chr(92) * 2)}\n"
        )
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)
    return out


def prune_snapshots(directory: Path, keep: int = _SNAPSHOTS_KEPT) -> None:
    for old in _snapshots(directory)[:-keep]:
        old.unlink(missing_ok=True)


# --- processes and ports -------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A process that holds a port or a pid file, and how to stop it if it is a TorchServe."""

    text: str
    stop: str | None = None

    def advice(self) -> str:
        how = f"`{self.stop}`" if self.stop else "`TMPDIR=<its TMPDIR> torchserve --stop`"
        return (
            f"stop that server ({how}), or give this one other ports (B4_*_PORT) and its own "
            "B4_TMPDIR"
        )


def describe(pid: int) -> Holder:
    """``TorchServe pid 12 (run dir /srv/.run, TMPDIR /tmp/ts)`` or ``pid 12 (nginx ...)``."""
    try:
        process = psutil.Process(pid)
        cmdline = process.cmdline()
        if _TORCHSERVE_MAIN in cmdline:
            tmpdir = process.environ().get("TMPDIR")
            stop = f"TMPDIR={tmpdir} torchserve --stop" if tmpdir else "torchserve --stop"
            where = f"run dir {process.cwd()}, TMPDIR {tmpdir or 'unset'}"
            return Holder(f"TorchServe pid {pid} ({where})", stop)
        return Holder(f"pid {pid} ({' '.join(cmdline)[:80] or process.name()})")
    except psutil.Error:
        return Holder(f"pid {pid}")


def port_holder(host: str, port: int) -> Holder | None:
    """Who holds ``host:port``, or None when it is free to bind."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError:
            pass
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.Error:
        connections = []
    for connection in connections:
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid
        ):
            return describe(connection.pid)
    return Holder("a process this user cannot see (`sudo ss -ltnp` names it)")


def pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_supervisor(pid: int | None) -> bool:
    """Whether ``pid`` is a live ``supervise watch`` (not another process that got its pid)."""
    try:
        return alive(pid) and "b4serve.ops.supervise" in psutil.Process(pid or 0).cmdline()
    except psutil.Error:
        return False


def listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def reason_in(console: Path, offset: int) -> str | None:
    """What TorchServe said went wrong, from the console lines written since ``offset``."""
    try:
        with console.open(errors="replace") as stream:
            stream.seek(offset)
            lines = [line.strip() for line in stream.read().splitlines() if line.strip()]
    except OSError:
        return None
    telling = [line for line in lines if _REASON.search(line) and _NOT_A_REASON not in line]
    return " / ".join(telling[-2:])[:600] if telling else None


# --- one life, and the loop ----------------------------------------------------------------------


@dataclass
class Life:
    """How one run of ``torchserve --start --foreground`` ended."""

    ended: str  # "stopped" (torchserve --stop), "refused" (never listened), "died"
    pid: int | None
    seconds: float
    reason: str | None


class _Stop:
    """SIGTERM: stop the server, then end (no work in the handler itself)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True


def live(launch: Launch, config: Path, stop: _Stop, say: Callable[[str], None]) -> Life:
    """Run TorchServe in the foreground with ``config`` until it exits; say how it ended."""
    launch.make_dirs()
    if launch.pid_file.is_file() and not alive(pid_from_file(launch.pid_file)):
        launch.pid_file.unlink(missing_ok=True)  # the dead frontend's: not this life's pid
    other = pid_from_file(launch.pid_file)  # a live server's: torchserve will refuse to start
    offset = launch.console_log.stat().st_size if launch.console_log.is_file() else 0
    started = time.monotonic()
    inference_port = launch.ports["B4_INFERENCE_PORT"]
    with launch.console_log.open("ab") as console:
        child = subprocess.Popen(
            launch.command(config),
            env=launch.environment(),
            cwd=launch.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
    pid: int | None = None
    came_up = stopping = False

    def running() -> bool:
        # model_server.py waits for the frontend; if it alone was killed, watch the frontend
        return child.poll() is None or alive(pid)

    while running():
        if pid is None and child.poll() is None:
            written = pid_from_file(launch.pid_file)
            pid = written if written != other else None
        if not came_up and pid is not None and listening(launch.host, inference_port):
            came_up = True
            say(f"TorchServe is up: pid {pid}, {launch.host}:{inference_port}")
        if stop.requested and not stopping:
            stopping = True
            say("SIGTERM: stopping TorchServe")
            subprocess.run(
                launch.stop_command(),
                env=launch.environment(),
                cwd=launch.run_dir,
                capture_output=True,
                timeout=120,
                check=False,
            )
        time.sleep(0.1)
    seconds = time.monotonic() - started
    reason = reason_in(launch.console_log, offset)
    # Never seen listening, and either no frontend at all or one that said why: a refusal. A
    # frontend killed the moment it bound its port says nothing: that is a death.
    if not came_up and not stopping and (pid is None or reason):
        return Life("refused", pid, seconds, reason)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline and pid_from_file(launch.pid_file) == pid:
        time.sleep(0.1)  # `torchserve --stop --foreground` removes it once the frontend is gone
    if stopping or pid_from_file(launch.pid_file) != pid:
        return Life("stopped", pid, seconds, reason)
    return Life("died", pid, seconds, reason)


def watch(launch: Launch, say: Callable[[str], None]) -> int:
    """Keep TorchServe up until it is stopped; 1 if its first start was refused."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    launch.make_dirs()
    launch.supervisor_pid_file.write_text(f"{os.getpid()}\n")
    since = time.time()
    config, delay, restarts = launch.ts_config, 0.0, 0
    try:
        while True:
            life = live(launch, config, stop, say)
            if life.ended == "refused" and restarts == 0:
                say(f"TorchServe refused to start: {life.reason or 'it gave no reason'}")
                return 1
            if life.ended == "stopped" or stop.requested:
                say(f"TorchServe (pid {life.pid}) was stopped; the supervisor ends")
                return 0
            # at once after a steady life; a crash loop waits 1, 2, 4... s, up to a minute
            delay = 0.0 if life.seconds >= _STEADY_S else min(_MAX_DELAY_S, max(1.0, delay * 2))
            snapshot = latest_snapshot(launch.snapshot_dir, since)
            restarts += 1
            say(
                f"TorchServe (pid {life.pid}) {life.ended} after {life.seconds:.0f} s "
                f"({life.reason or 'no reason in console.log: killed from outside?'}); restart "
                f"{restarts} in {delay:.0f} s with the models of "
                f"{snapshot.name if snapshot else 'no snapshot (none registered yet)'}"
            )
            for _ in range(int(delay * 10)):
                if stop.requested:
                    return 0
                time.sleep(0.1)
            prune_snapshots(launch.snapshot_dir)
            config = restart_config(launch.ts_config, snapshot, launch.restart_config_file)
    finally:
        with contextlib.suppress(OSError):
            if pid_from_file(launch.supervisor_pid_file) == os.getpid():
                launch.supervisor_pid_file.unlink()


def run_once(launch: Launch, say: Callable[[str], None]) -> int:
    """One life in the foreground with the newest snapshot's models (systemd restarts it)."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    launch.make_dirs()
    snapshot = latest_snapshot(launch.snapshot_dir)
    prune_snapshots(launch.snapshot_dir)
    config = restart_config(launch.ts_config, snapshot, launch.restart_config_file)
    say(f"starting TorchServe with the models of {snapshot.name if snapshot else 'no snapshot'}")
    life = live(launch, config, stop, say)
    say(
        f"TorchServe (pid {life.pid}) {life.ended} after {life.seconds:.0f} s"
        + (f": {life.reason}" if life.reason and life.ended != "stopped" else "")
    )
    return 0 if life.ended == "stopped" else 1


def start(launch: Launch, say: Callable[[str], None], timeout_s: float = 180.0) -> int:
    """Start ``watch`` in the background; return once the frontend listens.

    Raises :class:`StartError` when a port is taken, when TorchServe refuses to start, or when
    it does not listen within ``timeout_s``.
    """
    running = pid_from_file(launch.supervisor_pid_file)
    deadline = time.monotonic() + 5.0  # one that was just told to stop ends within a second
    while is_supervisor(running) and not alive(pid_from_file(launch.pid_file)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if is_supervisor(running):
        say(
            f"TorchServe's supervisor (pid {running}) is already running for {launch.run_dir}: "
            "the server is (re)starting under it"
        )
        return 0
    ports = dict(launch.ports)
    if launch.v2_address:  # the v2 plugin's own listener
        ports["B4_V2_PORT"] = int(launch.v2_address.rsplit(":", 1)[1])
    for name, port in ports.items():
        holder = port_holder(launch.host, port)
        if holder is not None:
            raise StartError(
                f"port {port} ({name}) is already in use by {holder.text}: {holder.advice()}"
            )
    launch.make_dirs()
    supervisor_log = launch.log_dir / "supervisor.log"
    with supervisor_log.open("ab") as output:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "b4serve.ops.supervise", "watch"],
            cwd=launch.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    say(
        f"starting TorchServe on {launch.host}:{launch.ports['B4_INFERENCE_PORT']} under its "
        f"supervisor (pid {watcher.pid}; logs in {launch.log_dir})"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if watcher.poll() is not None:
            raise StartError(_refusal(launch, supervisor_log))
        if listening(launch.host, launch.ports["B4_INFERENCE_PORT"]):
            return 0
        if time.monotonic() > deadline:
            raise StartError(
                f"TorchServe did not listen on port {launch.ports['B4_INFERENCE_PORT']} within "
                f"{timeout_s:.0f} s; see {launch.console_log} and {launch.log_dir}/ts_log.log"
            )
        time.sleep(0.2)


def _refusal(launch: Launch, supervisor_log: Path) -> str:
    """The supervisor's last word (it quotes TorchServe), with who holds the pid file if that
    is why."""
    lines = (
        supervisor_log.read_text(errors="replace").splitlines() if supervisor_log.is_file() else []
    )
    said = next(
        (line.split("] ", 1)[-1] for line in reversed(lines) if "refused" in line),
        f"TorchServe exited at once; see {launch.console_log}",
    )
    holder = pid_from_file(launch.pid_file)
    if "already running" in said and holder is not None and alive(holder):
        who = describe(holder)
        said += (
            f" {who.text} holds its pid file {launch.pid_file}: stop it"
            + (f" (`{who.stop}`)" if who.stop else "")
            + ", or give this server its own B4_TMPDIR"
        )
    return said


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.ops.supervise",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["start", "watch", "run"])
    parser.add_argument("--timeout", type=float, default=180.0, help="start: seconds to wait")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        format="[%(asctime)s supervise] %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        level=logging.INFO,
        stream=sys.stdout if args.command != "start" else sys.stderr,
    )

    def say(message: str) -> None:
        log.info(message)
        for handler in logging.getLogger().handlers:
            handler.flush()

    try:
        launch = Launch.from_env()
        if args.command == "start":
            return start(launch, say, args.timeout)
        if args.command == "watch":
            return watch(launch, say)
        return run_once(launch, say)
    except StartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
