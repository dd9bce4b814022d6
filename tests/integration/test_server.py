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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from hostile_corpus import ACCEPTED_VARIANTS, HOSTILE, Case

from b4serve.client import Result, RetryPolicy, iter_results, predict_many
from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server
from b4serve.lab.served_log import handled_batches, handled_counts
from b4serve.ops.keys import KeyFile, bearer
from b4serve.ops.manage import LogWatch, ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.pipeline import Classifier
from b4serve.serving.request_ids import REQUEST_ID_HEADER

pytestmark = pytest.mark.integration

PREDICTIONS_LINE = '"POST /predictions/b4 HTTP/1.1" '  # an access-log line of a prediction


def serving_version(server: Server) -> str:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    return version


def reference(server: Server) -> Classifier:
    """The served version's exported model and config, run in-process the way the handler does."""
    return server.classifier(serving_version(server))


def demo_images(count_per_class: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = generate_images(count_per_class, seed)
    return list(images), [int(label) for label in labels]


def access_statuses(watch: LogWatch, at_least: int, within_s: float = 30.0) -> list[int]:
    """The statuses of the predictions the access log recorded since ``watch``'s mark, once it
    holds ``at_least`` of them (it is written asynchronously) or ``within_s`` has passed."""
    deadline = time.monotonic() + within_s
    while True:
        statuses = [int(line.split(PREDICTIONS_LINE)[1].split()[0])
                    for line in watch.lines() if PREDICTIONS_LINE in line]  # fmt: skip
        if len(statuses) >= at_least or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


@dataclass(frozen=True)
class Exchange:
    """One prediction request the client sent and the answer it got, as it got it."""

    request_id: str | None
    status: int
    body: bytes

    @property
    def key_refused(self) -> bool:
        """TorchServe's refusal of a key, told apart from any other 400 by its body."""
        try:
            kind = json.loads(self.body).get("type")
        except (ValueError, AttributeError):
            return False
        return self.status == 400 and kind == "InvalidKeyException"


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Exchange]]:
    """Every prediction exchange of this process, recorded as the bundled client received it:
    the real responses pass through unchanged; only a copy is kept."""
    exchanges: list[Exchange] = []
    lock = threading.Lock()
    real_send = requests.adapters.HTTPAdapter.send

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        response = real_send(self, request, **kwargs)
        if "/predictions/" in (request.url or ""):
            exchange = Exchange(request.headers.get(REQUEST_ID_HEADER), response.status_code,
                                response.content)  # fmt: skip
            with lock:
                exchanges.append(exchange)
        return response

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    yield exchanges


def refusals_are_key_refusals_retried(exchanges: list[Exchange]) -> list[Exchange]:
    """The non-200 exchanges, having checked that each was TorchServe refusing a key and that
    the same input (request id) was answered 200 after it."""
    refused = [(n, e) for n, e in enumerate(exchanges) if e.status != 200]
    for position, exchange in refused:
        assert exchange.key_refused, exchange
        later = exchanges[position + 1 :]
        assert any(e.request_id == exchange.request_id and e.status == 200 for e in later), exchange
    return [exchange for _, exchange in refused]


BATCH = 4  # the session server's batch size (deploy's default)


def in_one_batch(server: Server, bodies: list[bytes], tag: str) -> list[requests.Response]:
    """POST ``bodies`` so that TorchServe hands them to the worker as one batch: a first blocker
    keeps the idle worker busy, then a full batch of blockers queues up ahead of the bodies, so
    the bodies (queued while those run) fill the next batch alone. Whether they shared one is
    read from the handler's log, by request id; a try where they did not is sent again (5 tries).
    Returns the responses of the try where they shared a batch. (Blockers sent all at once split
    between batches and let bodies in beside them.)"""
    assert len(bodies) <= BATCH
    blocker = encode_npy(np.zeros((64, 64, 3), np.uint8))

    def send(body: bytes, request_id: str) -> requests.Response:
        return server.post(body, {REQUEST_ID_HEADER: request_id})

    with ThreadPoolExecutor(len(bodies) + BATCH + 1) as pool:
        for attempt in range(5):
            model_log = LogWatch(server.log_dir)
            ids = [f"{tag}-{attempt}-{n}" for n in range(len(bodies))]
            busy = [pool.submit(send, blocker, f"{tag}-{attempt}-blocker0")]
            time.sleep(0.1)  # the worker took it alone
            busy += [pool.submit(send, blocker, f"{tag}-{attempt}-blocker{k + 1}")
                     for k in range(BATCH)]  # fmt: skip
            time.sleep(0.1)  # a full batch waits in the queue, ahead of the bodies
            responses = list(pool.map(send, bodies, ids))
            assert [b.result().status_code for b in busy] == [200] * len(busy)
            batches = handled_batches(model_log, waiting_for=ids)
            if any({h.request_id for h in batch} >= set(ids) for batch in batches):
                return responses
    raise AssertionError(f"{tag}: the bodies never shared a batch in 5 tries")


