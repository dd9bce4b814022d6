"""The v2 port (plugins/v2) against hostile clients, on the session's server near the end of
the run (test_worst_clients.py, after it, is the last to use it): a schema-driven fuzzer with
the protocol's published REST description, then the worst clients a valid key allows (600
uploads trickling a byte a second and 40 largest bodies at once) while good requests and health
checks go on beside them. Each prints a line with its figures (docs/WORST_CLIENTS.md).
"""

from __future__ import annotations

import re
import resource
import select
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from integration.test_worst_clients import frontend_pid, good_images, version

from b4serve.lab.sandbox import ROOT, Server
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import MAX_BODY_BYTES
from b4serve.serving.protocol import OUTPUT_NAME, encode_v2_binary

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

TRICKLING = 600
LARGE_AT_ONCE = 40
FUZZ_SECONDS = 30  # 733 requests in 60 s on 2 cores (docs/WORST_CLIENTS.md): some 360 here


def infer_url(server: Server) -> str:
    return f"{server.endpoints.v2_url}/v2/models/b4/infer"


def predict_v2(server: Server, image: np.ndarray, tries: int = 20) -> tuple[list[float], int]:
    """One good request's probabilities and its attempts: a 503 is retried after its
    Retry-After, as a client of the protocol does (any other answer fails the test)."""
    body, headers = encode_v2_binary(image)
    for attempt in range(1, tries + 1):
        response = server.post(body, headers, url=infer_url(server), timeout=300)
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            (output,) = [o for o in response.json()["outputs"] if o["name"] == OUTPUT_NAME]
            return output["data"], attempt
        time.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError(f"still 503 after {tries} tries: {response.text}")


class Trickles:
    """Uploads that declare a largest body and send it a byte a second."""

    def __init__(self, server: Server, count: int) -> None:
        host, port = "127.0.0.1", int(server.env["B4_V2_PORT"])
        key = server.keys.key("inference")
        head = (
            f"POST /v2/models/b4/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n"
        ).encode()
        self.sockets = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
        for connection in self.sockets:
            connection.sendall(head + b"{")
        self.sent = count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        open_ = list(self.sockets)
        while open_ and not self._stop.wait(1.0):
            answered, _, _ = select.select(open_, [], [], 0)
            for connection in open_:
                if connection in answered:  # 408: that upload is over
                    continue
                try:
                    connection.send(b" ")
                    self.sent += 1
                except OSError:
                    answered.append(connection)
            open_ = [c for c in open_ if c not in answered]

    def answers(self, deadline: float) -> Counter[str]:
        """Each upload's status line (or what happened instead), waiting until ``deadline``."""
        self._stop.set()
        self._thread.join()
        seen: Counter[str] = Counter()
        for connection in self.sockets:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                first = connection.recv(64).split(b"\r\n")[0].decode()
                seen[first or "closed without an answer"] += 1
            except OSError as error:
                seen[type(error).__name__] += 1
            finally:
                connection.close()
        return seen


