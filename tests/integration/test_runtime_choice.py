"""--runtime auto on the real deploy: the session server was deployed with the defaults, so it
serves what auto chose on this host, and its archive, its worker and its metrics say so."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.sandbox import ROOT, Server
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.runtime import RUNTIMES, host_caps
from b4serve.serving.telemetry import parse_prometheus

pytestmark = pytest.mark.integration


def test_the_default_deploy_serves_the_fastest_runtime_that_passed_and_records_why(
    server: Server,
) -> None:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    extra = Path(server.env["B4_CACHE_DIR"]) / "build" / version / "extra"
    config = ModelConfig.load(extra)
    choice = config.runtime_choice
    assert choice["mode"] == "auto" and choice["chosen"] == config.runtime
    assert choice["host"] == host_caps().summary()
    eligible = [c for c in choice["candidates"] if not c["excluded"] and c["tta_images_per_s"]]
    fastest = max(eligible, key=lambda c: c["tta_images_per_s"])
    assert config.runtime == fastest["runtime"]
    for candidate in choice["candidates"]:  # every one proven or excluded with its reason
        if candidate["max_abs_diff"] is None:
            assert candidate["excluded"], candidate
        elif candidate["precision"] == "fp32" and not candidate["excluded"]:
            assert candidate["max_abs_diff"] <= 1e-4
    # model.pt always travels (the fallback), with the chosen runtime's own file
    names = zipfile.ZipFile(Path(server.env["B4_MODEL_STORE"]) / f"b4-{version}.mar").namelist()
    assert "model.pt" in names and RUNTIMES[config.runtime].file in names
    described = subprocess.run(
        [sys.executable, "-m", "b4serve.build.runtimes", "describe", str(extra)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert described.startswith(f"runtime: {config.runtime} (auto, chosen in ")
    print(f"\n[integration] {described}")  # what auto cost this deploy, for the report

    # the worker loaded that runtime, without falling back, and labels its batches so
    log = (server.log_dir / "model_log.log").read_text(errors="replace")
    assert f"{config.runtime} runtime on cpu" in log and "RUNTIME FALLBACK" not in log
    headers = {"Content-Type": "application/octet-stream", **server.keys.auth_headers("inference")}
    body = encode_npy(np.zeros((64, 64, 3), np.uint8))
    assert requests.post(server.endpoints.predictions_url, data=body, headers=headers,
                         timeout=120).status_code == 200  # fmt: skip
    deadline = time.monotonic() + 15  # the frontend reads metric lines from the worker's stdout
    while True:
        page = requests.get(f"{server.endpoints.metrics_url}/metrics", timeout=10).text
        labels = [s.labels for s in parse_prometheus(page) if s.name == "b4_runtime"]
        if labels or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {(x["Runtime"], x["Recorded"], x["Fallback"]) for x in labels} == {
        (config.runtime, config.runtime, "none")
    }