def answered_once(server_log: LogWatch, results: list[Result]) -> None:
    """Every input of ``results`` was answered by the handler exactly once, per its own log."""
    ids = [r.request_id for r in results]
    assert None not in ids and len(set(ids)) == len(ids)
    counts = handled_counts(handled_batches(server_log, waiting_for=ids))
    assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)


def test_served_probabilities_equal_in_process_reference(server: Server) -> None:
    images, labels = demo_images(1, seed=777)
    images.append(np.full((120, 90), 200, dtype=np.uint8))  # grey, resized by the handler
    local = reference(server)
    bodies = [encode_npy(image) for image in images]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: server.post(body), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    served = np.array([r.json() for r in responses])
    expected = np.array([o.probabilities for o in local.classify(bodies)])
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert list(served[:6].argmax(axis=1)) == labels  # the demo model knows its colours


def test_batch_with_one_malformed_request_fails_alone(server: Server) -> None:
    images, _ = demo_images(1, seed=778)
    bodies = [encode_npy(images[0]), encode_npy(images[1])[:-10], encode_npy(images[2]),
              encode_npy(images[3])]  # fmt: skip
    responses = in_one_batch(server, bodies, "malformed")  # they really shared a batch
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    error = responses[1].json()
    assert error["code"] == 400 and error["type"] == "InvalidInput"
    assert "truncated array data" in error["message"]
    expected = reference(server).classify([bodies[0], bodies[2], bodies[3]])
    served = [responses[0].json(), responses[2].json(), responses[3].json()]
    np.testing.assert_allclose(served, [o.probabilities for o in expected], atol=1e-5, rtol=0)
    assert server.post(bodies[0]).status_code == 200  # and the worker is still serving


def test_requests_without_a_valid_token_are_refused(server: Server) -> None:
    body = encode_npy(np.zeros((8, 8, 3), np.uint8))
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        refused = server.post(body, headers, key=False)
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


def test_key_voided_while_the_client_holds_it_is_renewed_and_nothing_is_lost(
    server: Server, monkeypatch: pytest.MonkeyPatch, wire: list[Exchange]
) -> None:
    # Another client renews the inference key between one of our requests reading it and
    # sending it: the real server must refuse that request, and the client must renew and
    # send it again. (Renewal, not expiry, voids the key: no waiting for the clock.)
    images, labels = demo_images(2, seed=780)
    voided: list[str] = []
    reads = 0
    real_key = KeyFile.key

    def key_voided_after_read(self: KeyFile, kind: str) -> str:
        nonlocal reads
        key = real_key(self, kind)
        if threading.current_thread().name.startswith("b4client"):
            reads += 1
            if reads == 5:  # four requests went out, one came back: three are in flight
                api_key = server.keys.read()["API"].key
                renewed = requests.get(f"{server.endpoints.management_url}/token",
                                       params={"type": "inference"}, headers=bearer(api_key),
                                       timeout=30)  # fmt: skip
                assert renewed.status_code == 200, renewed.text
                voided.append(key)
        return key

    monkeypatch.setattr(KeyFile, "key", key_voided_after_read)
    model_log = LogWatch(server.log_dir)
    access_log = LogWatch(server.log_dir, "access_log.log")
    results = predict_many(images, endpoints=server.endpoints, concurrency=4,
                           retry=RetryPolicy(retries=4, backoff_s=0.2))  # fmt: skip

    assert len(voided) == 1 and server.keys.read()["inference"].key != voided[0]
    assert [r.ok for r in results] == [True] * len(images)
    assert [int(np.argmax(r.probabilities)) for r in results] == labels
    refused = refusals_are_key_refusals_retried(wire)
    assert len(refused) >= 1  # the server did refuse the voided key
    assert sum(r.attempts - 1 for r in results) == len(refused)
    statuses = access_statuses(access_log, at_least=len(wire))
    assert sorted(statuses) == sorted(e.status for e in wire)  # nothing else was refused
    answered_once(model_log, results)
    records = [json.loads(json.dumps(r.to_json())) for r in results]  # the CLI's JSON lines
    assert [(rec["request_id"], rec["probabilities"]) for rec in records] == [
        (r.request_id, r.probabilities) for r in results
    ]


