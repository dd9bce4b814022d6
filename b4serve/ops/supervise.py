"""Lives of the local TorchServe: one in the foreground for a service manager, or a loop of
them where the host has none.

Restarts are the platform's job: on Kubernetes the kubelet restarts the container (which runs
TorchServe in the foreground), and under systemd ``deploy/systemd/b4serve.service`` runs
``run``, one life of the server in the foreground (exit 0 when it was stopped, 1 when it died),
with ``Restart=on-failure``. What neither does is kept here and in its own modules: starting
from the models TorchServe's snapshot recorded (b4serve.ops.snapshot), and naming who holds a
port or the pid file (b4serve.ops.ports).

A bare host (a VM, a CI runner, a dev container) has no service manager, so ``start`` (what
``scripts/deploy.sh`` runs) checks that the ports are free, starts ``watch`` in the background
and returns once the frontend listens, or fails quoting the reason TorchServe gave. ``watch``
is ``Restart=on-failure`` for such a host: the same lives, started again when the frontend dies
(at once after a steady life, backing off in a crash loop). It ends when ``torchserve --stop``
stopped the server (that removes TorchServe's pid file), or on SIGTERM, which stops the server
first. Nothing restarts ``watch`` itself: running deploy again does.

Settings come from the ``B4_*`` variables ``scripts/env.sh`` exports (b4serve.ops.launch); run
it through the scripts (``scripts/deploy.sh``, ``scripts/serve.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from b4serve.ops.launch import Launch, StartError
from b4serve.ops.ports import alive, describe, listening, pid_from_file, port_holder
from b4serve.ops.snapshot import latest_snapshot, prune_snapshots, restart_config

__all__ = ["Life", "is_supervisor", "run_once", "start", "watch"]

log = logging.getLogger("b4serve.supervise")

# After the frontend exits, how long `torchserve --stop --foreground` may take to remove the pid
# file (it does so right after the frontend is gone).
_STOP_GRACE_S = 1.0
# A life shorter than this counts as a crash loop: the next start waits twice as long (to 60 s).
_STEADY_S = 60.0
_MAX_DELAY_S = 60.0
# Console lines that say why TorchServe would not start or died (model_server.py's and the
# JVM's own words); its warning about our vmargs is none of them.
_REASON = re.compile(
    r"already running|not found|Error:|Exception|Invalid|Unrecognized|Could not|Terminating due|"
    r"Address already in use|Failed"
)
_NOT_A_REASON = "is using non-default JVM parameters"


def is_supervisor(pid: int | None) -> bool:
    """Whether ``pid`` is a live ``supervise watch`` (not another process that got its pid)."""
    try:
        return alive(pid) and "b4serve.ops.supervise" in psutil.Process(pid or 0).cmdline()
    except psutil.Error:
        return False


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
