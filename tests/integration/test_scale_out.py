"""Two replicas behind the edge (HAProxy, scripts/edge.sh), and a new version rolled through
them one at a time while 8 clients run: no request fails, every input is answered exactly once,
counted from the servers' own logs.

What a rolling update does to a Deployment's pods, on loopback, with the edge's own mechanisms
only: `edge.sh --drain NAME` takes the replica out of HAProxy's pool and returns once HAProxy
holds nothing for it; the replica is stopped and deployed again on the new version (the same
model store, as pods share a volume); `edge.sh --ready NAME` puts it back, and HAProxy's health
checks (/ping, /v2/health/ready) send it requests once it answers them. Then the next replica.
The clients send each input once, with no retries: a request the rollout broke is a failure.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.edge import Edge
from b4serve.lab.sandbox import Server, post, server_env
from b4serve.lab.served_log import handled_batches, handled_counts
from b4serve.ops.edge import Runtime, server_states
from b4serve.ops.keys import bearer
from b4serve.ops.manage import LogWatch, ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.request_ids import REQUEST_ID_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

IMAGES, _ = generate_images(per_class=1, seed=23, size=96)
CLIENTS = 8


def relabelled(store: Path, mar: str, version: str) -> str:
    """A copy of archive ``mar`` registered as ``version``: the same model under a new version,
    so every answer is checked against one reference and says which version gave it."""
    name = f"b4-{version}.mar"
    with zipfile.ZipFile(store / mar) as source, zipfile.ZipFile(store / name, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            target.writestr(item, data)
    return name


@pytest.fixture(scope="module")
def replicas(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Two replicas sharing one model store (as pods of a Deployment share a volume), seeded
    with the session server's archive of the demo model: deploy.sh finds it there and builds
    nothing."""
    store = tmp_path_factory.mktemp("shared-store")
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    shutil.copy(Path(server.env["B4_MODEL_STORE"]) / f"b4-{version}.mar", store)
    started: dict[str, Server] = {}
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"replica-{name}")
        started[name] = Server(env={**server_env(root), "B4_MODEL_STORE": str(store)}, root=root)
    try:
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda replica: replica.deploy(), started.values()))
        yield started
    finally:
        for replica in started.values():
            if Path(replica.env["B4_RUN_DIR"]).is_dir():  # deploy.sh got as far as that
                replica.stop()


@pytest.fixture(scope="module")
def edge(replicas: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    running = Edge.in_front_of(
        replicas, tmp_path_factory.mktemp("edge"), B4_EDGE_CHECK_INTERVAL_MS="500"
    )
    try:
        running.start()
        for name in replicas:
            wait_in_pool(running, name)
        yield running
    finally:
        running.stop()


def wait_in_pool(edge: Edge, name: str, within_s: float = 120) -> None:
    """Until HAProxy's health checks have put replica ``name`` in both pools."""
    runtime = Runtime(edge.dir / "admin.sock")
    deadline = time.monotonic() + within_s
    while True:
        states = server_states(runtime)
        if all(states[(api, name)]["status"] == "UP" for api in ("predictions", "v2")):
            return
        assert time.monotonic() < deadline, f"replica {name} not in the pool: {states}"
        time.sleep(0.25)


def handled_by(logs: dict[str, LogWatch], ids: list[str]) -> dict[str, Counter[str]]:
    """Per replica, how often its handler logged each id (waiting for all of them)."""
    counts = {name: Counter[str]() for name in logs}
    for name, log in logs.items():
        counts[name] = handled_counts(handled_batches(log, within_s=0))
    missing = [i for i in ids if not any(c[i] for c in counts.values())]
    if missing:  # the model logs are written asynchronously: wait for the rest
        time.sleep(5)
        counts = {
            name: handled_counts(handled_batches(log, within_s=0)) for name, log in logs.items()
        }
    return counts


def test_rolling_a_new_version_through_two_replicas_behind_the_edge_loses_nothing(
    replicas: dict[str, Server], edge: Edge
) -> None:
    first = replicas["a"]
    old = ManagementAPI(first.endpoints, first.keys).default_version("b4")
    assert old is not None
    store = Path(first.env["B4_MODEL_STORE"])
    new = f"{old}-r2"
    relabelled(store, f"b4-{old}.mar", new)
    checkpoint = Path(first.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt"
    credential = edge.issue("rollout")
    whole_run = {name: LogWatch(server.log_dir) for name, server in replicas.items()}
    rolled = threading.Event()
    answers: dict[str, list[float]] = {}
    failures: list[str] = []
    sent: list[str] = []
    images: dict[str, int] = {}

    def client(index: int) -> None:
        """Sends its own inputs, one at a time, each once, until two after the rollout."""
        count = after = 0
        while after < 2:
            after += rolled.is_set()
            request_id = f"c{index}-{count}"
            which = (index + count) % len(IMAGES)
            image = IMAGES[which]
            sent.append(request_id)
            images[request_id] = which
            try:
                response = post(
                    f"{edge.url}/predictions/b4",
                    encode_npy(image),
                    {REQUEST_ID_HEADER: request_id, **bearer(credential)},
                )
                if response.status_code == 200:
                    answers[request_id] = response.json()
                else:
                    failures.append(f"{request_id}: {response.status_code} {response.text[:200]}")
            except requests.RequestException as error:
                failures.append(f"{request_id}: {error}")
            count += 1

    after_restart: dict[str, LogWatch] = {}
    drains: dict[str, float] = {}
    with ThreadPoolExecutor(CLIENTS) as pool:
        jobs = [pool.submit(client, index) for index in range(CLIENTS)]
        try:
            time.sleep(3)  # load on both replicas before the first one goes
            for name, server in replicas.items():
                started = time.monotonic()
                edge.run("--drain", name)  # returns once HAProxy holds nothing for it
                drains[name] = time.monotonic() - started
                server.stop()
                server.deploy("--checkpoint", str(checkpoint), "--version", new)
                after_restart[name] = LogWatch(server.log_dir)
                edge.run("--ready", name)
                wait_in_pool(edge, name)
                time.sleep(3)  # both serving again before the next one goes
        finally:
            rolled.set()  # the clients finish (before the pool is left) even on a failure
        for job in jobs:
            job.result(timeout=300)

    assert failures == [], failures[:5]
    assert len(set(sent)) == len(sent) and set(answers) == set(sent)
    counts = handled_by(whole_run, sent)
    total = sum(counts.values(), Counter[str]())
    assert {i: total[i] for i in sent} == dict.fromkeys(sent, 1)  # each answered once, per logs
    for name in replicas:  # each replica served before its restart and after it
        assert (
            sum(counts[name].values())
            > sum(handled_counts(handled_batches(after_restart[name], within_s=0)).values())
            > 0
        ), name
        api = ManagementAPI(replicas[name].endpoints, replicas[name].keys)
        assert [v["modelVersion"] for v in api.versions("b4")] == [new]
    reference: dict[int, list[float]] = {}
    for request_id, probabilities in answers.items():  # the same model on any replica, version
        row = reference.setdefault(images[request_id], probabilities)
        np.testing.assert_allclose(probabilities, row, atol=1e-5)
    served = {name: sum(c.values()) for name, c in counts.items()}
    waits = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in drains.items())
    print(f"\n[scale-out] {len(sent)} inputs, 0 failed, served {served}; drains took {waits}")
