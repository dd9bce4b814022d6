"""Reading a JVM's memory after a full collection: jcmd's output parsed, and a real JVM read."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from b4serve.lab.jvm import JvmMemory, code_cache_ranges, find_jcmd, heap_mb, read_memory

# jcmd PID GC.heap_info of this project's frontend (G1, JDK 17), 2026-12-02
G1_HEAP_INFO = """5770:
 garbage-first heap   total 71680K, used 16431K [0x0000000760000000, 0x0000000800000000)
  region size 2048K, 1 young (2048K), 0 survivors (0K)
 Metaspace       used 23131K, committed 23552K, reserved 1114112K
  class space    used 2544K, committed 2752K, reserved 1048576K
"""
CODECACHE = """5770:
CodeHeap 'non-profiled nmethods': size=120036Kb used=3455Kb max_used=3455Kb free=116580Kb
 bounds [0x00007f1ac4ec7000, 0x00007f1ac5207000, 0x00007f1acc400000]
CodeHeap 'profiled nmethods': size=120032Kb used=9812Kb max_used=9812Kb free=110219Kb
 bounds [0x00007f1abd400000, 0x00007f1abdda0000, 0x00007f1ac4938000]
CodeHeap 'non-nmethods': size=5692Kb used=1290Kb max_used=1307Kb free=4401Kb
 bounds [0x00007f1ac4938000, 0x00007f1ac4ba8000, 0x00007f1ac4ec7000]
 total_blobs=5043 nmethods=4112 adapters=652
 compilation: enabled
"""
SERIAL_HEAP_INFO = """5770:
 def new generation   total 4928K, used 1034K [0x00000000f0000000, 0x00000000f0550000)
"""

# Holds 40 MiB of live arrays (160 of 256 KiB: under G1's humongous size) and makes garbage.
HOLD_JAVA = """
public class Hold {
    public static void main(String[] args) throws Exception {
        byte[][] kept = new byte[160][];
        for (int i = 0; i < kept.length; i++) { kept[i] = new byte[256 * 1024]; kept[i][7] = 1; }
        for (int i = 0; i < 200; i++) { byte[] garbage = new byte[256 * 1024]; garbage[3] = 1; }
        System.out.println("ready " + kept.length);
        Thread.sleep(120_000);
    }
}
"""


def test_the_live_heap_and_its_addresses_are_read_from_g1s_heap_info() -> None:
    assert heap_mb(G1_HEAP_INFO) == (16431 / 1024, range(0x760000000, 0x800000000))
    assert heap_mb(SERIAL_HEAP_INFO) is None  # another collector: not read, not guessed
    assert heap_mb("") is None


def test_the_code_heaps_reserved_ranges_are_read_from_the_code_cache_report() -> None:
    assert code_cache_ranges(CODECACHE) == [
        range(0x7F1AC4EC7000, 0x7F1ACC400000),
        range(0x7F1ABD400000, 0x7F1AC4938000),
        range(0x7F1AC4938000, 0x7F1AC4EC7000),
    ]
    assert code_cache_ranges(G1_HEAP_INFO) == []


def test_retained_memory_counts_the_heap_as_its_live_part_and_leaves_the_jit_code_out() -> None:
    collected = JvmMemory(rss_mb=180.0, rss_before_mb=210.0, heap_mb=16.0, heap_resident_mb=70.0,
                          code_resident_mb=12.0)  # fmt: skip
    assert collected.retained_mb == 180.0 - 70.0 + 16.0 - 12.0
    assert JvmMemory(rss_mb=180.0, rss_before_mb=180.0).retained_mb == 180.0  # not collected


def test_jcmd_is_taken_from_java_home_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "jcmd").write_text("#!/bin/sh\n")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert find_jcmd() == str(tmp_path / "bin" / "jcmd")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_jcmd() is None


@pytest.fixture
def holding_jvm(tmp_path: Path) -> Iterator[int]:
    """A JVM holding 40 MiB of live arrays (java runs the source file itself, JDK 11+)."""
    if find_jcmd() is None or shutil.which("java") is None:
        pytest.skip("needs a JDK (java and jcmd); the soak then reads the frontend uncollected")
    (tmp_path / "Hold.java").write_text(HOLD_JAVA)
    java = subprocess.Popen(["java", "-Xmx256m", "-XX:+UseG1GC", str(tmp_path / "Hold.java")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert java.stdout is not None and java.stdout.readline().strip() == "ready 160"
        yield java.pid
    finally:
        java.kill()
        java.wait(timeout=30)


def test_a_real_jvm_is_collected_and_its_live_heap_read(holding_jvm: int) -> None:
    memory = read_memory(holding_jvm, find_jcmd())
    assert memory.heap_mb is not None and memory.heap_resident_mb is not None
    # the 40 MiB kept, plus the JDK's own few MiB; the 50 MiB of garbage collected
    assert 40 <= memory.heap_mb < 48, memory
    # the kept arrays were written, so resident; the heap is part of the process's memory
    assert memory.heap_mb <= memory.heap_resident_mb < memory.rss_mb
    assert 0 < memory.code_resident_mb < 0.2 * memory.rss_mb  # the interpreter's stubs at least
    uncollected = read_memory(holding_jvm, None)
    assert uncollected.heap_mb is None and uncollected.retained_mb == uncollected.rss_mb
