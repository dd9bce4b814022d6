"""deploy/systemd: the unit runs scripts/serve.sh, restarts only deaths, stops it with SIGTERM;
systemd's own parser accepts it (no systemd runs here, so it is verified, not run)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "b4serve.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "b4serve.env"
CHECKOUT = "/opt/b4serve"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_serve_sh_and_restarts_only_a_death() -> None:
    service = unit()["Service"]
    assert service["ExecStart"] == f"{CHECKOUT}/scripts/serve.sh"
    assert (ROOT / "scripts" / "serve.sh").stat().st_mode & 0o111  # executable
    assert service["Restart"] == "on-failure"  # serve.sh: 0 stopped, 1 died
    assert service["KillMode"] == "mixed"  # SIGTERM to serve.sh, which stops TorchServe
    assert service["EnvironmentFile"] == "/etc/b4serve/b4serve.env"
    assert unit()["Unit"]["StartLimitIntervalSec"] == "0"  # never gives up on a crash loop


def test_the_env_file_sets_only_variables_env_sh_knows() -> None:
    known = set(re.findall(r': "\$\{(\w+):=', (ROOT / "scripts" / "env.sh").read_text()))
    names = [
        line.split("=", 1)[0]
        for line in ENV_FILE.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert names and set(names) <= known, set(names) - known
    assert "B4_TMPDIR" in names  # its own pid file: `torchserve --stop` finds this server


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    env_file = tmp_path / "b4serve.env"
    shutil.copy(ENV_FILE, env_file)
    # the checkout's paths, and a user that exists here: what an install does
    text = UNIT.read_text().replace(CHECKOUT, str(ROOT))
    text = text.replace("/etc/b4serve/b4serve.env", str(env_file))
    text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.M)
    local = tmp_path / "b4serve.service"
    local.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
