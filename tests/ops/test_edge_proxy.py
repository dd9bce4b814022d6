"""The edge's own side with the real HAProxy and no TorchServe: what it refuses, credentials
issued and revoked at run time and kept over a reload, TLS, and the replicas file.

A request the edge lets through finds no replica here and gets the edge's 503: that is how these
tests tell "passed the edge" from "refused by it". tests/integration/test_edge.py puts the same
edge in front of real TorchServe.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from b4serve.lab.sandbox import ROOT, free_ports
from b4serve.ops.edge import EdgeSettings, credential_hash, load_replicas
from b4serve.serving.config import MAX_BODY_BYTES

EDGE = ROOT / "scripts" / "edge.sh"


def edge_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A loopback edge in ``tmp_path`` for one replica whose ports nobody listens on."""
    edge, inference, v2, management = free_ports(4)
    return {
        **os.environ,
        "B4_RUN_DIR": str(tmp_path / "run"),
        "B4_EDGE_DIR": str(tmp_path / "run" / "edge"),  # scripts/test.sh exports the repo's
        "B4_EDGE_PORT": str(edge),
        "B4_EDGE_BIND": "127.0.0.1",
        "B4_INFERENCE_PORT": str(inference),
        "B4_V2_PORT": str(v2),
        "B4_MANAGEMENT_PORT": str(management),
        "B4_EDGE_CHECK_INTERVAL_MS": "200",
        **extra,
    }


def run_edge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGE), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    environment = edge_env(tmp_path)
    started = run_edge(environment)
    assert started.returncode == 0, started.stderr
    try:
        yield environment
    finally:
        run_edge(environment, "--stop")


def url(env: dict[str, str], path: str = "/predictions/b4", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{env['B4_EDGE_PORT']}{path}"


def post(env: dict[str, str], credential: str | None, path: str = "/predictions/b4", **kw):
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return requests.post(url(env, path), data=b"x", headers=headers, timeout=30, **kw)


def test_help_names_every_command() -> None:
    shown = subprocess.run([str(EDGE), "--help"], capture_output=True, text=True, check=True)
    for command in ("--issue", "--revoke", "--drain", "--ready", "--stop", "B4_EDGE_PORT"):
        assert command in shown.stdout


def test_credentials_are_checked_issued_and_revoked_without_a_reload(env: dict[str, str]):
    assert post(env, None).status_code == 401
    assert post(env, "made-up").status_code == 401
    issued = run_edge(env, "--issue", "alice")
    assert issued.returncode == 0, issued.stderr
    credential = issued.stdout.strip()
    passed = post(env, credential)
    assert passed.status_code == 503  # through the edge, to no replica
    assert passed.json()["type"] == "ServiceUnavailable"
    assert post(env, credential, "/v2/models/b4/infer").status_code == 503
    assert run_edge(env, "--revoke", "alice").returncode == 0
    assert post(env, credential).status_code == 401
    assert run_edge(env, "--revoke", "alice").returncode == 1  # nothing left to revoke


def test_the_map_keeps_hashes_and_a_reload_keeps_credentials(env: dict[str, str]) -> None:
    credential = run_edge(env, "--issue", "bob").stdout.strip()
    replaced = run_edge(env, "--issue", "carol").stdout.strip()
    newer = run_edge(env, "--issue", "carol").stdout.strip()  # carol's first one is void
    stored = (Path(env["B4_EDGE_DIR"]) / "credentials.map").read_text()
    assert credential not in stored and credential_hash(credential) in stored
    assert run_edge(env).returncode == 0  # reload
    assert post(env, credential).status_code == 503
    assert post(env, newer).status_code == 503
    assert post(env, replaced).status_code == 401
    assert run_edge(env, "--list").stdout.split() == ["bob", "carol"]


def test_management_metrics_and_other_paths_are_not_served(env: dict[str, str]) -> None:
    credential = run_edge(env, "--issue", "dave").stdout.strip()
    for path in ("/models", "/metrics", "/ping", "/token", "/api-description", "/v2x", "/"):
        answer = requests.get(
            url(env, path), headers={"Authorization": f"Bearer {credential}"}, timeout=30
        )
        assert answer.status_code == 404, path


def test_bodies_over_the_limit_or_without_a_length_are_refused(env: dict[str, str]) -> None:
    credential = run_edge(env, "--issue", "erin").stdout.strip()
    too_big = requests.post(
        url(env),
        data=b"\0" * (MAX_BODY_BYTES + 1),
        headers={"Authorization": f"Bearer {credential}"},
        timeout=60,
    )
    assert too_big.status_code == 413 and too_big.json()["type"] == "PayloadTooLarge"
    chunked = requests.post(
        url(env),
        data=iter([b"x"]),
        headers={"Authorization": f"Bearer {credential}"},
        timeout=30,
    )
    assert chunked.status_code == 411


def test_tls_when_a_certificate_and_key_are_given(tmp_path: Path) -> None:
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    self_signed = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run([*self_signed, *names, *files], capture_output=True, check=True, timeout=60)
    env = edge_env(tmp_path, B4_EDGE_CERT=str(cert), B4_EDGE_KEY=str(key))
    started = run_edge(env)
    assert started.returncode == 0, started.stderr
    try:
        credential = run_edge(env, "--issue", "frank").stdout.strip()
        answer = requests.post(
            url(env, scheme="https"),
            data=b"x",
            verify=str(cert),
            headers={"Authorization": f"Bearer {credential}"},
            timeout=30,
        )
        assert answer.status_code == 503  # TLS, then through the edge to no replica
        with pytest.raises(requests.ConnectionError):
            requests.post(url(env), data=b"x", timeout=10)  # no plain HTTP on a TLS edge
    finally:
        run_edge(env, "--stop")


def test_tls_needs_both_the_certificate_and_the_key(tmp_path: Path) -> None:
    env = edge_env(tmp_path, B4_EDGE_CERT=str(tmp_path / "edge.crt"))
    refused = run_edge(env)
    assert refused.returncode != 0 and "B4_EDGE_KEY" in refused.stderr


def test_replicas_file_lines_and_mistakes(tmp_path: Path) -> None:
    env = edge_env(tmp_path)
    replicas = tmp_path / "replicas"
    replicas.write_text(
        "# name host inference v2 management key_file\n"
        "a 10.0.0.1 8080 8083 8081 /run/a/key_file.json\n"
        "b 10.0.0.2 8080 8083 8081 /run/b/key_file.json  # second\n"
    )
    settings = EdgeSettings.from_env(_with_defaults(env, B4_EDGE_REPLICAS=str(replicas)))
    loaded = load_replicas(settings)
    assert [(r.name, r.address("predictions"), r.address("v2")) for r in loaded] == [
        ("a", "10.0.0.1:8080", "10.0.0.1:8083"),
        ("b", "10.0.0.2:8080", "10.0.0.2:8083"),
    ]
    for wrong in ("a 10.0.0.1 8080 8083 /k\n", "a h 1 2 3 /k\na h 4 5 6 /k\n", "a/b h 1 2 3 /k\n"):
        replicas.write_text(wrong)
        with pytest.raises(ValueError):
            load_replicas(settings)


def _with_defaults(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` with scripts/env.sh's defaults filled in, as edge.sh would run Python."""
    shown = subprocess.run(
        ["bash", "-c", f"source {ROOT / 'scripts' / 'env.sh'} && env -0"],
        env={**env, **extra},
        capture_output=True,
        check=True,
        timeout=30,
    )
    pairs = (item.split("=", 1) for item in shown.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)
