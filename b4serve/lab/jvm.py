"""The TorchServe frontend's memory, read the JVM's way: after a full collection.

A JVM's resident memory follows its collector's sizing more than what it keeps. Under the
soak's load here the frontend's went 186 -> 266 MiB in 10 s (G1 growing its heap while its
threads fell behind on 2 busy cores); right after full collections it still moved by 6 MiB as
G1 kept 68 or 74 MiB of heap committed, and by 4-22 MiB of freed native memory that glibc kept;
the live heap stayed at 16.0-16.1 MiB for 400 s (docs/SOAK.md). So after a full collection
(``jcmd PID GC.run``, then ``System.trim_native_heap`` where the JDK has it, as 17.0.15 does)
two figures are read: the live heap (the Java objects kept) and the retained memory, resident
memory with the heap's resident pages counted as the live heap alone and the JIT's compiled
code left out (it grew 10 -> 14 MiB over 4 minutes here, compiling, within its fixed bound):
the objects kept plus everything else outside the heap (metaspace, threads, direct buffers,
malloc). A leak raises one or the other; garbage, heap sizing and the JIT neither. ``jcmd``
comes with a JDK, not with a bare JRE; without it only the resident memory is read, uncollected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["JvmMemory", "code_cache_ranges", "find_jcmd", "heap_mb", "read_memory"]

# After the collection, a pause for the JVM's cleaner threads to free the native memory of what
# it found dead (direct buffers): a second reading right after the first read ~5.6 MiB less in
# 15 of 30 rounds without the pause, in 4 of 30 with it (docs/SOAK.md).
CLEANERS_S = 0.3
# jcmd runs these in order and stops at the first that fails: the trim goes last, since not
# every JDK has it. (Each jcmd start is a JVM's, ~0.15 s of CPU.)
_READ = "GC.heap_info\nCompiler.codecache\nSystem.trim_native_heap\n"
_HEAP = re.compile(
    r"^\s*garbage-first heap\s+total \d+K, used (\d+)K \[(0x[0-9a-f]+), (0x[0-9a-f]+)\)",
    re.MULTILINE,
)
_CODE_HEAP = re.compile(r"^\s*bounds \[(0x[0-9a-f]+), 0x[0-9a-f]+, (0x[0-9a-f]+)\]", re.MULTILINE)


@dataclass(frozen=True)
class JvmMemory:
    """One reading of a JVM process (MiB)."""

    rss_mb: float  # resident, after the collection when there was one
    rss_before_mb: float  # resident before it: what the process held under load
    heap_mb: float | None = None  # live heap after the collection; None when none was made
    heap_resident_mb: float | None = None  # the heap's resident pages, live or free
    code_resident_mb: float = 0.0  # the JIT's compiled code, resident (0.0 when not read)

    @property
    def retained_mb(self) -> float:
        """Resident, with the heap counted as its live part and the JIT's code left out;
        resident when not collected."""
        if self.heap_mb is None or self.heap_resident_mb is None:
            return self.rss_mb
        return self.rss_mb - self.heap_resident_mb + self.heap_mb - self.code_resident_mb


def find_jcmd() -> str | None:
    """``jcmd`` of ``JAVA_HOME`` or of ``PATH``; None without a JDK."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "jcmd").is_file():
        return str(Path(java_home) / "bin" / "jcmd")
    return shutil.which("jcmd")


def heap_mb(heap_info: str) -> tuple[float, range] | None:
    """The used heap (MiB) and the heap's address range in ``jcmd PID GC.heap_info``'s output
    for G1, the JVM's default collector; None for another collector or no output."""
    found = _HEAP.search(heap_info)
    if found is None:
        return None
    return int(found.group(1)) / 1024, range(int(found.group(2), 16), int(found.group(3), 16))


def code_cache_ranges(codecache: str) -> list[range]:
    """The address ranges reserved for each code heap in ``jcmd PID Compiler.codecache``'s
    output (``bounds [low, committed, reserved]``)."""
    return [range(int(low, 16), int(high, 16)) for low, high in _CODE_HEAP.findall(codecache)]


def read_memory(pid: int, jcmd: str | None) -> JvmMemory:
    """Collect ``pid``'s garbage with ``jcmd`` (if given), then read its resident memory, its live
    heap and where its heap and code live. ``psutil.Error`` if the process is gone; a failed
    ``jcmd`` (another user's JVM, another collector) leaves ``heap_mb`` None."""
    process = psutil.Process(pid)
    before = process.memory_info().rss / 2**20
    if jcmd is None:
        return JvmMemory(before, before)
    if _jcmd(jcmd, pid, "GC.run") is None:  # another user's JVM, or attach refused
        return JvmMemory(process.memory_info().rss / 2**20, before)
    time.sleep(CLEANERS_S)
    done = subprocess.run([jcmd, str(pid), "-f", "/dev/stdin"], input=_READ,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    heap = heap_mb(done.stdout)
    rss = process.memory_info().rss / 2**20
    if heap is None:
        return JvmMemory(rss, before)
    used, heap_range = heap
    mappings = _mappings(process)
    return JvmMemory(rss, before, used, _resident_mb(mappings, [heap_range]),
                     _resident_mb(mappings, code_cache_ranges(done.stdout)))  # fmt: skip


def _jcmd(jcmd: str, pid: int, command: str) -> str | None:
    """What ``jcmd PID COMMAND`` printed; None if it failed."""
    done = subprocess.run([jcmd, str(pid), command], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def _mappings(process: psutil.Process) -> list[tuple[range, int]]:
    """Each mapping's addresses and resident bytes."""
    found = []
    for mapping in process.memory_maps(grouped=False):
        start, end = (int(bound, 16) for bound in mapping.addr.split("-"))
        found.append((range(start, end), mapping.rss))
    return found


def _resident_mb(mappings: list[tuple[range, int]], within: list[range]) -> float:
    """Resident MiB of the mappings that lie inside one of ``within``."""
    inside = [
        resident
        for addresses, resident in mappings
        if any(r.start <= addresses.start and addresses.stop <= r.stop for r in within)
    ]
    return sum(inside) / 2**20
