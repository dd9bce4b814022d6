"""Health check: is the server up, which version serves, are its workers alive, what failed last.

``python -m b4serve.ops.health`` (or ``scripts/health.sh``) prints a short report and exits 0 when
the server answers ``/ping`` and the default version has a READY worker, 1 otherwise; ``--json``
prints the same as JSON for a monitoring system.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from b4serve.ops.endpoints import REPO_ROOT, Endpoints
from b4serve.ops.keys import KeyFile, KeyFileError
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.allocator import retained_by_worker
from b4serve.serving.telemetry import parse_prometheus, request_counts

__all__ = [
    "Health", "WorkerState", "check_health", "last_errors", "log_tail", "retained_mb",
    "worker_rss_mb",
]  # fmt: skip

# What a failed request (the handler's "request i of n failed: ...") or a dying worker (its
# stderr, tracebacks, TorchServe's own warnings) leaves in model_log.log.
_ERROR_MARKERS = (
    " failed: ",
    "-stderr",
    "[WARN",
    "[ERROR",
    "Traceback",
    "died",
    "Load model failed",
)


@dataclass
class WorkerState:
    """One worker of one version, as describe-model reports it, with its resident memory and
    the memory it last logged it retained (resident less what malloc keeps free for reuse)."""

    version: str
    id: str
    pid: int | None
    status: str
    rss_mb: float | None
    started: str
    retained_mb: float | None = None


@dataclass
class Health:
    """Everything the report shows; ``problems`` is empty when all is well."""

    server: str
    model: str
    default_version: str | None = None
    versions: list[str] = field(default_factory=list)
    workers: list[WorkerState] = field(default_factory=list)
    requests: dict[str, float] = field(default_factory=dict)
    last_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def worker_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a worker process in MiB; None if it is gone or not ours to read."""
    if pid is None:
        return None
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def log_tail(log_dir: Path | None, tail_bytes: int = 1 << 20) -> list[str]:
    """The whole lines of the model log's last ``tail_bytes`` (the end is what matters)."""
    path = log_dir / "model_log.log" if log_dir else None
    if path is None or not path.is_file():
        return []
    with open(path, "rb") as stream:
        start = max(0, path.stat().st_size - tail_bytes)
        stream.seek(start)
        lines = stream.read().decode(errors="replace").splitlines()
    return lines[1:] if start else lines  # the first began before the tail


def last_errors(lines: Sequence[str], count: int) -> list[str]:
    """The latest ``count`` warning, error and worker-death lines of model log ``lines``."""
    if count <= 0:
        return []
    return [line for line in lines if any(m in line for m in _ERROR_MARKERS)][-count:]


def retained_mb(latest: dict[str, float], worker_id: str) -> float | None:
    """What worker ``worker_id`` (describe-model's id, e.g. ``9000``) last logged it retained,
    from the workers' latest figures (:func:`~b4serve.serving.allocator.retained_by_worker`)."""
    return next((mb for name, mb in latest.items() if name.startswith(f"W-{worker_id}-")), None)


def check_health(endpoints: Endpoints, log_dir: Path | None = None, errors: int = 5) -> Health:
    """Ask the server about itself; anything wrong goes into ``problems`` rather than raising."""
    health = Health(server=endpoints.inference_url, model=endpoints.model_name)
    log = log_tail(log_dir)
    health.last_errors = last_errors(log, errors)
    api = ManagementAPI(endpoints, KeyFile.from_endpoints(endpoints), timeout_s=10)
    try:
        if not api.ping():
            health.problems.append(f"server at {endpoints.inference_url} does not answer /ping")
            return health
        described = api.versions(endpoints.model_name)
        health.default_version = api.default_version(endpoints.model_name) if described else None
    except (requests.RequestException, KeyFileError) as error:
        health.problems.append(f"cannot query the server: {error}")
        return health
    health.versions = [entry["modelVersion"] for entry in described]
    retained = retained_by_worker(log)  # the log's tail, read once for every worker
    health.workers = [
        _worker(entry["modelVersion"], worker, retained)
        for entry in described
        for worker in entry.get("workers", [])
    ]
    if health.default_version is None:
        health.problems.append(f"model {endpoints.model_name} is not registered")
    elif not any(
        w.version == health.default_version and w.status == "READY" for w in health.workers
    ):
        health.problems.append(f"no READY worker for {health.model} {health.default_version}")
    health.requests = _request_counts(endpoints)
    return health


def _worker(version: str, described: dict[str, Any], retained: dict[str, float]) -> WorkerState:
    pid = described.get("pid")
    pid = int(pid) if isinstance(pid, int) or (isinstance(pid, str) and pid.isdigit()) else None
    worker_id = str(described.get("id", "?"))
    return WorkerState(
        version=version,
        id=worker_id,
        pid=pid,
        status=str(described.get("status", "?")),
        rss_mb=worker_rss_mb(pid),
        started=str(described.get("startTime", "")),
        retained_mb=retained_mb(retained, worker_id),
    )


def _request_counts(endpoints: Endpoints) -> dict[str, float]:
    """Requests by outcome from the metrics API; empty when it cannot be read."""
    try:
        response = requests.get(f"{endpoints.metrics_url}/metrics", timeout=10)
    except requests.RequestException:
        return {}
    if response.status_code != 200:
        return {}
    return request_counts(parse_prometheus(response.text), endpoints.model_name)


def format_report(health: Health) -> str:
    """The human-readable report."""
    lines = [
        f"status   {'healthy' if health.healthy else 'UNHEALTHY'}",
        f"server   {health.server}",
        f"model    {health.model}: default version {health.default_version or '-'}"
        f" (registered: {', '.join(health.versions) or 'none'})",
    ]
    for worker in health.workers:
        memory = f"{worker.rss_mb:.0f} MiB" if worker.rss_mb is not None else "memory unknown"
        if worker.retained_mb is not None:
            memory += f" (retained {worker.retained_mb:.0f})"
        lines.append(
            f"worker   {worker.version} {worker.id}: {worker.status}, pid {worker.pid}, "
            f"{memory}, since {worker.started}"
        )
    if health.requests:
        ok = health.requests.get("ok", 0.0)
        failed = {k: v for k, v in sorted(health.requests.items()) if k != "ok"}
        detail = ", ".join(f"{kind} {count:.0f}" for kind, count in failed.items()) or "none"
        lines.append(f"requests {ok:.0f} ok; failed: {detail} (since the server started)")
    lines += [f"problem  {problem}" for problem in health.problems]
    if health.last_errors:
        lines.append("last errors in model_log.log:")
        lines += [f"  {line}" for line in health.last_errors]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b4serve.ops.health", description=__doc__)
    parser.add_argument(
        "--log-dir", type=Path, default=_default_log_dir(), help="TorchServe's log dir"
    )
    parser.add_argument("--errors", type=int, default=5, help="how many recent errors to show")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = parser.parse_args(argv)
    health = check_health(Endpoints.from_env(), args.log_dir, args.errors)
    if args.json:
        print(json.dumps({**asdict(health), "healthy": health.healthy}, indent=2))
    else:
        print(format_report(health))
    return 0 if health.healthy else 1


def _default_log_dir() -> Path:
    run_dir = Path(os.environ.get("B4_RUN_DIR") or REPO_ROOT / ".run")  # as scripts/env.sh
    return Path(os.environ.get("B4_LOG_DIR") or run_dir / "logs")


if __name__ == "__main__":
    sys.exit(main())
