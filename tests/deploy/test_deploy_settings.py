"""scripts/deploy.sh refuses protocol settings that cannot work, in one line, before acting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from b4serve.lab.sandbox import server_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"B4_PROTOCOL": "grpc"}, "B4_PROTOCOL must be raw, v1 or v2: grpc"),
        ({"B4_ENVELOPE": "kservev3"}, "B4_ENVELOPE must be empty, kserve or kservev2: kservev3"),
        # the envelope json-decodes every body: deploy's smoke test must speak its protocol
        (
            {"B4_ENVELOPE": "kservev2"},
            "B4_ENVELOPE=kservev2 reads KServe JSON only: set B4_PROTOCOL=v2",
        ),
        ({"B4_ENVELOPE": "kserve", "B4_PROTOCOL": "v2"}, "set B4_PROTOCOL=v1"),
        ({"B4_V2_PLUGIN": "yes"}, "B4_V2_PLUGIN must be auto, 0 or 1: yes"),
    ],
)
def test_unworkable_protocol_settings_are_refused(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    # a throwaway server's settings: were the check gone, nothing real would be touched
    isolated = {**server_env(tmp_path), **env}
    result = subprocess.run([str(ROOT / "scripts" / "deploy.sh")], env=isolated,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert not Path(isolated["B4_RUN_DIR"]).exists()  # refused before starting anything
