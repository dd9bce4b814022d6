"""KeyFile against the loopback TorchServe stand-in: fresh reads, renewal, locking, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from fake_torchserve import INVALID_KEY, FakeTorchServe

from b4serve.ops import keys
from b4serve.ops.endpoints import REPO_ROOT
from b4serve.ops.keys import (
    KeyFile,
    KeyFileError,
    KeyFileMissingError,
    KeyRenewalError,
    is_invalid_key_response,
    read_key_file,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeTorchServe]:
    fake = FakeTorchServe(tmp_path)
    yield fake
    fake.close()


def key_file(fake: FakeTorchServe) -> KeyFile:
    return KeyFile(fake.key_file, fake.url)


def response(status: int, body: bytes) -> requests.Response:
    made = requests.Response()
    made.status_code = status
    made._content = body
    return made


def test_valid_key_is_read_from_the_file_without_renewal(server: FakeTorchServe) -> None:
    keyring = key_file(server)
    assert keyring.key("inference") == server.key("inference")
    assert keyring.key("management") == server.key("management")
    assert keyring.auth_headers("inference") == {
        "Authorization": f"Bearer {server.key('inference')}"
    }
    assert server.token_calls == {}


def test_key_changed_in_the_file_is_seen_at_once(server: FakeTorchServe) -> None:
    keyring = key_file(server)
    keyring.key("inference")
    new = server.rotate("inference")
    assert keyring.key("inference") == new  # no caching across calls


@pytest.mark.parametrize("expires_in_s", [-60, 5], ids=["expired", "within-margin"])
def test_key_expired_or_about_to_expire_is_renewed_first(
    server: FakeTorchServe, expires_in_s: float
) -> None:
    old = server.key("inference")
    server.keys["inference"] = old, datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)
    server.write_key_file()
    new = key_file(server).key("inference")
    assert new != old
    assert new == server.key("inference")
    assert read_key_file(server.key_file)["inference"].key == new
    assert server.token_calls == {"inference": 1}


def test_renew_returns_a_key_someone_else_renewed_without_calling_token(
    server: FakeTorchServe,
) -> None:
    stale = server.key("inference")
    fresh = server.rotate("inference")
    assert key_file(server).renew("inference", stale_key=stale) == fresh
    assert server.token_calls == {}


def test_concurrent_renewals_of_one_stale_key_call_token_once(server: FakeTorchServe) -> None:
    keyring = key_file(server)
    stale = server.key("inference")
    barrier = threading.Barrier(8)
    renewed: list[str] = []

    def renew() -> None:
        barrier.wait()
        renewed.append(keyring.renew("inference", stale_key=stale))

    threads = [threading.Thread(target=renew) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.token_calls == {"inference": 1}
    assert renewed == [server.key("inference")] * 8
    assert stale not in renewed


def test_renewal_refused_by_torchserve_raises_with_its_answer(server: FakeTorchServe) -> None:
    server.api_key = "api-key-rotated"  # the file still holds the old API key
    with pytest.raises(KeyRenewalError, match="answered 400"):
        key_file(server).renew("inference", stale_key=server.key("inference"))


def test_renewal_with_torchserve_down_raises_renewal_error(tmp_path: Path) -> None:
    fake = FakeTorchServe(tmp_path)
    fake.close()
    with pytest.raises(KeyRenewalError, match="unreachable"):
        key_file(fake).renew("management", stale_key=fake.key("management"))


def test_half_written_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    full = json.dumps(
        {"inference": {"key": "i1"}, "management": {"key": "m1"}, "API": {"key": "a"}}
    )
    path.write_text(full[:20])
    finisher = threading.Timer(0.08, path.write_text, args=(full,))
    finisher.start()
    try:
        entries = read_key_file(path, attempts=5, delay_s=0.05)
    finally:
        finisher.join()
    assert entries["inference"].key == "i1"
    assert entries["API"].expires is None


def test_file_that_stays_broken_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    path.write_text('{"inference": ')
    with pytest.raises(KeyFileError, match="not valid JSON"):
        read_key_file(path, attempts=2, delay_s=0.001)


def test_file_without_a_section_names_it(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "i"}, "API": {"key": "a"}}))
    with pytest.raises(KeyFileError, match="'management'"):
        read_key_file(path)


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2024-02-16T21:12:24.801167Z", datetime(2024, 2, 16, 21, 12, 24, 801167, timezone.utc)),
        ("2024-02-16T21:12:24Z", datetime(2024, 2, 16, 21, 12, 24, 0, timezone.utc)),
        ("2024-02-16T21:12:24.801167123Z", datetime(2024, 2, 16, 21, 12, 24, 801167, timezone.utc)),
        ("2024-02-16T21:12:24.8Z", datetime(2024, 2, 16, 21, 12, 24, 800000, timezone.utc)),
    ],
)
def test_java_instant_expiration_times_are_parsed(
    tmp_path: Path, stamp: str, expected: datetime
) -> None:
    path = tmp_path / "key_file.json"
    section = {"key": "k", "expiration time": stamp}
    path.write_text(json.dumps({"inference": section, "management": section, "API": {"key": "a"}}))
    assert read_key_file(path)["inference"].expires == expected


def test_missing_key_file_error_says_where_it_looked_and_who_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "key_file.json"
    with pytest.raises(KeyFileMissingError) as raised:
        KeyFile(path, "http://127.0.0.1:9").auth_headers("inference")
    message = str(raised.value)
    assert str(path) in message
    assert "directory it was started from" in message


def test_missing_key_file_gives_no_headers_when_auth_may_be_off(tmp_path: Path) -> None:
    keyring = KeyFile(tmp_path / "key_file.json", "http://127.0.0.1:9")
    assert keyring.auth_headers("inference", allow_missing=True) == {}
    assert not keyring.exists()


def test_unknown_key_kind_is_refused(server: FakeTorchServe) -> None:
    with pytest.raises(ValueError, match="inference, management"):
        key_file(server).key("API")  # type: ignore[arg-type]


def test_torchserve_key_rejection_is_recognised(server: FakeTorchServe) -> None:
    rejected = requests.post(
        f"{server.url}/predictions/b4",
        data=b"",
        headers={"Authorization": "Bearer wrong", "Content-Type": "application/octet-stream"},
        timeout=5,
    )
    assert rejected.status_code == 400
    assert is_invalid_key_response(rejected)
    assert is_invalid_key_response(response(400, b"InvalidKeyException: Token Authorization"))
    bad_input = {"code": 400, "type": "InvalidInput", "message": "bad shape"}
    assert not is_invalid_key_response(response(400, json.dumps(bad_input).encode()))
    assert not is_invalid_key_response(response(503, json.dumps(INVALID_KEY).encode()))


def test_keys_cli_prints_a_valid_key_renewing_an_expired_one(server: FakeTorchServe) -> None:
    server.expire("management")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "b4serve.ops.keys",
            "management",
            "--key-file",
            str(server.key_file),
            "--management-url",
            server.url,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"{server.key('management')}\n"
    assert server.token_calls == {"management": 1}


def test_keys_cli_without_key_file_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "key_file.json"
    argv = ["inference", "--key-file", str(path), "--management-url", "http://127.0.0.1:9"]
    assert keys.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert str(path) in captured.err


def test_keys_cli_bad_port_in_env_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("B4_MANAGEMENT_PORT", "eighty")
    assert keys.main(["management"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "B4_MANAGEMENT_PORT" in err
