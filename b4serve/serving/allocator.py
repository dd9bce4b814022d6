"""A worker's memory, set up for serving: freed memory reused, long-lived objects left alone.

glibc's defaults make every forward pass page-fault anew.

B4's activations at 380x380 run to tens of MB per tensor. glibc's malloc serves blocks that large
with a fresh ``mmap`` and returns them with ``munmap`` when freed, so each forward touches a
hundred MB of new pages: on a 2-core CPU, measured, a million page faults per 48 images, 10-20%
of the CPU time in the kernel, and 25-30% lower throughput. Serving them from the heap, and not
trimming it while the free space at its top stays under ``keep_mb``, lets each forward reuse the
previous one's pages. The cost is the forward's working set held between requests (about 110 MiB
more resident per worker, measured). jemalloc or tcmalloc preloaded (``LD_PRELOAD``) do the same;
this needs no extra package.

Kept memory makes resident memory a poor sign of a leak: it climbs in steps to the high-water
mark of the largest batches and holds there. So each batch logs what the worker retains,
resident memory less what malloc keeps free (:class:`HeldMemory`), and the soak reads it back
(:func:`retained_by_worker`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "HeldMemory", "freeze_long_lived_objects", "held_memory", "keep_freed_memory",
    "retained_by_worker",
]  # fmt: skip

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_PAGE = os.sysconf("SC_PAGE_SIZE")
RETAINED = "memory retained"
# A batch line in TorchServe's model log: "... W-9000-b4_1a2b-stdout MODEL_LOG - ... memory
# retained 612.3 MiB (...)"; the worker's name is its thread's, less "-stdout".
_RETAINED_LINE = re.compile(rf"\b(W-\d+-\S+?)-stdout MODEL_LOG - .*\b{RETAINED} ([\d.]+) MiB")


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@dataclass(frozen=True)
class HeldMemory:
    """What this process holds: its resident memory, and the part malloc keeps free for reuse."""

    resident_bytes: int
    malloc_free_bytes: int  # 0 where malloc cannot say (not glibc, or glibc before 2.33)

    @property
    def retained_bytes(self) -> int:
        return self.resident_bytes - self.malloc_free_bytes

    def describe(self) -> str:
        """``memory retained 612.3 MiB (resident 700.1, malloc free 87.8)``, which
        :func:`retained_by_worker` reads back from the model log."""
        return (f"{RETAINED} {self.retained_bytes / 2**20:.1f} MiB (resident "
                f"{self.resident_bytes / 2**20:.1f}, malloc free "
                f"{self.malloc_free_bytes / 2**20:.1f})")  # fmt: skip


def held_memory() -> HeldMemory:
    """This process's :class:`HeldMemory` now (microseconds: /proc/self/statm, mallinfo2)."""
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * _PAGE
    mallinfo2 = _mallinfo2()
    # fordblks: the free chunks of every arena, which malloc keeps rather than hands back
    return HeldMemory(resident, int(mallinfo2().fordblks) if mallinfo2 else 0)


def retained_by_worker(lines: Iterable[str]) -> dict[str, float]:
    """The latest retained MiB each worker logged in ``lines`` (a model log), by worker name."""
    latest = {}
    for line in lines:
        found = _RETAINED_LINE.search(line)
        if found:
            latest[found.group(1)] = float(found.group(2))
    return latest


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's ``mallinfo2``; None where there is none (musl, macOS, glibc before 2.33)."""
    libc = ctypes.CDLL(None)
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    function.argtypes = []
    return function


def keep_freed_memory(keep_mb: int) -> bool:
    """Make this process's glibc malloc reuse freed memory, keeping up to ``keep_mb`` MiB free.

    Returns whether the setting took: False when ``keep_mb`` is 0 (glibc's defaults stay) or
    the C library is not glibc (musl, macOS), where it changes nothing.
    """
    if keep_mb <= 0:
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        log.info("not glibc: malloc left as it is")
        return False
    # mmap nothing (every block from the heap), and give the heap's top back to the kernel only
    # past keep_mb of free space (once a huge request is done, say)
    took = libc.mallopt(_M_MMAP_MAX, 0) == 1
    took &= libc.mallopt(_M_TRIM_THRESHOLD, keep_mb << 20) == 1
    return took


def freeze_long_lived_objects() -> int:
    """Exempt every object alive now from Python's garbage collector; returns how many.

    Call once the model is loaded and warmed up: torch and TorchServe leave some 170k objects
    that live as long as the worker, and each full collection scanned them all, measured at
    70-150 ms on 2 cores, added to whichever request set it off. Garbage made since is still
    collected; what is frozen is never freed, so collect first.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
