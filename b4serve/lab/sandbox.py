"""A throwaway TorchServe (Java frontend + Python workers) deployed by scripts/deploy.sh.

Each one gets free loopback ports, its own run dir, model store, log dir and TMPDIR, so it never
touches a server the user runs. The integration tests and the benchmark use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import requests
import torch

from b4serve.ops.endpoints import Endpoints
from b4serve.ops.keys import KeyFile
from b4serve.ops.ports import pid_from_file
from b4serve.ops.supervise import is_supervisor
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import load_model

ROOT = Path(__file__).resolve().parents[2]
DEMO_CACHE = ROOT / ".cache" / "demo"  # shared with scripts/deploy.sh: built once per checkout


__all__ = ["Server", "exit_on_sigterm", "free_ports", "post", "server_env"]

OCTET_STREAM = {"Content-Type": "application/octet-stream"}


def post(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 120
) -> requests.Response:
    """POST ``body`` to ``url`` as ``.npy`` bytes unless ``headers`` name another content type:
    the tests' one way to send a request by hand (the client, b4serve.client, for many)."""
    return requests.post(url, data=body, headers={**OCTET_STREAM, **(headers or {})},
                         timeout=timeout)  # fmt: skip


def exit_on_sigterm() -> None:
    """Make SIGTERM exit this process through its ``finally`` blocks, which stop its throwaway
    servers: by default SIGTERM ends Python on the spot and leaves them running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclasses.dataclass
class Server:
    """Where a sandboxed server lives and how to talk to it."""

    env: dict[str, str]
    root: Path

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints.from_env(self.env)

    @functools.cached_property
    def keys(self) -> KeyFile:
        """One KeyFile for every caller: its lock makes concurrent threads that find the key
        expired renew it once. Separate instances would each renew, and each renewal voids the
        key the others just got."""
        return KeyFile.from_endpoints(self.endpoints)

    @property
    def log_dir(self) -> Path:
        return Path(self.env["B4_LOG_DIR"])

    def post(
        self,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        url: str | None = None,
        key: bool = True,
        timeout: float = 120,
    ) -> requests.Response:
        """:func:`post` to ``url`` (default: /predictions/b4) with the inference key, unless
        ``key`` is False; ``headers`` add to those or replace them."""
        auth = self.keys.auth_headers("inference") if key else {}
        return post(url or self.endpoints.predictions_url, body, {**auth, **(headers or {})},
                    timeout)  # fmt: skip

    def probabilities(self, images: Sequence[np.ndarray], model: str = "b4") -> np.ndarray:
        """Each image's probabilities from ``/predictions/<model>``, one request per image (the
        way a user checks a deploy); raises unless every answer is a 200."""
        url = dataclasses.replace(self.endpoints, model_name=model).predictions_url
        responses = [self.post(encode_npy(np.asarray(image)), url=url) for image in images]
        refused = [r for r in responses if r.status_code != 200]
        if refused:
            raise RuntimeError(
                f"{len(refused)} of {len(responses)} refused: {refused[0].text[:300]}"
            )
        return np.array([r.json() for r in responses])

    def classifier(self, version: str) -> Classifier:
        """``version``'s exported build, loaded in this process the way its worker loads it."""
        build = Path(self.env["B4_CACHE_DIR"]) / "build" / version
        config = ModelConfig.load(build / "extra")
        cpu = torch.device("cpu")
        return Classifier(load_model(build, config, cpu).model, config, cpu)

    def deploy(
        self, *args: str, timeout: float = 900, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run scripts/deploy.sh with extra B4_* ``env``; raise with its output on failure."""
        return self._script("deploy.sh", args, timeout, env)

    def build(
        self, *args: str, timeout: float = 900, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run scripts/build_mar.sh (export and archive, no server) the same way: a deploy
        of the same checkpoint and settings afterwards finds the build and exports nothing."""
        return self._script("build_mar.sh", args, timeout, env)

    def _script(
        self, name: str, args: tuple[str, ...], timeout: float, env: dict[str, str]
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(ROOT / "scripts" / name), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{name} {args} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def stop(self) -> None:
        """``torchserve --stop`` with this server's TMPDIR; SIGKILL if that did not work."""
        subprocess.run(
            [str(Path(self.env["VENV"]) / "bin" / "torchserve"), "--stop", "--foreground"],
            env={**self.env, "TMPDIR": self.env["B4_TMPDIR"]},
            cwd=self.env["B4_RUN_DIR"],
            capture_output=True,
            timeout=120,
        )
        frontend = pid_from_file(Path(self.env["B4_TMPDIR"]) / ".model_server.pid")
        if frontend is None:
            return  # stopped; its supervisor ends by itself once the pid file is gone
        # --stop failed: do not leave a server behind. Its supervisor first, or it would start
        # the server again.
        supervisor = pid_from_file(Path(self.env["B4_RUN_DIR"]) / "supervisor.pid")
        for pid in (supervisor if is_supervisor(supervisor) else None, frontend):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def server_env(root: Path, token_expiration_min: float | None = None) -> dict[str, str]:
    """Environment for scripts/deploy.sh: everything under ``root``, the demo cache shared.

    Where ``B4_SANDBOX_BUILDS`` names a directory (the test session sets one), builds are shared
    through it too: a build is keyed by everything it is made of (b4serve/build/identity.py), so
    the servers of one session export each distinct build once.
    """
    inference, management, metrics, v2, grpc_inference, grpc_management = free_ports(6)
    cache = root / "cache"
    cache.mkdir(parents=True)
    DEMO_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "demo").symlink_to(DEMO_CACHE)
    if builds := os.environ.get("B4_SANDBOX_BUILDS"):
        Path(builds).mkdir(parents=True, exist_ok=True)
        (cache / "build").symlink_to(builds)
    return {
        **os.environ,
        "VENV": os.environ.get("VENV", str(ROOT / ".venv")),
        "B4_HOST": "127.0.0.1",
        "B4_INFERENCE_PORT": str(inference),
        "B4_MANAGEMENT_PORT": str(management),
        "B4_METRICS_PORT": str(metrics),
        "B4_V2_PORT": str(v2),
        "B4_GRPC_INFERENCE_PORT": str(grpc_inference),
        "B4_GRPC_MANAGEMENT_PORT": str(grpc_management),
        "B4_RUN_DIR": str(root / "run"),
        "B4_EDGE_DIR": str(root / "run" / "edge"),  # never the caller's (scripts/env.sh exports it)
        "B4_KEY_FILE": str(root / "run" / "key_file.json"),
        "B4_LOG_DIR": str(root / "run" / "logs"),
        "B4_TMPDIR": str(root / "tmp"),
        "B4_MODEL_STORE": str(root / "model-store"),
        "B4_CACHE_DIR": str(cache),
        "B4_TOKEN_EXPIRATION_MIN": str(token_expiration_min or ""),
    }
