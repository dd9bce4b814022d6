"""The worst clients a valid key allows, against the session's server, last of all (these
tests overload it, hold its connections, kill its frontend and finally stop it): largest bodies
by the dozen, bodies over the limits, a body sent at 1 KB/s, 1,000 idle connections, and SIGKILL
in the middle of a client job. Each prints a ``[worst clients]`` line with its figures
(docs/WORST_CLIENTS.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from b4serve.client import predict_many
from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import ROOT, Server, server_env
from b4serve.ops.budget import UPLOADS
from b4serve.ops.manage import ManagementAPI, ready_workers
from b4serve.ops.ports import alive, pid_from_file, port_holder
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import MAX_BODY_BYTES
from b4serve.serving.pipeline import Classifier

pytestmark = pytest.mark.integration

# The old 2 GiB heap held 15 bodies of the old limit (134,221,836 bytes), 16 at most: 4x is 64,
# the number the memory budget holds arriving at once.
OLD_HEAP_HELD = math.ceil((2 << 30) / 134_221_836)
LARGE_AT_ONCE = UPLOADS
GOOD_CONCURRENCY = 4  # the good client's requests in flight beside the large bodies


def job_queue_size() -> int:
    """config.properties' job_queue_size: requests past it get TorchServe's 503."""
    properties = (ROOT / "config.properties").read_text()
    return int(re.search(r"^job_queue_size=(\d+)$", properties, re.M).group(1))


@pytest.fixture(scope="module")
def reference(server: Server) -> Classifier:
    """The served version, loaded in this process: what every answer must equal."""
    return server.classifier(version(server))


def version(server: Server) -> str:
    served = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert served is not None
    return served


def frontend_pid(server: Server) -> int:
    pid = pid_from_file(Path(server.env["B4_TMPDIR"]) / ".model_server.pid")
    assert pid is not None
    return pid


def good_images(seed: int) -> list[np.ndarray]:
    images, _ = generate_images(per_class=1, seed=seed, size=224)
    return list(images)


def assert_answers_equal_the_model(results: list, images: list, reference: Classifier) -> None:
    assert [r.ok for r in results] == [True] * len(images), [r for r in results if not r.ok][:2]
    expected = [o.probabilities for o in reference.classify([encode_npy(i) for i in images])]
    np.testing.assert_allclose([r.probabilities for r in results], expected, atol=1e-5)


class PeakMemory:
    """Resident memory of the frontend and of its workers, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.frontend = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.frontend = max(self.frontend, self.process.memory_info().rss)
                children = self.process.children(recursive=True)
                self.workers = max(self.workers, sum(c.memory_info().rss for c in children))
            except psutil.Error:
                return

    def stop(self) -> PeakMemory:
        self._stop.set()
        self._thread.join()
        return self


def test_bodies_over_a_limit_get_413_and_the_server_stays_healthy(
    server: Server, reference: Classifier
) -> None:
    pid = frontend_pid(server)
    over_bytes = server.post(b"\x93NUMPY" + bytes(MAX_BODY_BYTES))  # one byte over
    assert over_bytes.status_code == 413 and over_bytes.content == b""  # TorchServe's, unread
    # within the byte limit, over the pixel limit: our JSON error, from the header alone
    header = encode_npy(np.zeros((4097, 1024), np.uint8))
    over_pixels = server.post(header)
    assert over_pixels.status_code == 413
    assert over_pixels.json()["type"] == "PayloadTooLarge"
    assert "4195328 pixels; the limit is 4194304" in over_pixels.json()["message"]
    # a float32 image the pixel limit allows, 4x the bytes of uint8: the client explains the 413
    (result,) = predict_many([np.zeros((1200, 1200, 3), np.float32)], endpoints=server.endpoints)
    assert result.error is not None and result.error["status"] == 413
    assert "over its max_request_size" in result.error["message"]
    good = good_images(seed=901)[:2]
    assert_answers_equal_the_model(predict_many(good, endpoints=server.endpoints), good, reference)
    assert frontend_pid(server) == pid


