"""Operating the real server: Prometheus metrics, the health check, and a bounded soak.

Runs against the integration session's server (30-second keys), before tests/test_server.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import ROOT, Server, free_ports
from b4serve.lab.soak import run_soak
from b4serve.serving.codec import encode_npy
from b4serve.serving.telemetry import Sample, parse_prometheus, request_counts

pytestmark = pytest.mark.integration


def scrape(server: Server) -> list[Sample]:
    response = requests.get(f"{server.endpoints.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text  # the metrics API takes no token
    return parse_prometheus(response.text)


def total(samples: list[Sample], name: str) -> float:
    return sum(s.value for s in samples if s.name == name and s.labels.get("ModelName") == "b4")


def test_custom_metrics_count_requests_by_outcome_and_time_each_stage(server: Server) -> None:
    before = scrape(server)
    images, _ = generate_images(per_class=1, seed=5)
    bodies = [encode_npy(image) for image in images[:3]]
    bodies += [encode_npy(np.full((8, 8, 3), np.nan, np.float32)), b"junk, not .npy"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: server.post(body), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 400, 415], [r.text[:200] for r in responses]

    def moved() -> dict[str, float]:
        after = request_counts(scrape(server), "b4")
        counts = request_counts(before, "b4")
        return {kind: after[kind] - counts.get(kind, 0.0) for kind in after}

    deadline = time.monotonic() + 60  # the frontend reads metric lines from the worker's stdout
    while moved() != {"ok": 3.0, "InvalidInput": 1.0, "UnsupportedMediaType": 1.0}:
        assert time.monotonic() < deadline, moved()
        time.sleep(0.5)
    after = scrape(server)
    assert total(after, "b4_decode_seconds_count") - total(before, "b4_decode_seconds_count") == 5
    images_run = total(after, "b4_images_per_forward_sum") - total(
        before, "b4_images_per_forward_sum"
    )
    assert images_run == 3  # only the good ones reach the model
    forwards = total(after, "b4_forward_seconds_count") - total(before, "b4_forward_seconds_count")
    model_time = total(after, "b4_forward_seconds_sum") - total(before, "b4_forward_seconds_sum")
    assert 1 <= forwards <= 3 and 0 < model_time < 60
    assert any(s.name == "ts_inference_requests_total" for s in after)  # frontend metrics kept


def _health(server: Server, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "health.sh"), *args], env={**server.env, **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_health_check_reports_version_workers_requests_and_last_errors(server: Server) -> None:
    assert server.post(b"not an array").status_code == 415
    deadline = time.monotonic() + 60  # the model log is written asynchronously
    while "UnsupportedMediaType" not in (result := _health(server, "--errors", "20")).stdout:
        assert time.monotonic() < deadline, result.stdout
        time.sleep(0.5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("status   healthy")
    report = json.loads(_health(server, "--json").stdout)
    assert report["healthy"] and report["default_version"] in report["versions"]
    ready = [w for w in report["workers"] if w["status"] == "READY"]
    assert ready and all(w["pid"] and w["rss_mb"] > 100 for w in ready)
    assert all(0 < w["retained_mb"] < w["rss_mb"] for w in ready)  # logged by the worker
    assert report["requests"].get("ok", 0) >= 1
    assert any("request 0 of 1 failed: 415 UnsupportedMediaType" in line
               for line in report["last_errors"])  # fmt: skip


def test_health_check_fails_when_no_server_answers(server: Server, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    result = _health(server, B4_INFERENCE_PORT=str(port))
    assert result.returncode == 1
    assert result.stdout.startswith("status   UNHEALTHY")
    assert f"127.0.0.1:{port} does not answer /ping" in result.stdout


def test_short_soak_loses_nothing_keeps_memory_flat_and_outlives_a_key(server: Server) -> None:
    # CI-sized: 30 s at 8 clients, after a warm-up until memory settles (about a minute here),
    # spans one expiry of the session's 30-second keys.
    report = run_soak(server.endpoints, server.log_dir, duration_s=30, clients=8, warmup_s=15,
                      bad_every=16, say=print)  # fmt: skip
    print("\n" + report.table())
    assert report.problems(require_key_renewal=True) == []
    # every input answered exactly once, by the server's own log (how many were sent in 30 s
    # depends on the machine and its load: at least one round of 32)
    assert report.sent >= 32 and report.handled == report.sent
    assert report.refused_as_expected == report.sent // 16  # rounds of 32: 2 bad bodies in each
    assert report.worker_retained_start_mb > 100 and report.frontend_retained_start_mb > 50
    # the worker logged what it retains; the frontend was read after a full collection (jcmd:
    # the JDK the v2 plugin needs has it)
    assert report.worker_logged and report.worker_rss_peak_mb > report.worker_retained_start_mb
    assert report.frontend_collected and report.frontend_heap_start_mb > 5
