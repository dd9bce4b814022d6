"""scripts/deploy.sh checks the frontend's memory budget with what it will register, and refuses
before starting anything when config.properties cannot hold that worst case."""

from __future__ import annotations

import subprocess
from pathlib import Path

from b4serve.lab.sandbox import server_env

ROOT = Path(__file__).resolve().parents[2]


def deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    isolated = {**server_env(tmp_path), "B4_V2_PLUGIN": "0", **env}
    return subprocess.run([str(ROOT / "scripts" / "deploy.sh")], env=isolated,
                           capture_output=True, text=True, timeout=300)  # fmt: skip


def test_gpu_defaults_that_the_heap_cannot_hold_are_refused_before_starting(
    tmp_path: Path,
) -> None:
    # a simulated GPU (B4_GPUS): deploy would register 2 workers x batches of 64
    result = deploy(tmp_path, B4_GPUS="1")
    assert result.returncode == 1
    assert "with 2 worker(s) x batch size 64: raise -Xmx, or lower the batch size" in (
        result.stderr
    )
    assert not (tmp_path / "run").exists()  # refused before starting anything
    assert "DEMO checkpoint" not in result.stderr  # or building anything
