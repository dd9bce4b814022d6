"""The allocator setting in a fresh process (mallopt is process-wide and cannot be undone)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from b4serve.serving.allocator import freeze_long_lived_objects, keep_freed_memory

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
BLOCK_PAGES = (64 << 20) // 4096


def blocks_faulted_in(keep_mb: int) -> tuple[bool, int]:
    """Whether the setting took, and how many of the 40 allocations faulted in a whole block."""
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, str(keep_mb)], capture_output=True, text=True, check=True
    )
    took, *faults = result.stdout.split()
    return took == "True", sum(int(count) >= BLOCK_PAGES for count in faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    default_took, default_blocks = blocks_faulted_in(0)
    kept_took, kept_blocks = blocks_faulted_in(512)
    assert (default_took, kept_took) == (False, True)
    # glibc's default maps and unmaps each 64 MiB block: all of it faulted in, every time
    assert default_blocks == 40
    # kept: the heap grows a few times while it settles (3 to 6 of 40 in 30 runs here, at
    # random as other threads allocate too), then serves every block from pages it has
    assert kept_blocks <= 10


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