def test_a_schema_driven_fuzzer_finds_no_5xx_and_no_nonconforming_answer(
    server: Server, tmp_path: Path
) -> None:
    """schemathesis, for a bounded minute, with the Open Inference Protocol's REST description
    (plugins/v2/openapi.yaml, from KServe's): every answer a declared status with its schema,
    errors as {"error": ...}, 405s with Allow, no 5xx."""
    settings = {  # read by plugins/v2/schemathesis.toml
        "B4_INFERENCE_KEY": server.keys.key("inference"),
        "B4_SERVED_VERSION": version(server),
    }
    run = subprocess.run(
        [
            str(Path(server.env["VENV"]) / "bin" / "st"),
            "--config-file",
            str(ROOT / "plugins" / "v2" / "schemathesis.toml"),
            "run",
            str(ROOT / "plugins" / "v2" / "openapi.yaml"),
            "--url",
            server.endpoints.v2_url,
            "--checks",
            "all",
            # schema-valid tensors of any shape and type: the model takes images only, and
            # answers the rest 4xx (which negative_data_rejection and the others still check)
            "--exclude-checks",
            "positive_data_acceptance",
            # examples first (the declared ones), then generated requests, for a bounded time
            "--phases",
            "examples,coverage,fuzzing",
            "--max-time",
            str(FUZZ_SECONDS),
            # one: with two, hypothesis parses lambdas' source in two threads at once, which
            # CPython 3.11's parser does not survive (SystemError: AST constructor recursion
            # depth mismatch, a run error that is no finding)
            "--workers",
            "1",
            "--suppress-health-check",
            "all",
            "--no-color",
        ],
        env={**server.env, **settings},
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        cwd=tmp_path,
    )
    cases = re.search(r"(\d+) generated, (.*)", run.stdout)
    print(f"\n[v2 fuzz] schemathesis, {FUZZ_SECONDS} s: {cases.group(0) if cases else '?'}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert cases is not None and int(cases.group(1)) >= 100, run.stdout[-3000:]


def test_600_trickles_and_40_largest_bodies_leave_good_requests_and_health_answered(
    server: Server,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < TRICKLING + LARGE_AT_ONCE + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    reference = server.classifier(version(server))
    pid = frontend_pid(server)
    # Largest bodies: a 2048x2048 RGBA uint8 image in the binary-data extension, 1 in 8 valid,
    # the rest declaring one column too many (refused by the worker from the header).
    image = np.random.default_rng(2301).integers(0, 256, (2048, 2048, 4), dtype=np.uint8)
    valid, large_headers = encode_v2_binary(image)
    refused = valid.replace(b"[2048, 2048, 4]", b"[2048, 2049, 4]", 1)
    assert len(valid) == len(refused) <= MAX_BODY_BYTES and refused != valid
    large = [valid if i % 8 == 0 else refused for i in range(LARGE_AT_ONCE)]
    statuses: Counter[int] = Counter()
    errors: list[str] = []

    def send_large(body: bytes) -> None:
        try:
            response = server.post(body, large_headers, url=infer_url(server), timeout=300)
        except requests.RequestException as error:  # a reset, a refused connection, a timeout
            errors.append(f"{type(error).__name__}: {error}")
            return
        statuses[response.status_code] += 1
        assert "error" in response.json() or response.status_code == 200

    health: Counter[int] = Counter()
    storm_over = threading.Event()

    def check_health() -> None:
        headers = server.keys.auth_headers("inference")
        while not storm_over.wait(0.5):
            for path in ("/v2/health/live", "/v2/health/ready"):
                url = f"{server.endpoints.v2_url}{path}"
                health[requests.get(url, headers=headers, timeout=10).status_code] += 1

    started = time.monotonic()
    trickles = Trickles(server, TRICKLING)
    good = good_images(seed=2302)
    with ThreadPoolExecutor(LARGE_AT_ONCE + 2) as pool:
        checker = pool.submit(check_health)
        storm = [pool.submit(send_large, body) for body in large]
        answers = [predict_v2(server, g) for g in good]  # while the storm and trickles go on
        for sent in storm:
            sent.result()
        storm_over.set()
        checker.result()
    # the server's b4_v2_read_timeout_s (the session's: 20 s): the trickles' 408 comes in time
    read_timeout_s = int(server.env["B4_V2_READ_TIMEOUT_S"])
    trickled = trickles.answers(deadline=started + read_timeout_s + 30)
    took = time.monotonic() - started
    print(
        f"\n[v2 worst clients] {TRICKLING} uploads at 1 byte/s, {LARGE_AT_ONCE} bodies of "
        f"{len(valid)} bytes at once ({large.count(valid)} valid), {len(good)} good beside them, "
        f"in {took:.0f} s: large answered {dict(sorted(statuses.items()))}, connection errors "
        f"{len(errors)}; good 200 after {sum(a for _, a in answers) - len(good)} retries; health "
        f"{dict(health)}; uploads answered {dict(trickled)}"
    )
    assert errors == []
    assert sum(statuses.values()) == LARGE_AT_ONCE
    assert set(statuses) <= {200, 400, 413, 503}, statuses
    assert statuses[503] < LARGE_AT_ONCE  # some were read whole and reached the worker
    expected = [o.probabilities for o in reference.classify([encode_npy(g) for g in good])]
    np.testing.assert_allclose([p for p, _ in answers], expected, atol=1e-5)
    assert health and set(health) == {200}, health
    assert trickled == {"HTTP/1.1 408 Request Timeout": TRICKLING}, trickled
    assert frontend_pid(server) == pid
