"""The frontend's memory budget: its arithmetic, and the shipped configs that must fit it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from b4serve.ops.budget import UPLOADS, Budget, jvm_memory, read_properties
from b4serve.serving.config import MAX_BODY_BYTES

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def test_the_worst_case_is_every_slot_holding_a_largest_body() -> None:
    budget = Budget(
        heap=2048 * MiB,
        direct=4096 * MiB,
        body=16 * MiB,
        queue=10,
        netty_threads=2,
        versions=2,
        workers=1,
        batch_size=4,
        uploads=8,
    )
    # 2 versions x (10 queued + 1 x 4 in a batch x 3) + 2 threads = 46 bodies, + 256 MiB
    assert budget.heap_needed == (46 * 16 + 256) * MiB
    # 8 arriving x 2 (+ 8 KiB each) + 2 x 1 x 4 written to workers
    assert budget.direct_needed == 8 * (32 * MiB + 8192) + 8 * 16 * MiB
    assert budget.problems() == []
    assert budget.uploads_held == (4096 - 128) * MiB // (32 * MiB + 8192)


def test_a_body_takes_whole_g1_regions_on_the_heap() -> None:
    small = Budget(heap=2048 * MiB, direct=0, body=MAX_BODY_BYTES)
    assert small.g1_region == MiB and small.body_on_heap == 17 * MiB
    big = Budget(heap=16 << 30, direct=0, body=MAX_BODY_BYTES)  # 8 MiB regions
    assert big.g1_region == 8 * MiB and big.body_on_heap == 24 * MiB


def test_the_shipped_config_fits_one_or_two_workers_during_a_rollout() -> None:
    properties = read_properties(ROOT / "config.properties")
    assert int(properties["max_request_size"]) == MAX_BODY_BYTES
    for workers in (1, 2):  # the default, and the layout the README suggests for load
        budget = Budget.from_properties(properties, workers=workers)
        assert budget.versions == 2 and budget.uploads == UPLOADS == 64
        assert budget.problems() == [], budget.lines()
        assert budget.uploads_held >= UPLOADS


def test_the_kserve_config_fits_one_version_with_batches_of_one() -> None:
    properties = read_properties(ROOT / "deploy" / "kserve" / "config.properties")
    budget = Budget.from_properties(properties, versions=1, batch_size=1, uploads=31)
    assert budget.problems() == [], budget.lines()
    # with the worker (about 1.2 GiB) and the JVM's own 200 MiB, within the pod's 4 GiB
    assert budget.heap + budget.direct + 200 * MiB + 1230 * MiB <= 4096 * MiB


def test_the_old_config_could_not_hold_its_worst_case() -> None:
    old = {"vmargs": "-Xmx2g -XX:MaxDirectMemorySize=2g", "max_request_size": "134221836"}
    budget = Budget.from_properties(old, netty_threads=4)
    heap, direct = budget.problems()
    assert "cannot hold the worst case of" in heap and "raise -Xmx" in heap
    assert "holds 3 largest bodies arriving at once, not 64" in direct


def test_netty_threads_left_to_the_default_grow_with_the_cores() -> None:
    budget = Budget.from_properties({"vmargs": "-Xmx2g -XX:MaxDirectMemorySize=2g"})
    assert budget.threads == 2 * (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("vmargs", "words"),
    [
        ("-Xmx2g -XX:+ExitOnOutOfMemoryError", "must set -XX:MaxDirectMemorySize"),
        ("-XX:MaxDirectMemorySize=1g", "must set -Xmx"),
        ("-Xmx2gb -XX:MaxDirectMemorySize=1g", "cannot read the size in '-Xmx2gb'"),
    ],
)
def test_jvm_sizes_must_be_explicit_and_readable(vmargs: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        jvm_memory(vmargs)
    assert jvm_memory("-Xmx2560m -XX:MaxDirectMemorySize=1g") == (2560 * MiB, 1 << 30)


def test_cli_prints_the_arithmetic_and_fails_a_config_that_does_not_fit(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "b4serve.ops.budget", "--config"]
    fits = subprocess.run(
        [*command, str(ROOT / "config.properties")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert fits.returncode == 0, fits.stderr
    assert "heap: 2 versions x (32 queued" in fits.stdout
    small = tmp_path / "config.properties"
    small.write_text((ROOT / "config.properties").read_text().replace("-Xmx2560m", "-Xmx1g"))
    refused = subprocess.run(
        [*command, str(small)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1
    assert "the heap (-Xmx1024m) cannot hold the worst case of 1820 MiB" in refused.stderr
