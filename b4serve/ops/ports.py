"""Who holds a port or a pid file, named so that the user can stop it.

TorchServe itself says only "Address already in use" or "already running"; deploy names the
process (a TorchServe with its run dir and TMPDIR, or any other program) and how to stop it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["Holder", "alive", "describe", "listening", "pid_from_file", "port_holder"]

_TORCHSERVE_MAIN = "org.pytorch.serve.ModelServer"  # what model_server.py looks for, too


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


def listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0
