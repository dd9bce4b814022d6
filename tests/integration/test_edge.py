"""The edge (HAProxy, scripts/edge.sh) in front of the session's real TorchServe.

Credentials issued and revoked, paths and bodies refused, slow and idle clients, and a client
run through three renewals of TorchServe's inference key. "Never reached TorchServe" is read
from TorchServe's own access log (the edge's health checks show there as /ping and
/v2/health/ready, never as a prediction).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from b4serve.client import iter_results
from b4serve.lab.demo import generate_images
from b4serve.lab.edge import Edge
from b4serve.lab.sandbox import Server, post
from b4serve.lab.served_log import handled_batches, handled_counts
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.keys import KeyFileError, bearer
from b4serve.ops.manage import LogWatch
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import MAX_BODY_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

REQUEST_TIMEOUT_S = 4  # the edge's whole-request timeout in these tests
IMAGES = list(generate_images(per_class=1, seed=31, size=96)[0])
RENEWED = "inference key renewed"
PREDICTIONS = "/predictions/b4"


@pytest.fixture(scope="module")
def edge(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The edge in front of the session server, renewing its key 22 s before it expires (the
    server's keys last 30 s: a renewal every 8 s or so)."""
    running = Edge.in_front_of(
        {"local": server},
        tmp_path_factory.mktemp("edge"),
        B4_EDGE_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
        B4_EDGE_CLIENT_TIMEOUT_S="10",
        B4_EDGE_IDLE_TIMEOUT_S="10",
        B4_EDGE_RENEW_BEFORE_S="22",
        B4_EDGE_CHECK_INTERVAL_MS="500",
    )
    try:
        running.start()
        _wait_until_serving(running, server)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def credential(edge: Edge) -> str:
    return edge.issue("module-client")


def _wait_until_serving(edge: Edge, server: Server, within_s: float = 60) -> None:
    """Until a prediction passes (the first health checks take a second or two)."""
    probe = edge.issue("probe")
    deadline = time.monotonic() + within_s
    try:
        while post(edge.url + PREDICTIONS, encode_npy(IMAGES[0]), bearer(probe)).status_code != 200:
            assert time.monotonic() < deadline, "the edge never served the first prediction"
            time.sleep(0.5)
    finally:
        edge.run("--revoke", "probe")


def predictions_logged(access_log: LogWatch, at_least: int = 0, within_s: float = 20) -> int:
    """Predictions in TorchServe's access log since the mark, once ``at_least`` are there
    (the log is written asynchronously), plus a second for any that should not be."""
    deadline = time.monotonic() + within_s
    while True:
        count = sum('"POST /predictions/' in line for line in access_log.lines())
        if count >= at_least or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    return sum('"POST /predictions/' in line for line in access_log.lines())


def test_only_issued_unrevoked_credentials_reach_torchserve(server: Server, edge: Edge) -> None:
    body = encode_npy(IMAGES[0])
    access_log = LogWatch(server.log_dir, "access_log.log")
    refused = [
        post(edge.url + PREDICTIONS, body, {}),
        post(edge.url + PREDICTIONS, body, bearer("not-a-credential")),
        post(edge.url + PREDICTIONS, body, {"Authorization": "Basic dXNlcjpwYXNz"}),
        post(
            edge.url + PREDICTIONS, body, server.keys.auth_headers("inference")
        ),  # TorchServe's own key: no
    ]
    assert [r.status_code for r in refused] == [401] * 4
    assert refused[0].json()["type"] == "Unauthorized"

    issued = edge.issue("alice")
    paths = ["/models", "/models/b4", "/metrics", "/api-description", "/ping", "/token"]
    elsewhere = [requests.get(edge.url + p, headers=bearer(issued), timeout=30) for p in paths]
    assert [r.status_code for r in elsewhere] == [404] * len(paths)  # never management/metrics

    direct = server.post(body)
    answered = post(edge.url + PREDICTIONS, body, bearer(issued))
    assert answered.status_code == 200, answered.text
    np.testing.assert_allclose(answered.json(), direct.json(), atol=1e-6)

    edge.run("--revoke", "alice")
    after = post(edge.url + PREDICTIONS, body, bearer(issued))
    assert after.status_code == 401  # no restart, no reload
    # the direct one and the one the edge let through; none of the refused
    assert predictions_logged(access_log, at_least=2) == 2


