"""The client against a loopback stand-in for TorchServe (``fake_torchserve.py``): order,
retries, key renewal, CLI. The real server is exercised in ``tests/integration``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fake_torchserve import (
    FakeTorchServe,
    expected_probabilities,
    image,
)

from b4serve.client import PredictionError, RetryPolicy, predict_batch, predict_many
from b4serve.client import http as client
from b4serve.ops.endpoints import _DEFAULTS, REPO_ROOT, Endpoints
from b4serve.ops.keys import KeyFile, KeyFileMissingError

FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeTorchServe]:
    fake = FakeTorchServe(tmp_path)
    yield fake
    fake.close()


def run(fake: FakeTorchServe, inputs: list, **kwargs: object) -> list[client.Result]:
    kwargs = {"endpoints": fake.endpoints, "retry": FAST_RETRY, "progress": False, **kwargs}
    return predict_many(inputs, **kwargs)  # type: ignore[arg-type]


# --- endpoints --------------------------------------------------------------------------------


def test_endpoints_defaults_are_the_shell_scripts_defaults() -> None:
    endpoints = Endpoints.from_env({})
    assert endpoints.inference_url == "http://127.0.0.1:8080"
    assert endpoints.management_url == "http://127.0.0.1:8081"
    assert endpoints.metrics_url == "http://127.0.0.1:8082"
    assert endpoints.key_file == REPO_ROOT / ".run" / "key_file.json"
    assert endpoints.predictions_url == "http://127.0.0.1:8080/predictions/b4"
    assert (REPO_ROOT / "b4serve" / "ops" / "endpoints.py").is_file()


def test_endpoints_env_overrides_and_empty_values_mean_default(tmp_path: Path) -> None:
    env = {
        "B4_HOST": "10.1.2.3",
        "B4_INFERENCE_PORT": "9080",
        "B4_RUN_DIR": str(tmp_path),
        "B4_MODEL_NAME": "",
        "B4_METRICS_PORT": "",
    }
    endpoints = Endpoints.from_env(env)
    assert endpoints.predictions_url == "http://10.1.2.3:9080/predictions/b4"
    assert endpoints.management_url == "http://10.1.2.3:8081"
    assert endpoints.metrics_url == "http://10.1.2.3:8082"
    assert endpoints.key_file == tmp_path / "key_file.json"
    explicit = Endpoints.from_env({**env, "B4_KEY_FILE": "/srv/ts/key_file.json"})
    assert explicit.key_file == Path("/srv/ts/key_file.json")


def test_python_and_shell_defaults_agree() -> None:
    shell = dict(
        re.findall(r': "\$\{(B4_\w+):=([^}]*)\}"', (REPO_ROOT / "scripts/env.sh").read_text())
    )
    assert {name: shell[name] for name in _DEFAULTS} == _DEFAULTS


def test_endpoints_protocol_is_checked() -> None:
    assert Endpoints.from_env({"B4_PROTOCOL": "v2"}).protocol == "v2"
    with pytest.raises(ValueError, match="B4_PROTOCOL must be one of raw, v1, v2"):
        Endpoints.from_env({"B4_PROTOCOL": "grpc"})


def test_endpoints_bad_port_error_names_the_variable() -> None:
    with pytest.raises(ValueError, match="B4_MANAGEMENT_PORT"):
        Endpoints.from_env({"B4_MANAGEMENT_PORT": "80a"})


# --- order and retries ------------------------------------------------------------------------


def test_results_keep_input_order_when_later_inputs_finish_first(server: FakeTorchServe) -> None:
    count = 24
    server.delay_s = {i: 0.003 * (count - i) for i in range(count)}
    probabilities = predict_batch(
        [image(i) for i in range(count)], endpoints=server.endpoints, concurrency=6, progress=False
    )
    assert probabilities == [expected_probabilities(i) for i in range(count)]
    assert server.max_in_flight > 1
    assert server.answered != sorted(server.answered)  # completion order did differ
    assert server.content_types == {"application/octet-stream"}


def test_npy_file_inputs_are_named_by_path(server: FakeTorchServe, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.npy")
        np.save(paths[-1], image(i + 10))
    results = run(server, [*paths, image(7)])
    assert [r.input for r in results] == [*map(str, paths), "array[3]"]
    assert [r.probabilities for r in results] == [
        expected_probabilities(i) for i in (10, 11, 12, 7)
    ]


def test_503_is_retried_until_the_worker_answers(server: FakeTorchServe) -> None:
    server.fail_503 = {2: 2}
    results = run(server, [image(i) for i in range(4)])
    assert [r.probabilities for r in results] == [expected_probabilities(i) for i in range(4)]
    assert [r.attempts for r in results] == [1, 1, 3, 1]


def test_503_gives_up_after_the_retry_budget(server: FakeTorchServe) -> None:
    server.fail_503 = {1: 100}
    results = run(server, [image(i) for i in range(3)], retry=RetryPolicy(retries=2, backoff_s=0))
    assert results[1].error is not None
    assert results[1].error["status"] == 503
    assert results[1].error["type"] == "ServiceUnavailableException"
    assert results[1].attempts == 3
    assert [r.ok for r in results] == [True, False, True]


def test_a_worker_that_died_with_the_batch_is_retried_within_the_same_budget(
    server: FakeTorchServe,
) -> None:
    server.worker_died = {1: 2}
    results = run(server, [image(0), image(1)])
    assert [r.probabilities for r in results] == [expected_probabilities(i) for i in range(2)]
    assert [r.attempts for r in results] == [1, 3]
    # urllib3's retries (503) and ours (worker died) share one budget: 2 retries, 3 failures
    server.fail_503, server.worker_died = {2: 1}, {2: 2}
    [result] = run(server, [image(2)], retry=RetryPolicy(retries=2, backoff_s=0))
    assert result.error is not None and result.error["status"] == 500
    assert result.attempts == 3


def test_dropped_connection_is_retried(server: FakeTorchServe) -> None:
    server.drop = {0: 1, 2: 2}
    results = run(server, [image(i) for i in range(3)], concurrency=2)
    assert [r.probabilities for r in results] == [expected_probabilities(i) for i in range(3)]
    assert [r.attempts for r in results] == [2, 1, 3]


def test_read_timeout_is_retried(server: FakeTorchServe) -> None:
    server.stall = {1: 1}
    server.stall_s = 0.5
    results = run(server, [image(0), image(1)], timeout_s=0.2)
    assert results[1].probabilities == expected_probabilities(1)
    assert results[1].attempts == 2


def test_client_error_fails_alone_and_predict_batch_names_its_index(
    server: FakeTorchServe,
) -> None:
    body = {"code": 400, "type": "InvalidInput", "message": "expected HxWx3, got shape (4, 4, 3)"}
    server.reject = {3: (400, json.dumps(body).encode())}
    images = [image(i) for i in range(6)]
    results = run(server, images)
    assert results[3].error == {"status": 400, "type": "InvalidInput", "message": body["message"]}
    assert results[3].attempts == 1  # a 4xx is not retried
    assert [r.probabilities for i, r in enumerate(results) if i != 3] == [
        expected_probabilities(i) for i in (0, 1, 2, 4, 5)
    ]
    with pytest.raises(PredictionError, match=r"1 of 6 inputs failed \(indices 3\)") as raised:
        predict_batch(images, endpoints=server.endpoints, progress=False)
    assert [r.index for r in raised.value.failures] == [3]
    assert "InvalidInput" in str(raised.value)


def test_an_empty_413_says_the_body_was_over_the_servers_limit(server: FakeTorchServe) -> None:
    server.reject = {0: (413, b"")}  # TorchServe's HTTP layer, before reading the body
    [result] = run(server, [image(0)])
    assert result.error is not None and result.error["status"] == 413
    assert result.error["type"] == "PayloadTooLarge"
    assert "over its max_request_size (16781324 bytes" in result.error["message"]
    assert result.attempts == 1


def test_error_body_that_is_not_json_is_kept_as_text(server: FakeTorchServe) -> None:
    server.reject = {0: (500, b"Internal Server Error: worker crashed")}
    [result] = run(server, [image(0)])
    assert result.error == {
        "status": 500,
        "type": "HTTPError",
        "message": "Internal Server Error: worker crashed",
    }


def test_unreadable_input_fails_alone(server: FakeTorchServe, tmp_path: Path) -> None:
    missing = tmp_path / "missing.npy"
    results = run(server, [image(0), missing, image(2)])
    assert results[1].error is not None
    assert results[1].error["type"] == "FileNotFoundError"
    assert results[1].input == str(missing)
    assert [results[0].ok, results[2].ok] == [True, True]


# --- keys -------------------------------------------------------------------------------------


def test_expired_key_is_renewed_before_the_request(server: FakeTorchServe) -> None:
    server.expire("inference")
    probabilities = predict_batch(
        [image(i) for i in range(8)], endpoints=server.endpoints, concurrency=4, progress=False
    )
    assert probabilities == [expected_probabilities(i) for i in range(8)]
    assert server.token_calls == {"inference": 1}
    assert server.rejected_keys == []  # renewed first, never sent the expired key


def test_key_rotated_by_another_client_mid_job_is_picked_up(server: FakeTorchServe) -> None:
    old_key = server.key("inference")
    server.rotate_before_prediction = 6
    results = run(server, [image(i) for i in range(16)], concurrency=4)
    assert [r.probabilities for r in results] == [expected_probabilities(i) for i in range(16)]
    assert f"Bearer {old_key}" in server.rejected_keys
    assert server.token_calls == {}  # the file already held the new key: nothing to renew
    assert sorted(server.answered) == list(range(16))  # each input answered exactly once


def test_key_rejected_for_many_requests_at_once_is_renewed_once(server: FakeTorchServe) -> None:
    server.revoke("inference")
    server.delay_s = dict.fromkeys(range(16), 0.01)
    results = run(server, [image(i) for i in range(16)], concurrency=8)
    assert all(r.ok for r in results)
    assert len(server.rejected_keys) >= 1
    assert server.token_calls == {"inference": 1}


def test_a_key_that_expires_during_the_backoff_is_renewed_before_the_retry(
    server: FakeTorchServe,
) -> None:
    # urllib3 resends the first try's headers: when the key went stale during the wait, the
    # retry comes back to the client, which renews the key first.
    key, _ = server.keys["inference"]
    server.keys["inference"] = key, datetime.now(timezone.utc) + timedelta(seconds=1)
    server.write_key_file()
    server.fail_503 = {0: 2}  # retry 1 at once, retry 2 after 1.5 to 2.25 s: past the expiry
    keys = KeyFile.from_endpoints(server.endpoints, margin_s=0.2)
    policy = RetryPolicy(retries=3, backoff_s=0.75, max_backoff_s=5.0)
    [result] = run(server, [image(0)], retry=policy, keys=keys)
    assert result.probabilities == expected_probabilities(0)
    assert result.attempts == 3
    assert server.rejected_keys == []  # never sent once it had expired
    assert server.token_calls == {"inference": 1}


def test_a_key_renewed_by_another_client_during_the_backoff_is_the_one_retried(
    server: FakeTorchServe,
) -> None:
    server.fail_503 = {0: 2}  # retry 2 waits 0.6 to 0.9 s; the key is renewed 0.3 s in

    def renew_elsewhere() -> None:
        with server.lock:  # as /token does
            server.rotate("inference")

    renewal = threading.Timer(0.3, renew_elsewhere)
    renewal.start()
    policy = RetryPolicy(retries=3, backoff_s=0.3, max_backoff_s=5.0)
    try:
        [result] = run(server, [image(0)], retry=policy)
    finally:
        renewal.join()
    assert result.probabilities == expected_probabilities(0)
    assert server.rejected_keys == []  # the retry carried the new key, not the voided one
    assert server.token_calls == {}  # the file already held it: nothing to renew


def test_missing_key_file_is_a_clear_error_before_any_request(server: FakeTorchServe) -> None:
    server.key_file.unlink()
    with pytest.raises(KeyFileMissingError) as raised:
        run(server, [image(0)])
    assert str(server.key_file) in str(raised.value)
    assert "directory it was started from" in str(raised.value)
    assert server.predictions == 0


def test_without_token_auth_no_key_is_needed_or_sent(tmp_path: Path) -> None:
    fake = FakeTorchServe(tmp_path, auth=False)
    try:
        results = run(fake, [image(1), image(2)], token_auth=False)
    finally:
        fake.close()
    assert [r.probabilities for r in results] == [
        expected_probabilities(1),
        expected_probabilities(2),
    ]
    assert fake.auth_headers == {None}


# --- progress and CLI -------------------------------------------------------------------------


def test_progress_line_counts_inputs_and_failures_on_stderr(
    server: FakeTorchServe, capsys: pytest.CaptureFixture[str]
) -> None:
    server.reject = {3: (400, b'{"code": 400, "type": "InvalidInput", "message": "no"}')}
    run(server, [image(i) for i in range(5)], progress=True)
    err = capsys.readouterr().err
    assert "| 5/5 [" in err  # tqdm's line: done/total, elapsed<ETA, rate
    assert "img/s" in err
    assert "1 failed" in err
    assert err.endswith("\n")


def test_progress_is_quiet_when_stderr_is_not_a_terminal(
    server: FakeTorchServe, capsys: pytest.CaptureFixture[str]
) -> None:
    run(server, [image(i) for i in range(3)], progress=None)  # pytest's stderr is no terminal
    assert capsys.readouterr().err == ""


def write_inputs(directory: Path, idents: list[int]) -> list[str]:
    paths = []
    for ident in idents:
        path = directory / f"in{ident}.npy"
        np.save(path, image(ident))
        paths.append(str(path))
    return paths


def test_cli_writes_json_lines_in_input_order_and_exits_1_on_failure(
    server: FakeTorchServe, tmp_path: Path
) -> None:
    server.reject = {
        4: (400, json.dumps({"code": 400, "type": "InvalidInput", "message": "no"}).encode())
    }
    server.delay_s = {i: 0.002 * (8 - i) for i in range(8)}
    paths = write_inputs(tmp_path, list(range(8)))
    output = tmp_path / "results.jsonl"
    argv = [
        *paths,
        "--output",
        str(output),
        "--url",
        server.url,
        "--management-url",
        server.url,
        "--key-file",
        str(server.key_file),
        "--concurrency",
        "4",
        "--retries",
        "1",
    ]
    assert client.main(argv) == 1
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))
    assert [r["input"] for r in records] == paths
    assert records[4]["error"] == {"status": 400, "type": "InvalidInput", "message": "no"}
    assert "probabilities" not in records[4]
    for i in (0, 1, 2, 3, 5, 6, 7):
        assert records[i]["probabilities"] == expected_probabilities(i)


def test_cli_reads_endpoints_from_env_and_exits_0_on_success(
    server: FakeTorchServe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = server.url.rsplit(":", 1)[1]
    for name, value in {
        "B4_HOST": "127.0.0.1",
        "B4_INFERENCE_PORT": port,
        "B4_MANAGEMENT_PORT": port,
        "B4_KEY_FILE": str(server.key_file),
    }.items():
        monkeypatch.setenv(name, value)
    paths = write_inputs(tmp_path, [3, 1, 2])
    assert client.main([*paths, "--no-progress"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["probabilities"] for r in records] == [expected_probabilities(i) for i in (3, 1, 2)]


def test_cli_missing_key_file_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_inputs(tmp_path, [0])
    key_file = tmp_path / "nowhere" / "key_file.json"
    argv = [*paths, "--url", "http://127.0.0.1:9", "--key-file", str(key_file)]
    assert client.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(key_file) in err


def test_cli_resume_sends_only_what_is_not_answered_yet(
    server: FakeTorchServe, tmp_path: Path
) -> None:
    server.reject = {2: (503, b"busy"), 5: (503, b"busy")}  # still failing after the retries
    paths = write_inputs(tmp_path, list(range(6)))
    output = tmp_path / "results.jsonl"
    common = ["--output", str(output), "--url", server.url, "--management-url", server.url,
              "--key-file", str(server.key_file), "--retries", "0", "--no-progress"]  # fmt: skip
    assert client.main([*paths, *common]) == 1
    with output.open("a") as partial:
        partial.write('{"input": "cut sho')  # a line left half-written by a crash
    server.reject = {}
    answered_before = len(server.answered)
    assert client.main([*paths, *common, "--resume"]) == 0
    assert sorted(server.answered[answered_before:]) == [2, 5]  # nothing answered twice
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(6))
    assert {r["input"]: r["probabilities"] for r in records} == {
        path: expected_probabilities(i) for i, path in enumerate(paths)
    }


def test_cli_resume_without_output_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["x.npy", "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


def test_the_package_exports_every_public_name_of_the_client_module() -> None:
    import b4serve.client

    assert sorted(b4serve.client.__all__) == sorted(client.__all__)
    assert all(getattr(b4serve.client, name) is getattr(client, name) for name in client.__all__)
