"""How this checkout's TorchServe is started: command, environment, files and ports.

One home for it, used by every way the server runs: deploy's supervisor on a bare host and
``scripts/serve.sh`` under systemd (b4serve.ops.supervise). Settings come from the ``B4_*``
variables ``scripts/env.sh`` exports.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENVELOPES", "PORT_VARIABLES", "Launch", "StartError"]

# Every port TorchServe binds, by the variable that sets it.
PORT_VARIABLES = (
    "B4_INFERENCE_PORT",
    "B4_MANAGEMENT_PORT",
    "B4_METRICS_PORT",
    "B4_GRPC_INFERENCE_PORT",
    "B4_GRPC_MANAGEMENT_PORT",
)
# TorchServe's KServe envelopes (B4_ENVELOPE): none by default; the legacy KServe runtime's ones.
ENVELOPES = ("", "kserve", "kservev2")


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
