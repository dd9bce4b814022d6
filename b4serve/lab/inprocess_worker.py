"""The real handler driven in-process through TorchServe's worker-side classes, with no frontend.

TorchServe's own model loader builds the ``Service`` a worker builds from an unpacked archive;
``Service.predict`` takes the request list a worker receives from the frontend and returns the
bytes it sends back, which :func:`decode_replies` reads. This is the worker's whole code path
without Java or sockets: the GPU check runs it on a machine that has no Java.

The handler module is imported by name (``handler``), so the repository root must be on
``sys.path``, as it is for the tests and under ``scripts/env.sh``.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from b4serve.serving.config import ModelConfig

__all__ = ["ROOT", "WorkerReply", "decode_replies", "load_service", "request", "unpack_archive"]

ROOT = Path(__file__).resolve().parents[2]


def unpack_archive(
    directory: Path, model_file: Path, config: ModelConfig, *, version: str = "1"
) -> Path:
    """Lay ``directory`` out as TorchServe unpacks an archive: the model file, its metadata,
    ``handler.py`` and ``MAR-INF/MANIFEST.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, directory / model_file.name)
    config.save(directory)
    shutil.copy(ROOT / "handler.py", directory / "handler.py")
    manifest = {
        "runtime": "python",
        "model": {"modelName": "b4", "serializedFile": model_file.name, "handler": "handler.py",
                  "modelVersion": version},
    }  # fmt: skip
    (directory / "MAR-INF").mkdir(exist_ok=True)
    (directory / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return directory


def load_service(
    model_dir: Path,
    *,
    gpu_id: int | None = None,
    batch_size: int = 4,
    envelope: str | None = None,
) -> Any:
    """TorchServe's ``Service`` for the unpacked archive in ``model_dir``, initialised as a
    worker initialises it (on GPU ``gpu_id`` when given), with the metrics config we ship."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    loader = ModelLoaderFactory.get_model_loader()
    service = loader.load(
        "b4", str(model_dir), "handler.py", gpu_id, batch_size, envelope=envelope,
        metrics_cache=metrics,
    )  # fmt: skip
    service.cl_socket = None  # the worker sets its frontend socket here; only streaming uses it
    return service


def request(
    index: int,
    body: object,
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One request as the frontend hands it to a worker (``decode_input_request=false``)."""
    return {
        "requestId": f"req-{index}".encode(),
        "parameters": [{"name": "body", "contentType": content_type, "value": body}],
        "headers": [
            {"name": name.encode(), "value": value.encode()}
            for name, value in (headers or {}).items()
        ],
    }


@dataclass(frozen=True)
class WorkerReply:
    """One request's answer in a worker's prediction message."""

    request_id: str
    content_type: str
    status: int
    phrase: str
    headers: dict[str, str]
    body: bytes


def decode_replies(message: bytes) -> list[WorkerReply]:
    """The per-request answers in a worker's prediction message (TorchServe 0.12's format)."""
    offset = 0

    def integer() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def blob() -> bytes:
        nonlocal offset
        size = integer()
        offset += size
        return message[offset - size : offset]

    integer(), blob()  # the batch's status code and message
    replies = []
    while (size := integer()) != -1:  # -1 ends the list
        offset += size
        request_id = message[offset - size : offset].decode()
        content_type, status, phrase = blob().decode(), integer(), blob().decode()
        headers = {blob().decode(): blob().decode() for _ in range(integer())}
        replies.append(WorkerReply(request_id, content_type, status, phrase, headers, blob()))
    return replies
