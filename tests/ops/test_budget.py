"""The frontend's memory budget: its arithmetic, and the shipped configs that must fit it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from b4serve.ops import budget as budget_module
from b4serve.ops.budget import UPLOADS, V2_BUFFERED, Budget, jvm_memory, read_properties, registered
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


def test_the_kserve_config_fits_what_its_snapshot_registers() -> None:
    properties = read_properties(ROOT / "deploy" / "kserve" / "config.properties")
    assert registered(properties) == {"versions": 1, "workers": 1, "batch_size": 4}
    budget = Budget.from_properties(properties, uploads=31)
    assert (budget.versions, budget.workers, budget.batch_size) == (1, 1, 4)
    assert budget.v2_buffered == int(properties[V2_BUFFERED]) > 0  # its data plane's bodies
    assert budget.problems() == [], budget.lines()
    # with the worker (about 1.2 GiB) and the JVM's own 200 MiB, within the pod's 4 GiB
    assert budget.heap + budget.direct + 200 * MiB + 1230 * MiB <= 4096 * MiB


def test_a_snapshot_registering_more_than_the_heap_holds_is_refused() -> None:
    properties = read_properties(ROOT / "deploy" / "kserve" / "config.properties")
    bigger = {**properties, "model_snapshot": properties["model_snapshot"].replace(
        '"batchSize":4', '"batchSize":64')}  # fmt: skip
    heap, direct = Budget.from_properties(bigger, uploads=31).problems()
    assert "holds 1 largest bodies arriving at once, not 31" in direct
    assert "with 1 worker(s) x batch size 64: raise -Xmx, or lower the batch size (to 5" in heap
    with pytest.raises(ValueError, match="cannot read model_snapshot"):
        registered({"model_snapshot": '{"models": {"b4": {"1": {"batchSize": 4}}}}'})


def test_the_v2_listeners_bodies_count_twice_on_the_heap() -> None:
    base = Budget(heap=4096 * MiB, direct=4096 * MiB)
    with_v2 = dataclasses.replace(base, v2_buffered=128 * MiB)
    assert with_v2.heap_needed - base.heap_needed == 256 * MiB  # G1's whole regions: x2
    assert "+ 2 x 128 MiB of v2 bodies arriving (b4_v2_max_buffered_bytes)" in with_v2.lines()[1]
    shipped = read_properties(ROOT / "config.properties")
    assert Budget.from_properties(shipped, environ={}).v2_buffered == 128 * MiB
    # the listener's own rule: B4_V2_MAX_BUFFERED_BYTES wins where env vars may override keys
    moved = {"B4_V2_MAX_BUFFERED_BYTES": str(512 * MiB)}
    assert Budget.from_properties(shipped, environ=moved).v2_buffered == 512 * MiB
    closed = {**shipped, "enable_envvars_config": "false"}
    assert Budget.from_properties(closed, environ=moved).v2_buffered == 128 * MiB


def test_the_cli_budgets_for_what_rollout_registers_on_gpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "config.properties")
    monkeypatch.setattr(budget_module, "torchserve_gpus", lambda config: 1)  # a 1-GPU host
    assert budget_module.main(["--config", config]) == 1
    heap, direct = capsys.readouterr().err.strip().splitlines()
    assert "with 2 worker(s) x batch size 64: raise -Xmx, or lower the batch size (to 4" in heap
    assert "not 64: raise it to" in direct
    # what deploy passes when B4_BATCH_SIZE and B4_INITIAL_WORKERS are set wins
    assert budget_module.main(["--config", config, "--batch-size", "4", "--workers", "2"]) == 0
    monkeypatch.setattr(budget_module, "torchserve_gpus", lambda config: 0)  # CPUs only
    assert budget_module.main(["--config", config]) == 0
    assert "1 worker(s) x 4 in a batch" in capsys.readouterr().out


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
    assert "the heap (-Xmx1024m) cannot hold the worst case of 2076 MiB" in refused.stderr
