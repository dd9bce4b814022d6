"""Where TorchServe listens and where its key file lives, read from ``B4_*`` env vars."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast, get_args

from b4serve.serving.protocol import Protocol

__all__ = ["REPO_ROOT", "Endpoints"]

REPO_ROOT = Path(__file__).resolve().parents[2]

# The shell scripts source the same names with the same defaults; keep the two in step.
_DEFAULTS = {
    "B4_HOST": "127.0.0.1",
    "B4_INFERENCE_PORT": "8080",
    "B4_MANAGEMENT_PORT": "8081",
    "B4_METRICS_PORT": "8082",
    "B4_V2_PORT": "8083",
    "B4_MODEL_NAME": "b4",
    "B4_PROTOCOL": "raw",
}
PROTOCOLS = get_args(Protocol)


@dataclass(frozen=True)
class Endpoints:
    """Base URLs of the three TorchServe APIs and of the v2 REST API (plugins/v2), the token key
    file and the served model's name."""

    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path
    model_name: str = "b4"
    protocol: Protocol = "raw"  # what deploy's smoke test sends: raw .npy, KServe v1 or v2 JSON
    v2_url: str = "http://127.0.0.1:8083"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Endpoints:
        """Read ``B4_HOST``, ``B4_*_PORT`` (``B4_V2_PORT`` among them), ``B4_RUN_DIR``,
        ``B4_KEY_FILE``, ``B4_MODEL_NAME`` and ``B4_PROTOCOL``.

        An empty variable counts as unset, as ``${VAR:-default}`` does in the shell scripts.
        """
        host = _env(environ, "B4_HOST")
        run_dir = Path(environ.get("B4_RUN_DIR") or REPO_ROOT / ".run")
        return cls(
            inference_url=f"http://{host}:{_port(environ, 'B4_INFERENCE_PORT')}",
            management_url=f"http://{host}:{_port(environ, 'B4_MANAGEMENT_PORT')}",
            metrics_url=f"http://{host}:{_port(environ, 'B4_METRICS_PORT')}",
            key_file=Path(environ.get("B4_KEY_FILE") or run_dir / "key_file.json"),
            model_name=_env(environ, "B4_MODEL_NAME"),
            protocol=_protocol(environ),
            v2_url=f"http://{host}:{_port(environ, 'B4_V2_PORT')}",
        )

    @property
    def predictions_url(self) -> str:
        """``{inference_url}/predictions/{model_name}``, where clients POST ``.npy`` bytes."""
        return f"{self.inference_url.rstrip('/')}/predictions/{self.model_name}"


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name) or _DEFAULTS[name]


def _protocol(environ: Mapping[str, str]) -> Protocol:
    value = _env(environ, "B4_PROTOCOL")
    if value not in PROTOCOLS:
        raise ValueError(f"B4_PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {value!r}")
    return cast(Protocol, value)


def _port(environ: Mapping[str, str], name: str) -> int:
    """The port in env var ``name``, or a ``ValueError`` that names the variable."""
    value = _env(environ, name)
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a port number, got {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name} must be a port number in 1..65535, got {port}")
    return port
