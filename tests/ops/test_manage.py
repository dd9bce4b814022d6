"""Deploy helpers that need no server: reading a dying worker's last words from the model log."""

import threading
import time
from pathlib import Path

from b4serve.ops.manage import LogWatch


def _append_later(path: Path, text: str, delay_s: float) -> threading.Thread:
    def write() -> None:
        time.sleep(delay_s)
        with open(path, "a") as stream:
            stream.write(text)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_log_watch_reads_only_lines_written_after_it_started(tmp_path: Path) -> None:
    log = tmp_path / "model_log.log"
    log.write_text("old: Backend worker process died.\nold: RuntimeError: earlier failure\n")
    watch = LogWatch(tmp_path)
    assert watch.failures() == []
    with open(log, "a") as stream:
        stream.write("new: RuntimeError: cannot load\nnew: Backend worker process died.\n")
    failures = watch.failures()
    assert any("cannot load" in line for line in failures)
    assert not any(line.startswith("old:") for line in failures)


def test_settle_waits_for_failures_the_asynchronous_log_writes_late(tmp_path: Path) -> None:
    (tmp_path / "model_log.log").write_text("")
    watch = LogWatch(tmp_path)
    writer = _append_later(
        tmp_path / "model_log.log",
        "RuntimeError: cannot load: weights for another model\nBackend worker process died.\n",
        delay_s=0.5,
    )
    failures = watch.settle(within_s=5.0)
    writer.join()
    assert any("weights for another model" in line for line in failures)


def test_settle_gives_up_after_its_bound_when_nothing_died(tmp_path: Path) -> None:
    (tmp_path / "model_log.log").write_text("INFO all well\n")
    watch = LogWatch(tmp_path)
    started = time.monotonic()
    assert watch.settle(within_s=0.5) == []
    assert 0.4 < time.monotonic() - started < 3.0


def test_a_failed_load_counts_when_the_worker_is_stopped_before_it_says_it_died(
    tmp_path: Path,
) -> None:
    # as logged in CI: the frontend stopped the worker right after its load failed
    (tmp_path / "model_log.log").write_text("")
    watch = LogWatch(tmp_path)
    with open(tmp_path / "model_log.log", "a") as stream:
        stream.write(
            "Failed to load model b4, exception cannot load: weights for another model\n"
            "MODEL_LOG - Traceback (most recent call last):\n"
            "MODEL_LOG -     raise RuntimeError('cannot load: weights for another model')\n"
        )
    failures = watch.failures()
    assert any("Failed to load model b4" in line for line in failures)
    assert any("raise RuntimeError" in line for line in failures)
