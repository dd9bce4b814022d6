"""Starting and restarting TorchServe, the parts that need no Java: TorchServe's snapshot files
and the restart config (b4serve.ops.snapshot), who holds a port (b4serve.ops.ports), the launch
settings (b4serve.ops.launch), and the start that refuses with TorchServe's own words.
Killing and stopping a real server: tests/integration/test_worst_clients.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from b4serve.lab.sandbox import free_ports
from b4serve.ops.launch import PORT_VARIABLES, Launch
from b4serve.ops.ports import port_holder
from b4serve.ops.snapshot import latest_snapshot, prune_snapshots, restart_config, snapshot_models

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "name": "20261201214346949-snapshot.cfg",
    "modelCount": 1,
    "models": {
        "b4": {
            "0e37241d7d4e": {
                "defaultVersion": True,
                "marName": "b4-0e37241d7d4e.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 4,
            }
        }
    },
}


def java_store(value: str) -> str:
    """A value as java.util.Properties.store writes it (what TorchServe's snapshots hold)."""
    out = []
    for char in value:
        if char in "\\=:#!":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) > 0x7E:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def write_snapshot(directory: Path, name: str, models: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = json.dumps(models, indent=2)  # Gson's pretty printing: newlines inside the value
    header = "#Saving snapshot\nmodel_store=/srv/ms\nvmargs=-Xmx2g -XX\\:+ExitOnOutOfMemoryError\n"
    path.write_text(f"{header}model_snapshot={java_store(text)}\n", encoding="latin-1")
    return path


def test_the_snapshot_models_are_read_as_java_wrote_them(tmp_path: Path) -> None:
    models = json.loads(json.dumps(MODELS))
    models["models"]["b4"]["0e37241d7d4e"]["marName"] = 'b4 "ü\\x".mar'  # quotes, escapes
    snapshot = write_snapshot(tmp_path, "20261201214346949-snapshot.cfg", models)
    assert "\\:" in snapshot.read_text(encoding="latin-1")  # escaped as Java does
    assert snapshot_models(snapshot) == models


def test_the_restart_config_is_ours_with_the_snapshots_models(tmp_path: Path) -> None:
    base = tmp_path / "config.properties"
    base.write_text("# ours\nvmargs=-Xmx2560m -XX:+ExitOnOutOfMemoryError\njob_queue_size=32\n")
    models = json.loads(json.dumps(MODELS))
    models["models"]["b4"]["0e37241d7d4e"]["marName"] = 'odd\\name".mar'
    snapshot = write_snapshot(tmp_path / "config", "20261201214346949-snapshot.cfg", models)
    out = restart_config(base, snapshot, tmp_path / "restart.properties")
    lines = out.read_text().splitlines()
    assert lines[:3] == base.read_text().splitlines()  # every setting from config.properties
    (value,) = [line.split("=", 1)[1] for line in lines if line.startswith("model_snapshot=")]
    # One line, which Properties.load turns back into the JSON TorchServe wrote
    written = out.with_name("as_java_reads.cfg")
    written.write_text(f"model_snapshot={value}\n")
    assert snapshot_models(written) == models
    assert restart_config(base, None, out).read_text() == base.read_text()  # none registered yet


def test_the_latest_snapshot_is_newest_by_its_name_and_not_older_than_asked(
    tmp_path: Path,
) -> None:
    for name in (
        "20261201214302151-startup.cfg",
        "20261201214346949-snapshot.cfg",
        "20261201214307284-snapshot.cfg",
    ):
        write_snapshot(tmp_path, name, MODELS)
    (tmp_path / "notes.cfg").write_text("not TorchServe's")
    assert latest_snapshot(tmp_path).name == "20261201214346949-snapshot.cfg"
    assert latest_snapshot(tmp_path, since=time.time() + 60) is None
    assert latest_snapshot(tmp_path / "missing") is None
    # a frontend killed while writing its snapshot leaves it cut short: the one before it counts
    newest = tmp_path / "20261201214400000-startup.cfg"
    newest.write_text("inference_address=http://127.0.0.1:8080\n")
    assert latest_snapshot(tmp_path).name == "20261201214346949-snapshot.cfg"
    newest.write_text('model_snapshot={"name":"startup.cfg","modelCount":1,"mod')
    assert latest_snapshot(tmp_path).name == "20261201214346949-snapshot.cfg"
    newest.unlink()
    prune_snapshots(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("2*.cfg")) == [
        "20261201214307284-snapshot.cfg",
        "20261201214346949-snapshot.cfg",
    ]


def test_a_held_port_is_named_with_its_process() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        holder = port_holder("127.0.0.1", port)
    assert holder is not None and holder.text.startswith(f"pid {os.getpid()} (")
    assert holder.stop is None  # not a TorchServe: no stop command to suggest
    assert port_holder("127.0.0.1", port) is None  # closed: free again


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """scripts/env.sh's variables for a server under ``tmp_path`` on free ports."""
    ports = dict(zip(PORT_VARIABLES, map(str, free_ports(len(PORT_VARIABLES))), strict=True))
    return {
        **os.environ,
        **ports,
        "VENV": os.environ.get("VENV", str(ROOT / ".venv")),
        "B4_HOST": "127.0.0.1",
        "B4_RUN_DIR": str(tmp_path / "run"),
        "B4_LOG_DIR": str(tmp_path / "run" / "logs"),
        "B4_TMPDIR": str(tmp_path / "tmp"),
        "B4_MODEL_STORE": str(tmp_path / "model-store"),
        "B4_TS_CONFIG": str(ROOT / "config.properties"),
        "B4_LOG_CONFIG": str(ROOT / "log4j.properties"),
        "B4_METRICS_CONFIG": str(ROOT / "metrics.yaml"),
        "B4_PROTOCOL": "raw",
        "B4_ENVELOPE": "",
        "PYTHONPATH": str(ROOT),
    }


def supervise_start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "b4serve.ops.supervise", "start", "--timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_start_refuses_a_taken_port_naming_who_holds_it(env: dict[str, str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(env["B4_METRICS_PORT"])))
        listener.listen()
        result = supervise_start(env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: port {env['B4_METRICS_PORT']} (B4_METRICS_PORT) is already "
        f"in use by pid {os.getpid()} ("
    )
    assert "torchserve --stop" in line and "B4_*_PORT" in line
    assert not Path(env["B4_RUN_DIR"], "supervisor.pid").exists()  # nothing was started


@pytest.fixture
def stand_in(env: dict[str, str]) -> Iterator[int]:
    """A live process whose command line names TorchServe's main class, in the pid file of
    ``env``'s TMPDIR: what a running server looks like to `torchserve --start`."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "org.pytorch.serve.ModelServer"],
        cwd="/",
    )
    Path(env["B4_TMPDIR"]).mkdir(parents=True)
    (Path(env["B4_TMPDIR"]) / ".model_server.pid").write_text(str(process.pid))
    yield process.pid
    process.kill()
    process.wait()


def test_start_quotes_why_torchserve_refused_and_who_holds_its_pid_file(
    env: dict[str, str], stand_in: int
) -> None:
    started = time.monotonic()
    result = supervise_start(env)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: TorchServe refused to start: TorchServe is already running")
    assert f"pid {stand_in}" in error and ".model_server.pid" in error and "B4_TMPDIR" in error
    assert time.monotonic() - started < 60  # told at once, not after a timeout
    assert "TorchServe is already running" in Path(env["B4_LOG_DIR"], "console.log").read_text()


def test_launch_needs_env_sh_variables() -> None:
    with pytest.raises(Exception, match="B4_INFERENCE_PORT is not set: run this through scripts/"):
        Launch.from_env({})