def _raw_request(edge: Edge, headers: dict[str, str], length: int) -> socket.socket:
    """A connection to the edge that has sent a POST's headers and none of its body."""
    sock = socket.create_connection(("127.0.0.1", int(edge.env["B4_EDGE_PORT"])), timeout=30)
    lines = [
        "POST /predictions/b4 HTTP/1.1",
        "Host: edge",
        f"Content-Length: {length}",
        "Content-Type: application/octet-stream",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the edge sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_over_limit_body_gets_413_from_the_edge(server: Server, edge: Edge, credential: str):
    access_log = LogWatch(server.log_dir, "access_log.log")
    with _raw_request(edge, bearer(credential), MAX_BODY_BYTES + 1) as sock:
        with contextlib.suppress(OSError):  # it may have answered and closed already
            sock.sendall(b"\0" * (1 << 20))  # the edge answers once its buffer is full
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"type":"PayloadTooLarge"' in answer
    assert predictions_logged(access_log) == 0


def test_slow_and_idle_clients_are_cut_while_good_requests_are_answered(
    server: Server, edge: Edge, credential: str
) -> None:
    access_log = LogWatch(server.log_dir, "access_log.log")
    body = encode_npy(IMAGES[1])
    idle = [
        socket.create_connection(("127.0.0.1", int(edge.env["B4_EDGE_PORT"]))) for _ in range(1000)
    ]
    try:
        slow = _raw_request(edge, bearer(credential), len(body))
        started = time.monotonic()

        def trickle() -> tuple[bytes, float]:
            """A byte a second until the edge answers and closes."""
            slow.settimeout(1.0)
            for byte in body:
                if time.monotonic() - started > REQUEST_TIMEOUT_S + 10:
                    raise AssertionError(f"still sending after {REQUEST_TIMEOUT_S + 10} s")
                try:
                    slow.sendall(bytes([byte]))
                    answer = slow.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    answer = b""
                return answer + _answer(slow), time.monotonic() - started
            raise AssertionError("the whole body trickled through")  # never, at a byte a second

        with ThreadPoolExecutor(1) as pool:
            cut = pool.submit(trickle)
            good = [
                post(edge.url + PREDICTIONS, body, bearer(credential)) for _ in range(4)
            ]  # meanwhile
            answer, after_s = cut.result(timeout=REQUEST_TIMEOUT_S + 30)
        slow.close()
        assert [r.status_code for r in good] == [200] * 4
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"type":"RequestTimeout"' in answer
        assert after_s < REQUEST_TIMEOUT_S + 3, after_s  # the configured timeout, not later
        assert predictions_logged(access_log, at_least=4) == 4  # the trickle never got there
        print(f"\n[edge] byte-a-second upload: 408 after {after_s:.1f} s; 1000 idle connections")
    finally:
        for sock in idle:
            sock.close()


def _edge_endpoints(edge: Edge) -> Endpoints:
    """Endpoints whose predictions URL is the edge's (the key file is never read)."""
    return Endpoints(edge.url, edge.url, edge.url, Path("/nonexistent"), "b4")


def test_a_client_run_outlives_three_key_renewals(server: Server, edge: Edge, credential: str):
    renewed_before = edge.keeper_log().count(RENEWED)
    keys_seen = {server.keys.read()["inference"].key}
    done = threading.Event()

    def watch_keys() -> None:  # TorchServe's key file, as the run goes
        while not done.wait(0.2):
            with contextlib.suppress(KeyFileError):
                keys_seen.add(server.keys.read()["inference"].key)

    model_log = LogWatch(server.log_dir)
    results = []
    deadline = time.monotonic() + 150
    watcher = threading.Thread(target=watch_keys, daemon=True)
    watcher.start()
    try:
        while edge.keeper_log().count(RENEWED) < renewed_before + 3:
            assert time.monotonic() < deadline, edge.keeper_log()[-2000:]
            ids = [f"renewals-{len(results) + n}" for n in range(len(IMAGES) * 4)]
            results += iter_results(
                IMAGES * 4,
                endpoints=_edge_endpoints(edge),
                credential=credential,
                concurrency=4,
                request_ids=ids,
            )
    finally:
        done.set()
        watcher.join()
    failed = [r.describe_error() for r in results if not r.ok]
    assert failed == [], failed[:5]
    assert len(keys_seen) >= 4  # three renewals: TorchServe handed out three new keys
    ids = [r.request_id for r in results]
    counts = handled_counts(handled_batches(model_log, waiting_for=ids))
    assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)  # each answered once
    resent = sum(r.attempts - 1 for r in results)
    print(
        f"\n[edge] {len(results)} answers across {len(keys_seen) - 1} key renewals, "
        f"{resent} sent again"
    )


def test_tritonclient_through_the_edge(server: Server, edge: Edge, credential: str) -> None:
    client = triton.InferenceServerClient(edge.url.removeprefix("http://"))
    image = IMAGES[2]
    pixels = triton.InferInput("image", list(image.shape), "UINT8")
    pixels.set_data_from_numpy(image)
    assert client.is_model_ready("b4", headers=bearer(credential))
    answer = client.infer("b4", [pixels], headers=bearer(credential))
    direct = triton.InferenceServerClient(server.endpoints.v2_url.removeprefix("http://"))
    expected = direct.infer("b4", [pixels], headers=server.keys.auth_headers("inference"))
    np.testing.assert_allclose(
        answer.as_numpy("probabilities"), expected.as_numpy("probabilities"), atol=1e-6
    )
    with pytest.raises(InferenceServerException, match=re.compile("401|Unauthorized")):
        client.infer("b4", [pixels], headers={})
