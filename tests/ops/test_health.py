"""The health report's pure parts: error lines from the model log and the printed report."""

from pathlib import Path

from b4serve.ops.health import (
    Health,
    WorkerState,
    format_report,
    last_errors,
    log_tail,
    retained_mb,
)
from b4serve.serving.allocator import HeldMemory, retained_by_worker


def test_last_errors_keeps_the_latest_warning_error_and_death_lines(tmp_path: Path) -> None:
    (tmp_path / "model_log.log").write_text(
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - batch of 4: 1 failed ['InvalidInput']\n"
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - request 1 of 4 failed: 400 InvalidInput: NaN\n"
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - Backend received inference at: 1\n"
        "t [WARN ] W-9000-b4_1-stderr MODEL_LOG - Traceback (most recent call last):\n"
        "t [INFO ] W-9000-b4_1 org.pytorch.serve.wlm.WorkerThread - Backend worker process died.\n"
    )
    assert last_errors(log_tail(tmp_path), 2) == [
        "t [WARN ] W-9000-b4_1-stderr MODEL_LOG - Traceback (most recent call last):",
        "t [INFO ] W-9000-b4_1 org.pytorch.serve.wlm.WorkerThread - Backend worker process died.",
    ]
    lines = log_tail(tmp_path)
    assert len(last_errors(lines, 10)) == 3  # the batch summary and the receipt are not errors
    assert last_errors(lines, 0) == [] and last_errors(log_tail(tmp_path / "missing"), 5) == []
    assert len(log_tail(tmp_path, tail_bytes=100)) == 1  # the end of a long log, whole lines


def test_report_names_workers_counts_and_problems() -> None:
    health = Health(
        server="http://127.0.0.1:8080", model="b4", default_version="abc", versions=["abc"],
        workers=[WorkerState("abc", "9000", 42, "READY", 812.4, "2026-11-29T10:00:00")],
        requests={"ok": 10.0, "InvalidInput": 2.0}, last_errors=["x [WARNING] failed"],
    )  # fmt: skip
    report = format_report(health)
    assert report.startswith("status   healthy")
    assert "worker   abc 9000: READY, pid 42, 812 MiB" in report
    assert "requests 10 ok; failed: InvalidInput 2" in report
    assert report.endswith("  x [WARNING] failed")
    health.problems.append("no READY worker for b4 abc")
    assert format_report(health).startswith("status   UNHEALTHY") and not health.healthy


def test_each_worker_shows_the_memory_it_last_logged_it_retained() -> None:
    def batch(worker: str, held: HeldMemory) -> str:
        return (f"t [INFO ] {worker}-stdout MODEL_LOG - batch of 4 images: 0 failed [], decode "
                f"2.0 ms, model 80.0 ms; {held.describe()}")  # fmt: skip

    lines = [
        batch("W-9000-b4_1", HeldMemory(700 << 20, 100 << 20)),
        batch("W-9001-b4_1", HeldMemory(690 << 20, 110 << 20)),
        batch("W-9000-b4_1", HeldMemory(700 << 20, 197 << 19)),
    ]
    latest = retained_by_worker(lines)
    assert (retained_mb(latest, "9000"), retained_mb(latest, "9001")) == (601.5, 580.0)
    assert retained_mb(latest, "900") is None and retained_mb({}, "9000") is None
    worker = WorkerState("abc", "9000", 42, "READY", 700.2, "t", 601.5)
    health = Health(server="s", model="b4", default_version="abc", versions=["abc"],
                    workers=[worker])  # fmt: skip
    assert "worker   abc 9000: READY, pid 42, 700 MiB (retained 602), since t" in (
        format_report(health)
    )