def test_largest_bodies_by_the_dozen_beside_good_traffic_all_get_answers(
    server: Server, reference: Classifier
) -> None:
    # Valid largest bodies (a 2048x2048 RGBA uint8 image), 1 in 16, and bodies of the same size
    # whose header declares one column too many (refused by the worker from the header, 413):
    # the same memory in the frontend, less time in the model.
    image = np.random.default_rng(902).integers(0, 256, (2048, 2048, 4), dtype=np.uint8)
    valid = encode_npy(image)
    refused = valid.replace(b"(2048, 2048, 4)", b"(2048, 2049, 4)", 1)
    assert len(valid) == len(refused) <= MAX_BODY_BYTES
    bodies = [valid if i % 16 == 0 else refused for i in range(LARGE_AT_ONCE)]
    assert LARGE_AT_ONCE >= 4 * OLD_HEAP_HELD
    pid = frontend_pid(server)
    peak = PeakMemory(pid)
    statuses: Counter[int] = Counter()
    by_kind: Counter[tuple[str, int]] = Counter()  # ("valid" or "refused", status)
    errors: list[str] = []
    valid_answers: list[list[float]] = []
    refusals: list[dict] = []
    started = time.monotonic()

    def send(body: bytes) -> None:
        try:
            response = server.post(body, timeout=300)
        except requests.RequestException as error:  # a reset, a refused connection, a timeout
            errors.append(f"{type(error).__name__}: {error}")
            return
        statuses[response.status_code] += 1
        by_kind["valid" if body is valid else "refused", response.status_code] += 1
        if response.status_code == 200:
            valid_answers.append(response.json())
        elif response.status_code == 413:
            refusals.append(response.json())

    good = good_images(seed=903)
    with ThreadPoolExecutor(LARGE_AT_ONCE + 1) as pool:
        good_job = pool.submit(
            predict_many, good, endpoints=server.endpoints, concurrency=GOOD_CONCURRENCY
        )
        list(pool.map(send, bodies))
        good_results = good_job.result()
    took = time.monotonic() - started
    peak.stop()
    print(
        f"\n[worst clients] {LARGE_AT_ONCE} bodies of {len(valid)} bytes at once "
        f"({sum(b is valid for b in bodies)} valid), {len(good)} good beside them, in "
        f"{took:.0f} s: answers {dict(sorted(statuses.items()))} (valid: "
        f"{ {s: n for (k, s), n in sorted(by_kind.items()) if k == 'valid'} }), connection errors "
        f"{len(errors)}, good retried {sum(r.attempts > 1 for r in good_results)}; peak "
        f"RSS frontend {peak.frontend >> 20} MiB, workers {peak.workers >> 20} MiB"
    )
    assert errors == []
    assert sum(statuses.values()) == LARGE_AT_ONCE
    # Each body answered as what it is (the valid ones 200, the others their own 413 from the
    # header), or 503 when TorchServe's queue was full; the queue holds job_queue_size, less
    # what the good client has in flight, so at least that many are answered, never all 503.
    assert set(by_kind) <= {("valid", 200), ("valid", 503), ("refused", 413), ("refused", 503)}
    answered = LARGE_AT_ONCE - statuses[503]
    assert answered >= job_queue_size() - GOOD_CONCURRENCY, by_kind
    assert all(r["type"] == "PayloadTooLarge" and "2049" in r["message"] for r in refusals)
    assert frontend_pid(server) == pid
    assert_answers_equal_the_model(good_results, good, reference)
    if valid_answers:
        (expected,) = reference.classify([valid])
        np.testing.assert_allclose(
            valid_answers, [expected.probabilities] * len(valid_answers), atol=1e-5
        )


