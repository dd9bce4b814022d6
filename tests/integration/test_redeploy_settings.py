"""Deploy serves exactly what was asked: the same checkpoint with another arch and other class
names is a new build, rolled out; deploying it again rebuilds nothing; a new batch size packs the
same build as a new version; each deploy says in one line what changed and what it did."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from b4serve.client import predict_many
from b4serve.lab.sandbox import Server
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy

pytestmark = pytest.mark.integration

NAMES = "cat,dog,owl,fox,elk,yak"
# Pinned so that the test times no runtimes: the runtime choice has its own tests.
ARCH_CHANGE = {
    "B4_ARCH": "tf_efficientnet_b4",
    "B4_CLASS_NAMES": NAMES,
    "B4_RUNTIME": "torchscript",
}


def serving(server: Server) -> str:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    return version


def summary_line(stderr: str) -> str:
    """The deploy's closing line about ``b4`` (what changed; what it did)."""
    lines = [line for line in stderr.splitlines() if line.startswith("[deploy] b4 ")]
    assert lines, stderr[-2000:]
    return lines[-1]


def archive_meta(server: Server, version: str) -> tuple[dict, list[str]]:
    """The arch metadata and the class names the archive of ``version`` holds."""
    store = Path(server.env["B4_MODEL_STORE"])
    with zipfile.ZipFile(store / f"b4-{version}.mar") as archive:
        labels = json.loads(archive.read("index_to_name.json"))
        return json.loads(archive.read("model_meta.json")), [labels[str(i)] for i in range(6)]


def in_process(server: Server, version: str, bodies: list[bytes]) -> np.ndarray:
    """What ``version``'s build answers for ``bodies``, run here the way its worker runs it."""
    return np.array([o.probabilities for o in server.classifier(version).classify(bodies)])


def test_a_changed_setting_is_a_new_build_and_the_same_settings_rebuild_nothing(
    server: Server,
) -> None:
    before = serving(server)
    examples = Path(server.env["B4_CACHE_DIR"]) / "demo" / "examples"
    images = [np.load(path) for path in sorted(examples.glob("*.npy"))[:2]]
    bodies = [encode_npy(image) for image in images]
    try:
        changed = server.deploy(**ARCH_CHANGE)
        version = serving(server)
        assert version != before
        line = summary_line(changed.stderr)
        assert "B4_ARCH unset -> tf_efficientnet_b4" in line, line
        assert f"B4_CLASS_NAMES unset -> {NAMES}" in line, line
        assert (
            f"built it (export, parity, runtime choice, archive), rolled it out, retired {before}"
            in line
        )
        meta, names = archive_meta(server, version)
        assert meta["arch"] == "tf_efficientnet_b4" and names == NAMES.split(",")
        # what answers is the new build: equal to it, run in process, and not to the old one
        served = np.array(
            [r.probabilities for r in predict_many(images, endpoints=server.endpoints)]
        )
        np.testing.assert_allclose(served, in_process(server, version, bodies), atol=1e-5, rtol=0)
        assert np.abs(served - in_process(server, before, bodies)).max() > 1e-3

        started = time.monotonic()
        again = server.deploy(**ARCH_CHANGE)
        print(f"\n[redeploy] an identical deploy took {time.monotonic() - started:.1f} s")
        assert serving(server) == version
        assert summary_line(again.stderr).endswith(
            f"b4 {version}: nothing changed; already serving it: nothing to do"
        )
        assert "export of" not in again.stderr and "archive b4-" not in again.stderr

        batched = server.deploy(B4_BATCH_SIZE="2", **ARCH_CHANGE)
        repacked = serving(server)
        assert repacked.startswith(f"{version}-r")
        line = summary_line(batched.stderr)
        assert (
            "batch size 4 -> 2; packed the same build for the new registration (no rebuild)" in line
        )
        assert "export of" not in batched.stderr
        describe = ManagementAPI(server.endpoints, server.keys).describe("b4", repacked)
        assert describe is not None and describe["batchSize"] == 2
    finally:
        server.deploy()  # back to the session's own build, for the tests after this one
    assert serving(server) == before
