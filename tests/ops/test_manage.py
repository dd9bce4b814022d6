"""Deploy helpers that need no TorchServe: a dying worker's last words from the model log, and
the rollout's bounded waits against a loopback stand-in of the management API."""

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from b4serve.ops.changes import DeployRecord
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.keys import KeyFile
from b4serve.ops.manage import (
    DeployError,
    LogWatch,
    ManagementAPI,
    Registration,
    Rollout,
    deploy_and_report,
    parse_args,
    rollout,
)


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


def test_log_watch_follows_the_log_through_a_rollover(tmp_path: Path) -> None:
    log = tmp_path / "access_log.log"
    log.write_text("before the mark\n")
    watch = LogWatch(tmp_path, "access_log.log")
    with open(log, "a") as stream:
        stream.write("after the mark, before midnight\n")
    log.rename(tmp_path / "access_log.2026-12-01.1.log")  # log4j's rollover renames the file
    log.write_text("after midnight\n")
    assert watch.lines() == ["after the mark, before midnight", "after midnight"]
    (tmp_path / "access_log.2026-12-01.1.log").unlink()  # then compresses and removes it
    with open(log, "a") as stream:
        stream.write("later\n")
    assert watch.lines() == ["after the mark, before midnight", "after midnight", "later"]
    watch.close()


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
    # waited out its bound (a monotonic clock: never less), and returned: the bound is the
    # behaviour; how much longer a loaded machine takes is not
    assert time.monotonic() - started >= 0.5


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


class _Management(BaseHTTPRequestHandler):
    """TorchServe's management and inference APIs as far as a rollout uses them, for one model
    whose version ``old`` serves and whose queue, registration delay the test sets."""

    state: dict[str, Any]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _describe(self, version: str) -> dict[str, Any]:
        pending = self.state["pending"] if version == "old" else 0
        workers = self.state["workers"].get(version, 1)
        return {"modelVersion": version, "minWorkers": workers, "maxWorkers": workers,
                "workers": [{"status": "READY", "pid": 1}] * workers,
                "jobQueueStatus": {"pendingRequests": pending}}  # fmt: skip

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        versions = self.state["versions"]
        if path == "/models/b4/all":
            self._json(200, [self._describe(v) for v in versions])
        elif path == "/models/b4":
            self._json(200, [self._describe(self.state["default"])])
        elif path.startswith("/models/b4/") and path.split("/")[3] in versions:
            self._json(200, [self._describe(path.split("/")[3])])
        else:
            self._json(404, {"code": 404, "type": "ModelNotFoundException", "message": path})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path == "/models":
            self.state["release"].wait(self.state["register_s"])  # a slow synchronous load
            self.state["versions"].append("new")
            self._json(200, {"status": "registered"})
        else:  # a prediction, to any version
            self._json(200, [0.25, 0.25, 0.5])

    def do_PUT(self) -> None:
        url = urlsplit(self.path)
        version = url.path.split("/")[3]
        if url.path.endswith("/set-default"):
            self.state["default"] = version
            self._json(200, {"status": "default set"})
            return
        query = dict(parse_qsl(url.query))  # scale workers
        self.state["workers"][version] = int(query["min_worker"])
        self.state["scaled"].append((version, int(query["min_worker"]), int(query["max_worker"])))
        self._json(200, {"status": "workers scaled"})

    def do_DELETE(self) -> None:
        version = self.path.split("/")[3]
        if version not in self.state["versions"]:
            self._json(404, {"code": 404, "type": "ModelNotFoundException", "message": version})
            return
        self.state["deleted"].append(version)
        self.state["versions"].remove(version)
        self._json(200, {"status": "unregistered"})


