"""--runtime auto on the real deploy: the session server was deployed with the defaults, so it
serves what auto chose on this host, and its archive, its worker and its metrics say so; the
test times the chosen runtime and fp32 TorchScript itself, apart from the record."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from b4serve.build.parity import TOLERANCES
from b4serve.build.runtimes import MIN_GAIN, Candidate, check_set
from b4serve.lab.sandbox import ROOT, Server
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import REFERENCE, RUNTIMES, host_caps, load_runtime
from b4serve.serving.telemetry import parse_prometheus

pytestmark = pytest.mark.integration


def test_the_default_deploy_serves_the_runtime_auto_chose_and_records_why(
    server: Server,
) -> None:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    cache = Path(server.env["B4_CACHE_DIR"])
    extra = cache / "build" / version / "extra"
    config = ModelConfig.load(extra)
    choice = config.runtime_choice
    assert choice["mode"] == "auto" and choice["chosen"] == config.runtime
    assert choice["host"] == host_caps().summary() and choice["cpu"] == host_caps().kind()
    assert list((cache / "runtime-choice").glob("*.json")), "the choice was not cached"
    for candidate in choice["candidates"]:  # every one proven or excluded with its reason
        if candidate["max_abs_diff"] is None:
            assert candidate["excluded"], candidate
        elif candidate["precision"] == "fp32" and not candidate["excluded"]:
            assert candidate["max_abs_diff"] <= TOLERANCES["fp32"]
    chosen, reference = time_side_by_side(server.classifier(version), config, extra.parent)
    print(f"\n[integration] timed here: {config.runtime} {chosen.line()}; fp32 TorchScript "
          f"{reference.line()}; the record: {choice['why']}")  # fmt: skip
    if config.runtime != REFERENCE:  # chosen as faster: here too it is not slower, within noise
        noise = max(MIN_GAIN, chosen.spread, reference.spread)
        assert chosen.images_per_s >= reference.images_per_s * (1 - noise), (chosen, reference)
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
    assert server.post(encode_npy(np.zeros((64, 64, 3), np.uint8))).status_code == 200
    # The frontend keeps each series until it stops: versions the session served earlier (other
    # runtimes, pinned by other tests) are there too; none of them fell back.
    expected = (config.runtime, config.runtime, "none")
    deadline = time.monotonic() + 15  # the frontend reads metric lines from the worker's stdout
    while True:
        page = requests.get(f"{server.endpoints.metrics_url}/metrics", timeout=10).text
        labels = {(s.labels["Runtime"], s.labels["Recorded"], s.labels["Fallback"])
                  for s in parse_prometheus(page)
                  if s.name == "b4_runtime" and s.labels.get("ModelName") == "b4"}  # fmt: skip
        if expected in labels or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected in labels, labels
    assert {fallback for _, _, fallback in labels} == {"none"}


def time_side_by_side(
    chosen: Classifier, config: ModelConfig, build: Path, rounds: int = 12
) -> tuple[Candidate, Candidate]:
    """``chosen`` and fp32 TorchScript as the worker loads it, timed here: ``rounds`` forwards
    each at micro-batch 1, interleaved (a busy spell hits both)."""
    cpu = torch.device("cpu")
    plain = dataclasses.replace(config, runtime=REFERENCE)
    reference = Classifier(load_runtime(REFERENCE, build, plain, cpu), plain, cpu)
    images = [tensor for _, tensor in check_set(config)]
    seconds: dict[str, list[float]] = {"chosen": [], "reference": []}
    for model in (chosen, reference):
        model.warm_up()
    for index in range(rounds):
        for name, model in (("chosen", chosen), ("reference", reference)):
            time.sleep(0.05)  # the other runtime's threads stop spinning
            started = time.perf_counter()
            model.predict([images[index % len(images)]])
            seconds[name].append(time.perf_counter() - started)
    return (
        Candidate(config.runtime, seconds=seconds["chosen"]),
        Candidate(REFERENCE, "fp32", seconds=seconds["reference"]),
    )
