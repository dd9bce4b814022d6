"""scripts/build_plugin.sh: the v2 plugin's jar, as TorchServe loads it, built once per source.

The integration tests load the jar into real TorchServe (tests/integration/test_v2_api.py);
here only the build: what the jar holds, that an unchanged source is not rebuilt, and that a
host without a JDK gets a sentence saying what to install.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_plugin.sh"
SERVICE = "META-INF/services/org.pytorch.serve.servingsdk.ModelServerEndpoint"


def build(plugins: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env={**os.environ, "B4_PLUGINS_DIR": str(plugins), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def jar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("javac") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail(
            "a JDK is needed to build the v2 plugin: apt-get install openjdk-17-jdk-headless"
        )
    plugins = tmp_path_factory.mktemp("plugins")
    built = build(plugins)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(plugins)  # what --plugins-path takes
    return plugins / "b4serve-v2.jar"


def test_the_jar_registers_the_endpoint_for_torchserve_in_java_11_bytecode(jar: Path) -> None:
    with zipfile.ZipFile(jar) as archive:
        names = set(archive.namelist())
        assert archive.read(SERVICE).decode().split() == ["b4serve.v2.OpenInferenceEndpoint"]
        header = archive.read("b4serve/v2/V2Listener.class")[:8]
    assert {f"b4serve/v2/{c}.class" for c in ("V2Api", "ForwardedJob")} <= names
    magic, _, major = struct.unpack(">IHH", header)
    assert magic == 0xCAFEBABE and major == 55  # Java 11: TorchServe 0.12's oldest JVM


def test_an_unchanged_source_is_not_rebuilt_and_only_one_jar_is_left(jar: Path) -> None:
    before = jar.stat().st_mtime_ns
    again = build(jar.parent)
    assert again.returncode == 0, again.stderr
    assert jar.stat().st_mtime_ns == before and "built" not in again.stderr
    # TorchServe loads every jar in the directory and refuses two plugins for one path
    assert [p.name for p in jar.parent.glob("*.jar")] == ["b4serve-v2.jar"]


def test_a_host_without_a_jdk_is_told_what_to_install(tmp_path: Path) -> None:
    no_jdk = tmp_path / "jre-only"
    (no_jdk / "bin").mkdir(parents=True)
    checked = build(tmp_path / "plugins", "--check", JAVA_HOME=str(no_jdk))
    assert checked.returncode == 1
    assert "no javac: the v2 plugin needs a JDK to build" in checked.stderr
    assert "openjdk-17-jdk-headless" in checked.stderr
    assert build(tmp_path / "plugins", JAVA_HOME=str(no_jdk)).returncode == 1
    assert not (tmp_path / "plugins").exists()
