"""The health report's pure parts: error lines from the model log and the printed report."""

from pathlib import Path

from b4serve.ops.health import Health, WorkerState, format_report, last_errors


def test_last_errors_keeps_the_latest_warning_error_and_death_lines(tmp_path: Path) -> None:
    (tmp_path / "model_log.log").write_text(
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - batch of 4: 1 failed ['InvalidInput']\n"
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - request 1 of 4 failed: 400 InvalidInput: NaN\n"
        "t [INFO ] W-9000-b4_1-stdout MODEL_LOG - Backend received inference at: 1\n"
        "t [WARN ] W-9000-b4_1-stderr MODEL_LOG - Traceback (most recent call last):\n"
        "t [INFO ] W-9000-b4_1 org.pytorch.serve.wlm.WorkerThread - Backend worker process died.\n"
    )
    assert last_errors(tmp_path, 2) == [
        "t [WARN ] W-9000-b4_1-stderr MODEL_LOG - Traceback (most recent call last):",
        "t [INFO ] W-9000-b4_1 org.pytorch.serve.wlm.WorkerThread - Backend worker process died.",
    ]
    assert len(last_errors(tmp_path, 10)) == 3  # the batch summary and the receipt are not errors
    assert last_errors(tmp_path, 0) == [] and last_errors(tmp_path / "missing", 5) == []


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
