"""The README's own examples, run as a user would paste them, against the session's server.

Each fenced block is taken from README.md as it stands; only the default addresses and the key
file's path are rewritten to the session server's, so an example that rots fails here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.demo import DEMO_CLASSES
from b4serve.lab.sandbox import ROOT, Server
from b4serve.serving.codec import encode_npy

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
EXAMPLES = ROOT / ".cache" / "demo" / "examples"


def blocks(language: str) -> list[str]:
    """The README's fenced blocks in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def block(language: str, marker: str) -> str:
    """The one ``language`` block that contains ``marker``."""
    found = [text for text in blocks(language) if marker in text]
    assert len(found) == 1, f"README.md: {len(found)} {language} blocks contain {marker!r}"
    return found[0]


def for_server(text: str, server: Server) -> str:
    """``text`` with the default ports and key file replaced by the session server's."""
    env = server.env
    ports = {"8080": "B4_INFERENCE_PORT", "8081": "B4_MANAGEMENT_PORT",
             "8082": "B4_METRICS_PORT", "8083": "B4_V2_PORT"}  # fmt: skip
    for default, variable in ports.items():
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{env[variable]}")
    return text.replace(".run/key_file.json", env["B4_KEY_FILE"])


def shell(command: str, server: Server) -> str:
    """Run ``command`` in bash from the repository root with the server's environment."""
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def python(
    code: str, server: Server, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, object], str]:
    """Execute ``code`` in this process, from the repository root, with the server's B4_*
    environment; return its namespace and what it printed."""
    monkeypatch.chdir(ROOT)
    for name, value in server.env.items():
        if name.startswith("B4_"):
            monkeypatch.setenv(name, value)
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)  # the README's own code
    return namespace, printed.getvalue()


def assert_probabilities(answer: object, expected_class: str) -> None:
    probabilities = np.asarray(answer, dtype=np.float64)
    assert probabilities.shape == (len(DEMO_CLASSES),), answer
    assert abs(probabilities.sum() - 1) < 1e-5, answer
    assert DEMO_CLASSES[int(probabilities.argmax())] == expected_class, answer


def test_the_curl_example_answers_its_probabilities(server: Server) -> None:
    command = block("bash", "curl -s http://127.0.0.1:8080/predictions/b4")
    assert_probabilities(json.loads(shell(for_server(command, server), server)), "demo_red_blob")


def test_the_python_example_answers_each_image_in_order(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace, _ = python(block("python", "predict_batch"), server, monkeypatch)
    answers = namespace["probabilities"]
    assert isinstance(answers, list) and len(answers) == 2
    assert_probabilities(answers[0], "demo_red_blob")
    assert_probabilities(answers[1], "demo_blue_blob")


def test_the_cli_example_writes_one_line_per_file_in_order(server: Server, tmp_path: Path) -> None:
    command = block("bash", "b4serve.client")
    output = tmp_path / "results.jsonl"
    assert "--output results.jsonl" in command
    shell(for_server(command, server).replace("results.jsonl", str(output)), server)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["index"] for record in records] == list(range(len(records)))
    names = [Path(record["input"]).name for record in records]
    assert sorted(names) == sorted(path.name for path in EXAMPLES.glob("*.npy"))
    labels = json.loads((EXAMPLES / "labels.json").read_text())
    for name, record in zip(names, records, strict=True):
        assert_probabilities(record["probabilities"], labels[name]["class_name"])


@pytest.mark.usefixtures("v2_plugin")
def test_the_tritonclient_example_answers_on_the_v2_port(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = for_server(block("python", "tritonclient"), server)
    namespace, printed = python(code, server, monkeypatch)
    answer = namespace["answer"].as_numpy("probabilities")  # type: ignore[attr-defined]
    assert_probabilities(answer, "demo_green_blob")
    shown = np.array(printed.strip(" []\n").split(), dtype=np.float64)  # what the user sees
    np.testing.assert_allclose(shown, answer, rtol=1e-5)


def test_the_operate_commands_report_the_server(server: Server) -> None:
    lines = block("bash", "scripts/health.sh").splitlines()
    health, metrics = lines[0], next(line for line in lines if "/metrics" in line)
    assert re.search(r"^status\s+healthy$", shell(health.split("#")[0], server), re.M)
    assert "b4_requests" in shell(for_server(metrics.split("  #")[0], server), server)


def test_the_error_shown_is_the_one_a_truncated_body_gets(server: Server) -> None:
    shown = re.search(r"Errors are JSON, `(\{.*?\})`", README.read_text(), re.S)
    assert shown, "README.md: no error example"
    expected = json.loads(shown.group(1).replace("\n", " "))
    body = encode_npy(np.zeros((380, 380, 3), np.uint8))[:-10]
    headers = {"Content-Type": "application/octet-stream", **server.keys.auth_headers("inference")}
    response = requests.post(server.endpoints.predictions_url, data=body, headers=headers,
                             timeout=60)  # fmt: skip
    assert response.status_code == expected["code"]
    assert response.json() == expected
