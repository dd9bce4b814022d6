"""Dockerfile: lint-clean, builds from files the repo has, installs what scripts/bootstrap.sh
installs in the same order, runs as a non-root user, and serves our config in the foreground.

No Docker daemon is needed: the file is parsed (dockerfile-parse), linted (hadolint), and its
registration step is run here against a tmp dir.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from b4serve.ops.manage import Registration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def instructions(name: str) -> list[str]:
    """The values of every ``name`` instruction, continuation lines joined."""
    parsed = DockerfileParser(str(DOCKERFILE), cache_content=True)
    return [item["value"] for item in parsed.structure if item["instruction"] == name]


def run_index(fragment: str) -> int:
    """Position among the RUN instructions of the one that contains ``fragment``."""
    (index,) = [i for i, value in enumerate(instructions("RUN")) if fragment in value]
    return index


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def dockerignore_admits(path: str) -> bool:
    """Whether Docker sends ``path`` in the build context (.dockerignore: last match wins)."""
    admitted = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            admitted = negated
    return admitted


def copy_sources() -> list[str]:
    """Source paths of every COPY, build args replaced by an example archive name."""
    sources = []
    for value in instructions("COPY"):
        *paths, _ = shlex.split(value)
        sources += [p.replace("${MAR}", "b4-1.0.mar") for p in paths if not p.startswith("--")]
    return sources


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: scripts/bootstrap.sh --dev installs it"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    for source in copy_sources():
        if source == "model-store/b4-1.0.mar":  # built by scripts/build_mar.sh before the image
            assert (ROOT / "model-store").is_dir()
        else:
            assert (ROOT / source).exists(), source
        candidates = [source] if not source.endswith("/") else []
        candidates += [f"{source.rstrip('/')}/{p.name}" for p in (ROOT / source).glob("*.py")]
        for candidate in candidates:
            assert dockerignore_admits(candidate), f"{candidate} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    for path in (".venv/bin/python", ".cache/demo/x.pth", ".run/key_file.json", ".git/HEAD"):
        assert not dockerignore_admits(path), path
    assert not dockerignore_admits("model-store/model.pt")


def test_runs_as_the_unprivileged_user_it_creates() -> None:
    (created,) = [v for v in instructions("RUN") if "useradd" in v]
    uid = re.search(r"--uid (\d+)", created)
    assert uid is not None
    users = instructions("USER")
    assert users[-1] == uid.group(1) != "0"
    parsed = DockerfileParser(str(DOCKERFILE), cache_content=True).structure
    order = [item["instruction"] for item in parsed if item["instruction"] in ("USER", "CMD")]
    assert order[-1] == "CMD" and "USER" in order


def test_torch_is_the_cpu_build_of_the_requirements_pin() -> None:
    (pin,) = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.startswith("torch==")]  # fmt: skip
    (install,) = [v for v in instructions("RUN") if CPU_INDEX in v]
    # The Dockerfile reads the pin from requirements.txt: evaluate its own expression here.
    expression = re.search(r'"(\$\(grep [^)]*torch==[^)]*\))"', install)
    assert expression is not None, install
    resolved = shell(f'printf %s "{expression.group(1)}"', ROOT)
    assert resolved.stdout == pin == "torch==2.13.0"
    installs = [i for i, value in enumerate(instructions("RUN")) if "pip install" in value]
    assert run_index(CPU_INDEX) == installs[0]  # before anything that depends on torch


def test_install_steps_follow_bootstrap() -> None:
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    # Step 2 installs the same lines of requirements.txt as bootstrap.sh's.
    excluded = re.search(r"grep -vE '(\^\(torch==[^']+)'", bootstrap)
    assert excluded is not None
    rest = run_index(f"grep -vE '{excluded.group(1)}' requirements.txt")
    geffnet = run_index("grep -E '^geffnet'")
    assert run_index(CPU_INDEX) < rest < geffnet
    assert "--no-deps" in instructions("RUN")[geffnet]
    # Same import check as bootstrap.sh's.
    imports = re.search(r'"\$PY" -c "(import [^"]+)"', bootstrap)
    assert imports is not None
    assert imports.group(1) in instructions("RUN")[geffnet]


def test_serves_our_config_in_the_foreground() -> None:
    assert "config.properties log4j.properties metrics.yaml ./" in instructions("COPY")
    (workdir, *_) = instructions("WORKDIR")
    (cmd,) = instructions("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["torchserve", "--foreground"]
    assert argv[argv.index("--ts-config") + 1] == f"{workdir}/config.properties"
    assert argv[argv.index("--log-config") + 1] == f"{workdir}/log4j.properties"
    assert argv[argv.index("--model-store") + 1] == f"{workdir}/model-store"
    # the v2 plugin, built into that directory by scripts/build_plugin.sh
    plugins = argv[argv.index("--plugins-path") + 1]
    assert any(f"B4_PLUGINS_DIR={plugins} scripts/build_plugin.sh" in run
               for run in instructions("RUN"))  # fmt: skip


def test_exposes_inference_and_v2_never_management_or_metrics() -> None:
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV")).replace("\\", " ")))
    exposed = {int(port) for port in " ".join(instructions("EXPOSE")).split()}
    ports = {key: int(env[key].rsplit(":", 1)[1]) for key in env if key.endswith("_ADDRESS")}
    public = ("TS_INFERENCE_ADDRESS", "B4_V2_ADDRESS")  # `docker run -P` publishes no more
    assert exposed == {ports[key] for key in public}
    assert ports["B4_V2_ADDRESS"] == int(env["B4_V2_PORT"])
    assert env["TS_MANAGEMENT_ADDRESS"].startswith("http://127.0.0.1:")
    assert ports["TS_INFERENCE_ADDRESS"] == int(env["B4_INFERENCE_PORT"])
    assert ports["TS_MANAGEMENT_ADDRESS"] == int(env["B4_MANAGEMENT_PORT"])


def test_no_documented_docker_run_publishes_metrics_beyond_the_hosts_loopback() -> None:
    # the metrics API takes no token: Prometheus reaches it on the container's own network
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV")).replace("\\", " ")))
    metrics = int(env["TS_METRICS_ADDRESS"].rsplit(":", 1)[1])
    runs = [line for doc in (DOCKERFILE, ROOT / "deploy" / "docker.md")
            for line in doc.read_text().splitlines()
            if line.lstrip("# ").startswith("docker run")]  # commands, not prose  # fmt: skip
    assert runs
    for run in runs:
        published = re.findall(r"-p\s+(\S+)", run)
        assert published, run
        for mapping in published:
            if mapping.rsplit(":", 1)[-1] == str(metrics):
                assert mapping.startswith("127.0.0.1:"), run


def test_health_check_is_the_projects_health_command() -> None:
    (check,) = instructions("HEALTHCHECK")
    assert "python -m b4serve.ops.health" in check  # what scripts/health.sh runs


def test_metrics_config_is_ours_at_an_absolute_path() -> None:
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV")).replace("\\", " ")))
    (workdir, *_) = instructions("WORKDIR")
    assert env["TS_METRICS_CONFIG"] == f"{workdir}/metrics.yaml"
    assert any("metrics.yaml" in copy for copy in instructions("COPY"))


@pytest.fixture
def registration_run(tmp_path: Path) -> str:
    """The Dockerfile's registration RUN, to run in a tmp copy of the image's /opt/b4."""
    (tmp_path / "b4serve").symlink_to(ROOT / "b4serve")
    (tmp_path / "model-store").mkdir()
    shutil.copy(ROOT / "config.properties", tmp_path / "config.properties")
    (command,) = [v for v in instructions("RUN") if "load_models" in v]
    return command


def test_registration_step_writes_registration_defaults(
    tmp_path: Path, registration_run: str
) -> None:
    venv_bin = str(Path(sys.executable).parent)
    result = shell(registration_run, tmp_path, MAR="b4-1.0.mar", PATH=f"{venv_bin}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    added = (tmp_path / "config.properties").read_text().splitlines()[-2:]
    assert added[0] == "load_models=b4-1.0.mar"
    entry = json.loads(added[1].removeprefix("models="))["b4"]["1.0"]
    defaults = Registration()
    assert entry == {
        "defaultVersion": True,
        "marName": "b4-1.0.mar",
        "minWorkers": defaults.initial_workers,
        "maxWorkers": defaults.initial_workers,
        "batchSize": defaults.batch_size,
        "maxBatchDelay": defaults.max_batch_delay_ms,
        "responseTimeout": defaults.response_timeout_s,
    }


@pytest.mark.parametrize(("mar", "message"), [("", "is required"), ("model.mar", "must be b4-")])
def test_registration_step_refuses_a_missing_or_misnamed_archive(
    tmp_path: Path, registration_run: str, mar: str, message: str
) -> None:
    venv_bin = str(Path(sys.executable).parent)
    result = shell(registration_run, tmp_path, MAR=mar, PATH=f"{venv_bin}:/usr/bin:/bin")
    assert result.returncode != 0
    assert message in result.stderr
