"""The allocator setting in a fresh process (mallopt is process-wide and cannot be undone)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from b4serve.allocator import freeze_long_lived_objects, keep_freed_memory

# Allocates and frees a 64 MiB tensor 20 times after a warm-up (the heap settles in a few
# rounds); prints the minor page faults those 20 took.
FAULTS = """
import resource, sys, torch
from b4serve.allocator import freeze_long_lived_objects, keep_freed_memory
took = keep_freed_memory(int(sys.argv[1]))
for _ in range(10):
    torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20).sum()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep_mb: int) -> tuple[bool, int]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, str(keep_mb)], capture_output=True, text=True, check=True
    )
    took, count = result.stdout.split()
    return took == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    default_took, default_faults = faults(0)
    kept_took, kept_faults = faults(512)
    assert (default_took, kept_took) == (False, True)
    # glibc's default maps and unmaps each 64 MiB block: 16k pages faulted in, every time
    assert default_faults > 20 * 16_000
    # kept: the pages freed in the warm-up serve them all
    assert kept_faults < 16_000


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
