"""Two replicas behind one client-side load balancer, and a new version rolled through them one at
a time while a client job runs: no request fails, every input is answered exactly once.

What a Kubernetes rolling update does to a Deployment's pods, on loopback: the balancer sends
only to replicas whose v2 readiness (/v2/health/ready) answers 200; a replica is taken out of
rotation, drained of the requests it holds, stopped, and started again on the new version (the
same model store, as pods share a volume), back in rotation from its start as a new pod is in
its Service: its readiness alone keeps requests away until the new version answers. Then the
next replica. One worker each, the smallest setup that shows it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import ROOT, Server, server_env
from b4serve.ops.keys import KeyFileError
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.protocol import OUTPUT_NAME, encode_request

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

IMAGES, _ = generate_images(per_class=1, seed=23, size=96)
CLIENTS = 4


@dataclass
class Replica:
    """One server as the balancer sees it."""

    name: str
    server: Server
    in_rotation: bool = True
    ready: bool = False
    in_flight: int = 0


@dataclass
class Balancer:
    """Round-robin over the replicas in rotation whose /v2/health/ready says 200."""

    replicas: list[Replica]
    lock: threading.Condition = field(default_factory=threading.Condition)
    turn: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)

    def watch(self, interval_s: float = 0.2) -> None:
        """Poll every replica's readiness until stopped (the balancer's health check)."""
        while not self.stopped.is_set():
            for replica in self.replicas:
                ready = _is_ready(replica.server)
                with self.lock:
                    replica.ready = ready
                    self.lock.notify_all()
            time.sleep(interval_s)

    def acquire(self, timeout_s: float = 120) -> Replica:
        """The next usable replica, its request counted in flight; waits while none is."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while True:
                usable = [r for r in self.replicas if r.in_rotation and r.ready]
                if usable:
                    replica = usable[self.turn % len(usable)]
                    self.turn += 1
                    replica.in_flight += 1
                    return replica
                if not self.lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("no replica ready")

    def release(self, replica: Replica) -> None:
        with self.lock:
            replica.in_flight -= 1
            self.lock.notify_all()

    def drain(self, replica: Replica) -> None:
        """Out of rotation, then wait until the requests it holds are answered."""
        with self.lock:
            replica.in_rotation = False
            while replica.in_flight:
                self.lock.wait()

    def restore(self, replica: Replica, timeout_s: float = 300) -> None:
        """Back in rotation; returns once the health check has seen it ready."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            replica.ready = False  # what the health check saw before the restart is stale
            replica.in_rotation = True
            while not replica.ready:
                left = deadline - time.monotonic()
                assert left > 0, f"replica {replica.name} not ready after {timeout_s:.0f} s"
                self.lock.wait(timeout=left)


def _is_ready(server: Server) -> bool:
    try:
        headers = server.keys.auth_headers("inference")
        response = requests.get(f"{server.endpoints.v2_url}/v2/health/ready",
                                headers=headers, timeout=2)  # fmt: skip
    except (requests.RequestException, KeyFileError):  # down, or its key file not written yet
        return False
    return response.status_code == 200


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
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    store = tmp_path_factory.mktemp("shared-store")  # one volume, as pods of a Deployment share
    started: list[Replica] = []
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"replica-{name}")
        server = Server(env={**server_env(root), "B4_MODEL_STORE": str(store)}, root=root)
        started.append(Replica(name, server))
    try:
        # The archive once, then both replicas at once: each finds it in the store.
        demo = Path(started[0].server.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt"
        built = subprocess.run(
            [str(ROOT / "scripts" / "build_mar.sh"), "--checkpoint", str(demo),
             "--trust-checkpoint"],
            env=started[0].server.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda replica: replica.server.deploy(), started))
        yield started
    finally:
        for replica in started:
            if Path(replica.server.env["B4_RUN_DIR"]).is_dir():  # deploy.sh got as far as that
                replica.server.stop()


def test_rolling_a_new_version_through_two_replicas_loses_nothing(
    replicas: list[Replica],
) -> None:
    first = replicas[0].server
    old = ManagementAPI(first.endpoints, first.keys).default_version("b4")
    assert old is not None
    store = Path(first.env["B4_MODEL_STORE"])
    new = f"{old}-r2"
    relabelled(store, f"b4-{old}.mar", new)
    checkpoint = Path(first.env["B4_CACHE_DIR"]) / "demo" / "demo_checkpoint.pt"

    balancer = Balancer(replicas)
    watcher = threading.Thread(target=balancer.watch, daemon=True)
    watcher.start()
    rolled = threading.Event()
    answers: dict[str, dict] = {}
    failures: list[str] = []
    sent = Counter()

    def client(index: int) -> None:
        """Sends its own inputs, one at a time, never twice, until two after the rollout."""
        count = after = 0
        while after < 2:
            after += rolled.is_set()
            request_id = f"c{index}-{count}"
            which = (index + count) % len(IMAGES)
            image = IMAGES[which]
            document = json.loads(encode_request(image, "v2")[0]) | {"id": request_id}
            replica = balancer.acquire()
            sent[request_id] += 1
            try:
                response = requests.post(
                    f"{replica.server.endpoints.v2_url}/v2/models/b4/infer",
                    data=json.dumps(document), timeout=120,
                    headers={"Content-Type": "application/json",
                             **replica.server.keys.auth_headers("inference")},
                )  # fmt: skip
                if response.status_code != 200:
                    failures.append(f"{request_id} on {replica.name}: {response.text[:200]}")
                else:
                    answers[request_id] = response.json() | {
                        "replica": replica.name,
                        "image": which,
                    }
            except requests.RequestException as error:
                failures.append(f"{request_id} on {replica.name}: {error}")
            finally:
                balancer.release(replica)
            count += 1

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            jobs = [pool.submit(client, index) for index in range(CLIENTS)]
            try:
                time.sleep(3)  # load on both replicas before the first one goes
                for replica in replicas:
                    balancer.drain(replica)
                    replica.server.stop()
                    # Back in rotation as it starts, as a new pod joins its Service: only its
                    # readiness keeps requests away until the new version can answer them.
                    with ThreadPoolExecutor(1) as starter:
                        started = starter.submit(
                            replica.server.deploy, "--checkpoint", str(checkpoint),
                            "--version", new,
                        )  # fmt: skip
                        balancer.restore(replica)
                        started.result()
                    time.sleep(2)  # both serving again before the next one goes
            finally:
                rolled.set()  # the clients finish (before the pool is left) even on a failure
            for job in jobs:
                job.result(timeout=300)
    finally:
        balancer.stopped.set()
        watcher.join(timeout=10)

    assert failures == [], failures[:5]
    assert set(sent.values()) == {1} and set(answers) == set(sent)  # each input once, answered
    reference: dict[int, list[float]] = {}
    for answer in answers.values():
        (output,) = answer["outputs"]
        assert output["name"] == OUTPUT_NAME and answer["id"] in sent
        row = reference.setdefault(answer["image"], output["data"])
        np.testing.assert_allclose(output["data"], row, atol=1e-5)  # same model, any replica
    served = Counter((a["replica"], a["model_version"]) for a in answers.values())
    # both replicas served before and after: the job ran across the whole rollout
    assert set(served) == {("a", old), ("a", new), ("b", old), ("b", new)}, served
    for replica in replicas:
        api = ManagementAPI(replica.server.endpoints, replica.server.keys)
        assert [v["modelVersion"] for v in api.versions("b4")] == [new]
    print(f"\n[scale-out] {len(answers)} answers: {dict(served)}")