@pytest.fixture
def management(tmp_path: Path) -> Iterator[tuple[ManagementAPI, dict[str, Any]]]:
    """A ManagementAPI talking to a loopback stand-in where ``old`` serves b4."""
    state: dict[str, Any] = {
        "versions": ["old"], "default": "old", "pending": 0, "register_s": 0.0,
        "release": threading.Event(), "deleted": [], "workers": {}, "scaled": [],
    }  # fmt: skip
    handler = type("Handler", (_Management,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    far = "2099-01-01T00:00:00.000Z"
    keys = {kind: {"key": kind, "expiration time": far} for kind in ("management", "inference")}
    (tmp_path / "key_file.json").write_text(json.dumps({**keys, "API": {"key": "api"}}))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    endpoints = Endpoints(url, url, url, tmp_path / "key_file.json")
    try:
        yield ManagementAPI(endpoints, KeyFile.from_endpoints(endpoints)), state
    finally:
        state["release"].set()
        server.shutdown()
        server.server_close()


def _rollout(api: ManagementAPI, timeout_s: float) -> Rollout:
    return rollout(api, mar="b4-new.mar", model="b4", version="new", settings=Registration(),
                   timeout_s=timeout_s, drain_s=0.0, say=lambda _: None)  # fmt: skip


def test_a_registration_that_does_not_answer_fails_at_the_deploy_timeout(management) -> None:
    api, state = management
    state["register_s"] = 60.0  # answers (200) only after a minute
    with pytest.raises(DeployError, match="no answer within 1 s"):
        _rollout(api, timeout_s=1.0)
    assert state["default"] == "old" and "old" not in state["deleted"]


def test_a_drain_past_its_deadline_fails_loudly_and_keeps_the_old_version(management) -> None:
    api, state = management
    state["pending"] = 3  # the old version's queue never empties
    with pytest.raises(DeployError, match="old still has 3 requests queued after 1 s"):
        _rollout(api, timeout_s=1.0)
    assert state["default"] == "new"  # the new version serves ...
    assert state["deleted"] == [] and "old" in state["versions"]  # ... and the old one stays


def test_a_drained_old_version_is_retired(management) -> None:
    api, state = management
    assert _rollout(api, timeout_s=5.0).outcome == "deployed"
    assert state["default"] == "new" and state["deleted"] == ["old"]


def test_the_serving_version_is_scaled_in_place_when_only_its_workers_change(management) -> None:
    api, state = management
    done = rollout(api, mar="b4-old.mar", model="b4", version="old",
                   settings=Registration(initial_workers=3), timeout_s=5.0, drain_s=0.0,
                   say=lambda _: None)  # fmt: skip
    assert done.outcome == "scaled"
    assert state["scaled"] == [("old", 3, 3)] and state["default"] == "old"
    assert state["versions"] == ["old"] and state["deleted"] == []


def test_the_serving_version_with_the_same_workers_is_left_alone(management) -> None:
    api, state = management
    done = rollout(api, mar="b4-old.mar", model="b4", version="old", settings=Registration(),
                   timeout_s=5.0, drain_s=0.0, say=lambda _: None)  # fmt: skip
    assert done == ("unchanged", [])
    assert state["scaled"] == [] and state["deleted"] == []


def test_a_version_name_given_again_for_another_build_is_refused(management, tmp_path) -> None:
    api, state = management
    registration = dataclasses.asdict(Registration())
    DeployRecord("old", "aaaaaaaaaaaa", {"settings": {}}, registration).save(tmp_path / "records")
    identity = tmp_path / "identity.json"
    identity.write_text(json.dumps({"settings": {"B4_ARCH": "tf_efficientnet_b4"}}))
    args = parse_args(["rollout", "--mar", "b4-old.mar", "--version", "old", "--gpus", "0",
                       "--archive-id", "bbbbbbbbbbbb", "--identity", str(identity),
                       "--records-dir", str(tmp_path / "records")])  # fmt: skip
    with pytest.raises(DeployError, match=r"version old is already the build aaaaaaaaaaaa "
                       r"\(B4_ARCH unset -> tf_efficientnet_b4\)"):  # fmt: skip
        deploy_and_report(api, "b4", args)
    assert state["default"] == "old" and state["scaled"] == [] and state["deleted"] == []


def test_a_deploy_keeps_its_record_and_says_what_changed(management, tmp_path, capsys) -> None:
    api, _ = management
    records = tmp_path / "records"
    DeployRecord("old", "old", {"settings": {}}, dataclasses.asdict(Registration())).save(records)
    args = parse_args(["rollout", "--mar", "b4-old.mar", "--version", "old", "--gpus", "0",
                       "--initial-workers", "2", "--records-dir", str(records)])  # fmt: skip
    deploy_and_report(api, "b4", args)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "[deploy] b4 old: workers 1 -> 2; scaled it in place to 2 workers"
    )
    assert DeployRecord.load(records, "old").registration["initial_workers"] == 2
