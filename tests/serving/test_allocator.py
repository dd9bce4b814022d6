"""The allocator setting in a fresh process (mallopt is process-wide and cannot be undone)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from b4serve.serving.allocator import (
    HeldMemory,
    freeze_long_lived_objects,
    keep_freed_memory,
    retained_by_worker,
)

# Allocates and frees a 64 MiB tensor 40 times; prints, for each time, the minor page faults it
# took.
FAULTS = """
import resource, sys, torch
from b4serve.serving.allocator import keep_freed_memory
took = keep_freed_memory(int(sys.argv[1]))
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *faults)
"""


def faults_per_allocation(keep_mb: int) -> tuple[bool, list[int]]:
    """Whether the setting took, and the page faults each of the 40 allocations took."""
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, str(keep_mb)], capture_output=True, text=True, check=True
    )
    took, *faults = result.stdout.split()
    return took == "True", [int(count) for count in faults]


def faulted_in_anew(faults: list[int]) -> int:
    """How many allocations after the first faulted in (at least half) a whole block again.

    The first allocation's faults are what fresh memory costs on this machine: a fault maps 4 KiB,
    or more where the kernel maps larger folios (transparent huge pages, multi-size THP: 16 KiB
    per fault on this host), so a fixed page count would say more about the kernel than about
    malloc.
    """
    fresh = faults[0]
    return sum(count >= fresh / 2 for count in faults[1:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    default_took, default_faults = faults_per_allocation(0)
    kept_took, kept_faults = faults_per_allocation(512)
    assert (default_took, kept_took) == (False, True)
    assert default_faults[0] > 0 and kept_faults[0] > 0  # the first block is fresh memory
    # glibc's default maps and unmaps each 64 MiB block: all of it faulted in, every time
    assert faulted_in_anew(default_faults) == 39, default_faults
    # kept: the heap grows a few times while it settles (3 to 6 of 40 in 30 runs here, at
    # random as other threads allocate too), then serves every block from pages it has
    assert faulted_in_anew(kept_faults) <= 10, kept_faults


def test_zero_keeps_glibcs_defaults() -> None:
    assert keep_freed_memory(0) is False


def test_frozen_objects_are_left_out_of_collections_and_new_garbage_still_goes() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    long_lived = [Node() for _ in range(100)]
    try:
        assert freeze_long_lived_objects() >= len(long_lived)
        assert all(gc.is_tracked(node) for node in long_lived)
        frozen = gc.get_freeze_count()
        Node()  # garbage made after the freeze
        assert gc.collect() >= 1
        assert gc.get_freeze_count() == frozen  # collections leave the frozen ones alone
    finally:
        gc.unfreeze()  # this test process goes on


# Allocates a 256 MiB tensor and a 1 MiB one after the setting (or none), then frees the first;
# prints held memory before the allocations, while both are held, and after, in bytes.
HELD = """
import sys, torch
from b4serve.serving.allocator import held_memory, keep_freed_memory
keep_freed_memory(int(sys.argv[1]))
torch.ones(1).sum()  # torch's own first allocations
before = held_memory()
block = torch.ones(64 << 20)
pin = torch.ones(1 << 18)  # after the block in the heap: the freed block is not the heap's top
during = held_memory()
del block
after = held_memory()
for held in (before, during, after):
    print(held.resident_bytes, held.malloc_free_bytes, held.retained_bytes)
"""


def held_around_a_block(keep_mb: int) -> list[tuple[int, int, int]]:
    """(resident, malloc free, retained) bytes before, during and after a 256 MiB block."""
    result = subprocess.run(
        [sys.executable, "-c", HELD, str(keep_mb)], capture_output=True, text=True, check=True
    )
    return [tuple(int(n) for n in line.split()) for line in result.stdout.splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retained_memory_leaves_out_what_malloc_keeps_free() -> None:
    block = 256 << 20
    (resident0, _, retained0), during, (resident2, free2, retained2) = held_around_a_block(512)
    assert during[2] - retained0 > 0.95 * block  # held: retained
    assert resident2 - resident0 > 0.95 * block  # freed, and kept resident for reuse...
    assert free2 > 0.95 * block  # ...as malloc's free memory...
    assert abs(retained2 - retained0) < 16 << 20  # ...so not retained
    # glibc's default maps such a block and unmaps it when freed: nothing kept, nothing to leave out
    (resident0, _, _), _, (resident2, free2, _) = held_around_a_block(0)
    assert abs(resident2 - resident0) < 16 << 20 and free2 < 16 << 20


def test_the_retained_memory_a_worker_logs_is_read_back_per_worker() -> None:
    prefix = "2026-12-02T15:02:11.201+0000 [INFO ] {}-stdout MODEL_LOG -"
    batch = "batch of 4 images: 0 failed [], decode 2.1 ms, model 80.2 ms; "
    lines = [
        f"{prefix.format('W-9000-b4_4a29')} {batch}{HeldMemory(700 << 20, 88 << 20).describe()}",
        f"{prefix.format('W-9001-b4_4a29')} {batch}{HeldMemory(690 << 20, 80 << 20).describe()}",
        f"{prefix.format('W-9000-b4_4a29')} handled requests: soak-1-0=200",
        f"{prefix.format('W-9000-b4_4a29')} {batch}{HeldMemory(701 << 20, 88 << 20).describe()}",
        "2026-12-02T15:02:11.300+0000 [INFO ] epollEventLoopGroup-3-2 ACCESS_LOG - memory retained"
        " 5.0 MiB",  # not a worker's line
    ]
    assert retained_by_worker(lines) == {"W-9000-b4_4a29": 613.0, "W-9001-b4_4a29": 610.0}
    assert HeldMemory(700 << 20, 88 << 20).describe() == (
        "memory retained 612.0 MiB (resident 700.0, malloc free 88.0)"
    )
    assert retained_by_worker([]) == {}
