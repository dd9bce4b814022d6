"""End to end against real TorchServe: answers, per-request errors, auth, logging, redeploys, keys.

Tests run in file order against one session server; each says which state it leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from hostile_corpus import ACCEPTED_VARIANTS, HOSTILE

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server
from b4serve.ops.client import RetryPolicy, predict_many
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.pipeline import Classifier

pytestmark = pytest.mark.integration

OCTET = {"Content-Type": "application/octet-stream"}


def serving_version(server: Server) -> str:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    return version


def reference(server: Server) -> Classifier:
    """The served version's exported model and config, run in-process the way the handler does."""
    return server.classifier(serving_version(server))


def post(server: Server, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    auth = server.keys.auth_headers("inference") if headers is None else headers
    return requests.post(
        server.endpoints.predictions_url, data=body, headers={**OCTET, **auth}, timeout=120
    )


def demo_images(count_per_class: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = generate_images(count_per_class, seed)
    return list(images), [int(label) for label in labels]


def _stamp(line: str) -> float:
    """Seconds since the epoch of an access-log line (our log4j pattern)."""
    return datetime.strptime(line[:28], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def test_served_probabilities_equal_in_process_reference(server: Server) -> None:
    images, labels = demo_images(1, seed=777)
    images.append(np.full((120, 90), 200, dtype=np.uint8))  # grey, resized by the handler
    local = reference(server)
    bodies = [encode_npy(image) for image in images]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: post(server, body), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    served = np.array([r.json() for r in responses])
    expected = np.array([o.probabilities for o in local.classify(bodies)])
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert list(served[:6].argmax(axis=1)) == labels  # the demo model knows its colours


def test_batch_with_one_malformed_request_fails_alone(server: Server) -> None:
    images, _ = demo_images(1, seed=778)
    bodies = [encode_npy(images[0]), encode_npy(images[1])[:-10], encode_npy(images[2]),
              encode_npy(images[3])]  # fmt: skip
    log = server.log_dir / "model_log.log"
    log_offset = log.stat().st_size
    # While the worker is busy with a first request, the next four queue up and TorchServe takes
    # them as one batch (batch_size=4) without waiting for max_batch_delay.
    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(post, server, encode_npy(images[4]))
        time.sleep(0.15)
        responses = list(pool.map(lambda body: post(server, body), bodies))
        assert blocker.result().status_code == 200
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    error = responses[1].json()
    assert error["code"] == 400 and error["type"] == "InvalidInput"
    assert "truncated array data" in error["message"]
    expected = reference(server).classify([bodies[0], bodies[2], bodies[3]])
    served = [responses[0].json(), responses[2].json(), responses[3].json()]
    np.testing.assert_allclose(served, [o.probabilities for o in expected], atol=1e-5, rtol=0)
    new_lines = log.read_text(errors="replace")[log_offset:]
    assert "batch of 4 images: 1 failed ['InvalidInput']" in new_lines  # they really shared a batch
    assert post(server, bodies[0]).status_code == 200  # and the worker is still serving


def test_requests_without_a_valid_token_are_refused(server: Server) -> None:
    body = encode_npy(np.zeros((8, 8, 3), np.uint8))
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        refused = post(server, body, headers=headers)
        assert refused.status_code == 400
        assert refused.json()["type"] == "InvalidKeyException"
    ping = requests.get(f"{server.endpoints.inference_url}/ping", timeout=10)
    assert ping.status_code == 400 and ping.json()["type"] == "InvalidKeyException"
    management = requests.get(f"{server.endpoints.management_url}/models", timeout=10)
    assert management.status_code == 400
    authorised = requests.get(
        f"{server.endpoints.inference_url}/ping",
        headers=server.keys.auth_headers("inference"),
        timeout=10,
    )
    assert authorised.status_code == 200 and authorised.json()["status"] == "Healthy"


def test_our_log4j_file_is_the_one_in_force(server: Server) -> None:
    # log4j.properties stamps lines with their UTC offset; TorchServe's built-in config does not
    first = (server.log_dir / "ts_log.log").read_text().splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} \[", first), first
    assert (server.log_dir / "access_log.log").is_file()
    assert "ACCESS_LOG" not in (server.log_dir / "ts_log.log").read_text()


def test_remote_archive_urls_are_refused(server: Server) -> None:
    api = ManagementAPI(server.endpoints, server.keys)
    for url in ("https://example.com/evil.mar", "file:///etc/passwd.mar"):
        response = api.call("POST", "/models", params={"url": url, "model_name": "evil"})
        assert response.status_code == 404, response.text
        assert "does not match any allowed URL" in response.json()["message"]


def test_client_job_spanning_token_expiry_loses_nothing(server: Server) -> None:
    entry = server.keys.read()["inference"]
    key_before = entry.key
    now = datetime.now(timezone.utc)
    if entry.expires is not None and entry.expires > now:
        # start the job shortly before the 1-minute key expires, so the expiry falls inside it
        time.sleep(max(0.0, (entry.expires - now).total_seconds() - 5))
    images, labels = demo_images(4, seed=780)
    started = time.monotonic()
    results = predict_many(images, endpoints=server.endpoints, concurrency=4,
                           retry=RetryPolicy(retries=4, backoff_s=0.2))  # fmt: skip
    took = time.monotonic() - started
    assert [r.ok for r in results] == [True] * len(images)
    assert [int(np.argmax(r.probabilities)) for r in results] == labels
    assert server.keys.read()["inference"].key != key_before, f"no renewal in {took:.0f} s"
    json.dumps([r.to_json() for r in results])  # records are JSON-serialisable for the CLI


def test_deploy_twice_is_idempotent(server: Server) -> None:
    # once the 1-minute management key has expired: deploy must renew it to get this far
    management = server.keys.read()["management"]
    assert management.expires is not None
    time.sleep(max(0.0, (management.expires - datetime.now(timezone.utc)).total_seconds() + 1))
    version = serving_version(server)
    archive = Path(server.env["B4_MODEL_STORE"]) / f"b4-{version}.mar"
    built_at = archive.stat().st_mtime_ns
    result = server.deploy()
    assert "already deployed" in result.stderr
    assert serving_version(server) == version
    assert archive.stat().st_mtime_ns == built_at
    versions = ManagementAPI(server.endpoints, server.keys).versions("b4")
    assert [v["modelVersion"] for v in versions] == [version]


def test_redeploy_under_load_loses_no_request(server: Server, tmp_path: Path) -> None:
    old_version = serving_version(server)
    # A new version from a plain state dict: the demo with halved logits (same top-1, softer),
    # served by the optional ONNX Runtime runtime
    demo = torch.load(Path(server.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt",
                      weights_only=False)  # fmt: skip
    state = {k: v.clone() for k, v in demo["model"].state_dict().items()}
    state["classifier.weight"] *= 0.5
    state["classifier.bias"] *= 0.5
    checkpoint = tmp_path / "sharper.pth"
    torch.save({"state_dict": state, "class_names": demo["class_names"]}, checkpoint)

    images, _ = demo_images(2, seed=779)
    results: list = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.extend(predict_many(images, endpoints=server.endpoints, concurrency=4))

    access_log = server.log_dir / "access_log.log"
    log_offset = access_log.stat().st_size
    worker = threading.Thread(target=load)
    worker.start()
    try:
        deploy = server.deploy("--checkpoint", str(checkpoint), B4_RUNTIME="onnxruntime")
        time.sleep(2)  # keep the load on across the old version's retirement
    finally:
        stop.set()
        worker.join(timeout=300)
    assert "unregistered b4 " + old_version in deploy.stderr
    new_version = serving_version(server)
    assert new_version != old_version
    assert "exported ONNX" in deploy.stderr
    assert len(results) >= 2 * len(images)
    failed = [r for r in results if not r.ok]
    assert failed == [], failed[:3]
    # Not even a retried failure: the old version was drained before it was unregistered. The
    # only refusals allowed are for keys, which expire every minute in this session: each comes
    # within seconds of a renewal (/token), which invalidates the key other requests carry.
    lines = access_log.read_text()[log_offset:].splitlines()
    answers = [line for line in lines if '"POST /predictions/b4 HTTP/1.1"' in line]
    renewals = [_stamp(line) for line in lines if "GET /token?type=inference" in line]
    assert len(answers) >= len(results)
    for line in answers:
        status = line.split('HTTP/1.1" ')[1].split()[0]
        near_renewal = any(abs(_stamp(line) - t) < 5 for t in renewals)
        assert status == "200" or (status == "400" and near_renewal), line
    versions = ManagementAPI(server.endpoints, server.keys).versions("b4")
    assert [v["modelVersion"] for v in versions] == [new_version]
    after = predict_many(images[:2], endpoints=server.endpoints)
    expected = reference(server).classify([encode_npy(image) for image in images[:2]])
    np.testing.assert_allclose([r.probabilities for r in after],
                               [o.probabilities for o in expected], atol=1e-5, rtol=0)  # fmt: skip


def test_worker_dying_while_loading_fails_the_rollout_with_its_log(
    server: Server, tmp_path: Path
) -> None:
    serving = serving_version(server)
    handler = tmp_path / "broken_handler.py"
    handler.write_text(
        "def handle(data, context):\n"
        "    raise RuntimeError('cannot load: weights for another model')\n"
    )
    (tmp_path / "weights.bin").write_bytes(b"\0")
    store = Path(server.env["B4_MODEL_STORE"])
    subprocess.run(
        [str(Path(server.env["VENV"]) / "bin" / "torch-model-archiver"), "--model-name", "b4",
         "--version", "broken", "--serialized-file", str(tmp_path / "weights.bin"),
         "--handler", str(handler), "--export-path", str(tmp_path), "--force"],
        check=True, env={**server.env, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    (tmp_path / "b4.mar").rename(store / "b4-broken.mar")
    started = time.monotonic()
    result = subprocess.run(
        [str(Path(server.env["VENV"]) / "bin" / "python"), "-m", "b4serve.ops.manage", "--log-dir",
         str(server.log_dir), "--timeout", "120", "rollout", "--mar", "b4-broken.mar",
         "--version", "broken"],
        env=server.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 120  # failed fast, did not wait out the timeout
    assert "cannot load: weights for another model" in result.stderr
    assert serving_version(server) == serving  # the good version never stopped serving
    versions = ManagementAPI(server.endpoints, server.keys).versions("b4")
    assert [v["modelVersion"] for v in versions] == [serving]  # the broken one was removed
    body = encode_npy(np.zeros((16, 16, 3), np.uint8))
    assert post(server, body).status_code == 200


def test_hostile_bodies_fail_alone_next_to_good_requests(server: Server) -> None:
    api = ManagementAPI(server.endpoints, server.keys)
    workers_before = {w["pid"] for w in api.describe("b4", serving_version(server))["workers"]}
    good = encode_npy(demo_images(1, seed=781)[0][0])
    (expected,) = reference(server).classify([good])
    cases = list(HOSTILE)
    statuses: dict[str, tuple[int, dict]] = {}
    with ThreadPoolExecutor(5) as pool:
        for start in range(0, len(cases), 3):
            chunk = cases[start : start + 3]
            blocker = pool.submit(post, server, good)  # busy worker: the next four share a batch
            time.sleep(0.15)
            responses = list(
                pool.map(lambda body: post(server, body), [c.body for c in chunk] + [good])
            )
            assert blocker.result().status_code == 200
            assert responses[-1].status_code == 200
            np.testing.assert_allclose(responses[-1].json(), expected.probabilities, atol=1e-5)
            for case, response in zip(chunk, responses, strict=False):
                statuses[case.name] = (response.status_code, response.json())
    wrong = {
        name: got
        for name, got in statuses.items()
        for case in cases
        if case.name == name
        and not (got[0] == case.status and got[1]["code"] == case.status
                 and case.words in got[1]["message"])
    }  # fmt: skip
    assert wrong == {}
    for name, body in ACCEPTED_VARIANTS:
        assert post(server, body).status_code == 200, name
    ping = requests.get(f"{server.endpoints.inference_url}/ping",
                        headers=server.keys.auth_headers("inference"), timeout=10)  # fmt: skip
    assert ping.json()["status"] == "Healthy"
    workers_after = {w["pid"] for w in api.describe("b4", serving_version(server))["workers"]}
    assert workers_after == workers_before  # no worker died or restarted


def test_body_over_max_request_size_is_refused_and_the_server_goes_on(server: Server) -> None:
    properties = (Path(__file__).resolve().parents[2] / "config.properties").read_text()
    limit = int(re.search(r"^max_request_size=(\d+)$", properties, re.M).group(1))
    refused = post(server, b"\x93NUMPY" + b"\0" * limit)
    assert refused.status_code == 413, refused.text[:300]
    good = encode_npy(np.zeros((16, 16, 3), np.uint8))
    assert post(server, good).status_code == 200


def test_worker_killed_mid_load_is_restarted_and_the_client_loses_nothing(server: Server) -> None:
    api = ManagementAPI(server.endpoints, server.keys)
    version = serving_version(server)
    (victim,) = [w["pid"] for w in api.describe("b4", version)["workers"]]
    images, labels = demo_images(2, seed=782)
    results: list = []
    job = threading.Thread(
        target=lambda: results.extend(
            predict_many(images, endpoints=server.endpoints, concurrency=4,
                         retry=RetryPolicy(retries=8, backoff_s=1.0, max_backoff_s=8.0))
        )
    )  # fmt: skip
    job.start()
    time.sleep(1.5)  # requests are queued and one batch is in the worker
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    assert [r.ok for r in results] == [True] * len(images), [r for r in results if not r.ok][:2]
    assert [int(np.argmax(r.probabilities)) for r in results] == labels
    workers = api.describe("b4", version)["workers"]
    assert [w["status"] for w in workers] == ["READY"] and workers[0]["pid"] != victim


def test_frontend_restart_between_two_halves_of_a_client_job_loses_nothing(
    server: Server, tmp_path: Path
) -> None:
    # Runs last: it stops the session's server and deploys it again.
    images, labels = demo_images(1, seed=783)
    paths = []
    for number, array in enumerate(images):
        paths.append(str(tmp_path / f"image{number}.npy"))
        np.save(paths[-1], array)
    output = tmp_path / "results.jsonl"
    python = str(Path(server.env["VENV"]) / "bin" / "python")
    command = [python, "-m", "b4serve.ops.client", *paths, "--output", str(output),
               "--concurrency", "1", "--retries", "1", "--no-progress"]  # fmt: skip

    def lines_written() -> int:
        return len(output.read_text().splitlines()) if output.exists() else 0

    job = subprocess.Popen(command, env=server.env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while lines_written() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 1, stderr  # the second half found no server
    first = [json.loads(line) for line in output.read_text().splitlines()]
    assert 2 <= sum("probabilities" in r for r in first) < len(paths)

    server.deploy()  # starts the frontend again and registers the same version
    resumed = subprocess.run([*command, "--resume"], env=server.env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    records = {r["input"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(records) == sorted(paths)
    assert [int(np.argmax(records[p]["probabilities"])) for p in paths] == labels