def test_a_body_at_1_kb_s_and_1000_idle_connections_leave_good_traffic_alone(
    server: Server, reference: Classifier
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:  # the frontend raises its own limit; this process must too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    host, port = "127.0.0.1", int(server.env["B4_INFERENCE_PORT"])
    pid = frontend_pid(server)
    idle = [socket.create_connection((host, port)) for _ in range(1000)]
    slow = socket.create_connection((host, port))
    key = server.keys.key("inference")
    slow.sendall(
        f"POST /predictions/b4 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {MAX_BODY_BYTES}"
        "\r\n\r\n".encode()
    )
    trickled = threading.Event()
    stop = threading.Event()
    sent = [0]

    def trickle() -> None:  # 1 KB a second, for as long as the good traffic takes
        while not stop.wait(1.0):
            slow.sendall(b"\0" * 1024)
            sent[0] += 1024
            trickled.set()

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        assert trickled.wait(10)
        good = good_images(seed=904)[:3]
        started = time.monotonic()
        results = predict_many(good, endpoints=server.endpoints, concurrency=2)
        took = time.monotonic() - started
        assert sender.is_alive() and sent[0] < MAX_BODY_BYTES  # still uploading meanwhile
        queue = ManagementAPI(server.endpoints, server.keys).describe("b4", version(server))
        print(
            f"\n[worst clients] {len(good)} good answered in {took:.1f} s beside 1000 idle "
            f"connections and one body at 1 KB/s ({sent[0]} bytes sent so far)"
        )
    finally:
        stop.set()
        sender.join()
        slow.close()
        for connection in idle:
            connection.close()
    assert_answers_equal_the_model(results, good, reference)
    assert queue is not None and queue["jobQueueStatus"]["pendingRequests"] == 0  # no job held
    assert frontend_pid(server) == pid


def test_deploy_names_the_torchserve_that_holds_its_port(server: Server, tmp_path: Path) -> None:
    other = server_env(tmp_path)
    other["B4_INFERENCE_PORT"] = server.env["B4_INFERENCE_PORT"]  # taken by the module's server
    checkpoint = Path(server.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt"  # no demo build
    result = subprocess.run(
        [str(ROOT / "scripts" / "deploy.sh"), "--checkpoint", str(checkpoint)],
        env=other,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    pid, port = frontend_pid(server), server.env["B4_INFERENCE_PORT"]
    assert error.startswith(
        f"error: port {port} (B4_INFERENCE_PORT) is already in use by "
        f"TorchServe pid {pid} (run dir {server.env['B4_RUN_DIR']}, "
        f"TMPDIR {server.env['B4_TMPDIR']})"
    )
    assert f"`TMPDIR={server.env['B4_TMPDIR']} torchserve --stop`" in error


def test_a_frontend_killed_mid_job_comes_back_by_itself_and_the_job_loses_nothing(
    server: Server, reference: Classifier, tmp_path: Path
) -> None:
    images = good_images(seed=905)
    paths = []
    for number, image in enumerate(images):
        paths.append(str(tmp_path / f"image{number}.npy"))
        np.save(paths[-1], image)
    output = tmp_path / "results.jsonl"
    served, killed = version(server), frontend_pid(server)
    python = str(Path(server.env["VENV"]) / "bin" / "python")
    job = subprocess.Popen(
        [
            python,
            "-m",
            "b4serve.client",
            *paths,
            "--output",
            str(output),
            "--concurrency",
            "2",
            "--no-progress",
        ],
        env=server.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (output.exists() and output.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and job.poll() is None, "the job never got going"
        time.sleep(0.1)
    supervisor_log = Path(server.env["B4_LOG_DIR"]) / "supervisor.log"
    said_before = len(supervisor_log.read_text())  # the session server's log: earlier lives too
    os.kill(killed, signal.SIGKILL)
    killed_at = time.monotonic()
    api = ManagementAPI(server.endpoints, server.keys, timeout_s=5)
    back = None
    while back is None:
        assert time.monotonic() - killed_at < 60, "not back within 60 s"
        try:
            if api.default_version("b4") == served and ready_workers(api.describe("b4", served)):
                back = time.monotonic() - killed_at
        except (requests.RequestException, OSError):
            pass  # not listening yet, or its new key file is being written
        time.sleep(0.5)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    retried = sum(r["attempts"] > 1 for r in records)
    restarts = supervisor_log.read_text()[said_before:].count("; restart ")
    print(
        f"\n[worst clients] frontend SIGKILLed after 2 of {len(paths)} answers: back (default "
        f"version, worker READY) in {back:.1f} s; supervisor restarts {restarts}; inputs "
        f"retried by the client {retried}"
    )
    assert sorted(r["input"] for r in records) == sorted(paths)  # each exactly once
    assert frontend_pid(server) != killed and restarts == 1
    expected = [o.probabilities for o in reference.classify([encode_npy(i) for i in images])]
    by_input = {r["input"]: r["probabilities"] for r in records}
    np.testing.assert_allclose([by_input[p] for p in paths], expected, atol=1e-5)


def test_torchserve_stop_ends_the_supervisor_too(server: Server) -> None:
    supervisor = pid_from_file(Path(server.env["B4_RUN_DIR"]) / "supervisor.pid")
    assert alive(supervisor)
    server.stop()
    deadline = time.monotonic() + 30
    while alive(supervisor):
        assert time.monotonic() < deadline, "the supervisor outlived `torchserve --stop`"
        time.sleep(0.2)
    assert (
        "was stopped; the supervisor ends"
        in (Path(server.env["B4_LOG_DIR"]) / "supervisor.log").read_text()
    )
    assert port_holder("127.0.0.1", int(server.env["B4_INFERENCE_PORT"])) is None
