"""The allocator setting in a fresh process (mallopt is process-wide and cannot be undone)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from b4serve.allocator import keep_freed_memory

# Allocates and frees a 64 MiB tensor 20 times after a warm-up (the heap settles in a few
# rounds); prints the minor page faults those 20 took.
FAULTS = """
import resource, sys, torch
from b4serve.allocator import keep_freed_memory
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
