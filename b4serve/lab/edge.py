"""A throwaway edge (scripts/edge.sh, HAProxy) in front of sandboxed servers, for the tests.

It listens on a free loopback port, keeps its config, maps and admin socket in its own
directory, and reads its replicas from a file naming each :class:`~b4serve.lab.sandbox.Server`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from b4serve.lab.sandbox import ROOT, Server, free_ports

__all__ = ["Edge", "replicas_file"]


def replicas_file(path: Path, servers: Mapping[str, Server]) -> Path:
    """Write B4_EDGE_REPLICAS's file for ``servers`` (name -> server) and return its path."""
    lines = [
        " ".join(
            [
                name,
                server.env["B4_HOST"],
                server.env["B4_INFERENCE_PORT"],
                server.env["B4_V2_PORT"],
                server.env["B4_MANAGEMENT_PORT"],
                server.env["B4_KEY_FILE"],
            ]
        )
        for name, server in servers.items()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Edge:
    """An edge's environment and the scripts/edge.sh commands the tests need."""

    env: dict[str, str]

    @classmethod
    def in_front_of(cls, servers: Mapping[str, Server], root: Path, **settings: str) -> Edge:
        """An edge (not started) for ``servers``; ``settings`` override B4_EDGE_* defaults."""
        root.mkdir(parents=True, exist_ok=True)
        first = next(iter(servers.values()))
        env = {
            **first.env,
            "B4_EDGE_PORT": str(free_ports(1)[0]),
            "B4_EDGE_BIND": "127.0.0.1",
            "B4_EDGE_DIR": str(root / "edge"),
            "B4_EDGE_REPLICAS": str(replicas_file(root / "replicas", servers)),
            **settings,
        }
        return cls(env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['B4_EDGE_PORT']}"

    @property
    def dir(self) -> Path:
        return Path(self.env["B4_EDGE_DIR"])

    def run(self, *args: str, timeout: float = 300) -> str:
        """scripts/edge.sh ``args``: its stdout; raises with its stderr if it fails."""
        done = subprocess.run(
            [str(ROOT / "scripts" / "edge.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"edge.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        """Start (or reload) HAProxy and its key keeper."""
        self.run()

    def stop(self) -> None:
        self.run("--stop", timeout=60)

    def issue(self, name: str) -> str:
        """A new credential for ``name``."""
        return self.run("--issue", name).strip()

    def keeper_log(self) -> str:
        path = self.dir / "keeper.log"
        return path.read_text(encoding="utf-8") if path.is_file() else ""
