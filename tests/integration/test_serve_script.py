"""scripts/serve.sh, what systemd runs: one life of a real TorchServe (no model registered, so
no worker to load), exit 1 when the frontend died (systemd restarts it), 0 when stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from b4serve.lab.sandbox import ROOT, server_env
from b4serve.ops.ports import alive, listening, pid_from_file

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    environment = server_env(tmp_path)
    yield environment
    pid = pid_from_file(Path(environment["B4_TMPDIR"]) / ".model_server.pid")
    if alive(pid):  # a failed test must not leave its server behind
        os.kill(pid or 0, signal.SIGKILL)


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """Start scripts/serve.sh; return it and its frontend's pid once the frontend listens."""
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "serve.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not listening("127.0.0.1", int(env["B4_INFERENCE_PORT"])):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "TorchServe did not listen within 120 s"
        time.sleep(0.2)
    pid = pid_from_file(Path(env["B4_TMPDIR"]) / ".model_server.pid")
    assert alive(pid)
    return process, pid or 0


def test_serve_exits_1_when_the_frontend_dies_and_0_when_stopped(env: dict[str, str]) -> None:
    process, frontend = serve(env)
    os.kill(frontend, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output  # systemd's Restart=on-failure starts it again
    assert f"TorchServe (pid {frontend}) died" in output

    process, frontend = serve(env)  # systemctl stop: SIGTERM to serve.sh alone (KillMode=mixed)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert f"TorchServe (pid {frontend}) stopped" in output
    assert not alive(frontend)