def test_deploy_twice_is_idempotent(server: Server) -> None:
    # once the 30-second management key has expired: deploy must renew it to get this far
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


def test_redeploy_under_load_loses_no_request(
    server: Server, tmp_path: Path, wire: list[Exchange]
) -> None:
    old_version = serving_version(server)
    # A new version from a plain state dict: the demo with halved logits (same top-1, softer),
    # served by the optional ONNX Runtime runtime
    demo = torch.load(Path(server.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt",
                      weights_only=True)  # fmt: skip
    state = {k: v.clone() for k, v in demo["state_dict"].items()}
    state["classifier.weight"] *= 0.5
    state["classifier.bias"] *= 0.5
    checkpoint = tmp_path / "sharper.pth"
    torch.save({"state_dict": state, "class_names": demo["class_names"]}, checkpoint)
    # Built first, as a CI job would: the load spans the rollout (registration, warm-up, the
    # switch, the old version's drain and retirement), not two cores' worth of export.
    built = server.build("--checkpoint", str(checkpoint), B4_RUNTIME="onnxruntime")
    assert "exported ONNX" in built.stderr

    images, _ = demo_images(2, seed=779)
    results: list = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.extend(predict_many(images, endpoints=server.endpoints, concurrency=4))

    access_log = LogWatch(server.log_dir, "access_log.log")
    model_log = LogWatch(server.log_dir)
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
    assert "export of" not in deploy.stderr  # the build above, found by its id
    assert len(results) >= 2 * len(images)
    failed = [r for r in results if not r.ok]
    assert failed == [], failed[:3]
    # Not even a retried failure: the old version was drained before it was unregistered. The
    # only refusals allowed are of keys (30-second keys here; deploy's smoke test renewing the
    # inference key voids the one the load holds), each told by its body and each followed by
    # a 200 for the same input. The access log (which also holds deploy's own smoke tests of
    # /predictions/b4) shows no other status than 200 and those 400s.
    refused = refusals_are_key_refusals_retried(wire)
    assert sum(r.attempts - 1 for r in results) == len(refused)
    statuses = access_statuses(access_log, at_least=len(wire))
    assert set(statuses) <= {200, 400}, statuses
    assert statuses.count(200) >= len(results) and statuses.count(400) >= len(refused)
    answered_once(model_log, results)  # no request was run twice, by either version
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
    result = subprocess.run(
        [str(Path(server.env["VENV"]) / "bin" / "python"), "-m", "b4serve.ops.manage", "--log-dir",
         str(server.log_dir), "--timeout", "600", "rollout", "--mar", "b4-broken.mar",
         "--version", "broken"],
        env=server.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    # failed on the worker's death, read from the log, not by waiting out the 600 s timeout
    # (which the subprocess's own 300 s limit would have cut short)
    assert "died while loading" in result.stderr or "from the model log" in result.stderr
    assert "cannot load: weights for another model" in result.stderr
    assert serving_version(server) == serving  # the good version never stopped serving
    versions = ManagementAPI(server.endpoints, server.keys).versions("b4")
    assert [v["modelVersion"] for v in versions] == [serving]  # the broken one was removed
    body = encode_npy(np.zeros((16, 16, 3), np.uint8))
    assert server.post(body).status_code == 200


def test_hostile_bodies_fail_alone_next_to_good_requests(server: Server) -> None:
    api = ManagementAPI(server.endpoints, server.keys)
    workers_before = {w["pid"] for w in api.describe("b4", serving_version(server))["workers"]}
    good = encode_npy(demo_images(1, seed=781)[0][0])
    (expected,) = reference(server).classify([good])
    # One body of each answer the corpus expects (status and message): every body of it is sent
    # beside good requests on both ports by test_request_limits.py; here each kind of failure
    # shares a server batch with a good request, three at a time (read from the model log).
    kinds: dict[tuple[int, str], Case] = {}
    for case in HOSTILE:
        kinds.setdefault((case.status, case.words), case)
    cases = list(kinds.values())
    statuses: dict[str, tuple[int, dict]] = {}
    for start in range(0, len(cases), 3):
        chunk = cases[start : start + 3]
        responses = in_one_batch(server, [c.body for c in chunk] + [good], f"hostile-{start}")
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
        assert server.post(body).status_code == 200, name
    ping = requests.get(f"{server.endpoints.inference_url}/ping",
                        headers=server.keys.auth_headers("inference"), timeout=10)  # fmt: skip
    assert ping.json()["status"] == "Healthy"
    workers_after = {w["pid"] for w in api.describe("b4", serving_version(server))["workers"]}
    assert workers_after == workers_before  # no worker died or restarted


def test_body_over_max_request_size_is_refused_and_the_server_goes_on(server: Server) -> None:
    properties = (Path(__file__).resolve().parents[2] / "config.properties").read_text()
    limit = int(re.search(r"^max_request_size=(\d+)$", properties, re.M).group(1))
    refused = server.post(b"\x93NUMPY" + b"\0" * limit)
    assert refused.status_code == 413, refused.text[:300]
    good = encode_npy(np.zeros((16, 16, 3), np.uint8))
    assert server.post(good).status_code == 200


def test_worker_killed_mid_load_is_restarted_and_the_client_loses_nothing(server: Server) -> None:
    api = ManagementAPI(server.endpoints, server.keys)
    version = serving_version(server)
    (victim,) = [w["pid"] for w in api.describe("b4", version)["workers"]]
    # describe-model's pid is the worker's own (it prints it when it starts): check it is one
    assert "model_service_worker" in Path(f"/proc/{victim}/cmdline").read_text()
    images, labels = demo_images(2, seed=782)
    model_log = LogWatch(server.log_dir)
    results: list[Result] = []

    def run_job() -> None:
        retry = RetryPolicy(retries=8, backoff_s=1.0, max_backoff_s=8.0)
        for result in iter_results(images, endpoints=server.endpoints, concurrency=8, retry=retry):
            results.append(result)

    job = threading.Thread(target=run_job)
    job.start()
    # 8 in flight for a batch size of 4: while the worker runs one batch, the next one waits,
    # so the kill lands on a batch in the worker. Kill once the first answer is back.
    deadline = time.monotonic() + 120
    while not results and time.monotonic() < deadline:
        time.sleep(0.05)
    answered_before_kill = len(results)
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    assert 1 <= answered_before_kill < len(images)  # the kill came in the middle of the job
    assert not Path(f"/proc/{victim}").exists()  # it died (and the frontend reaped it)
    assert [r.ok for r in results] == [True] * len(images), [r for r in results if not r.ok][:2]
    assert [int(np.argmax(r.probabilities)) for r in results] == labels
    assert any(r.attempts > 1 for r in results)  # the batch the worker held failed, was resent
    counts = handled_counts(handled_batches(model_log, waiting_for=[r.request_id for r in results]))
    assert all(counts[r.request_id] >= 1 for r in results)  # answered by the handler itself
    # The frontend restarts the worker with a backoff; describe-model shows the old pid until
    # the new worker has started, so wait for it rather than read it once.
    deadline = time.monotonic() + 120
    while True:
        workers = api.describe("b4", version)["workers"]
        if [w["status"] for w in workers] == ["READY"] and workers[0]["pid"] != victim:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)
    assert "model_service_worker" in Path(f"/proc/{workers[0]['pid']}/cmdline").read_text()


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
    command = [python, "-m", "b4serve.client", *paths, "--output", str(output),
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
