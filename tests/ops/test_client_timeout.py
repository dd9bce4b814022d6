"""How long a request may wait in TorchServe's queue: the bundled client's timeout, written into
every archive's model config, where TorchServe 0.12 reads clientTimeoutInMills."""

from __future__ import annotations

import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from b4serve.client.http import _parser, iter_results
from b4serve.lab.abandoned import with_client_timeout
from b4serve.ops.manage import Registration

ROOT = Path(__file__).resolve().parents[2]


def test_the_queue_limit_is_the_bundled_clients_timeout() -> None:
    library = inspect.signature(iter_results).parameters["timeout_s"].default
    cli = _parser().get_default("timeout")  # python -m b4serve.client --timeout
    assert Registration().client_timeout_ms == library * 1000 == cli * 1000
    assert Registration.for_gpus(2).client_timeout_ms == Registration().client_timeout_ms


def test_the_model_config_is_the_yaml_torchserve_reads() -> None:
    config = yaml.safe_load(Registration(client_timeout_ms=2500).model_config())
    # TorchServe 0.12 takes the value only as a YAML integer (ModelConfig.build: Integer)
    assert config == {"clientTimeoutInMills": 2500}
    assert type(config["clientTimeoutInMills"]) is int


def test_build_mar_writes_the_registration_value_into_the_archive_config() -> None:
    script = (ROOT / "scripts" / "build_mar.sh").read_text()
    assert '--config-file "$pack/model-config.yaml"' in script
    assert "b4serve.ops.manage model-config" in script
    for args, expected in ([], 60_000), (["--client-timeout-ms", "1500"], 1500):
        command = [sys.executable, "-m", "b4serve.ops.manage", "model-config", *args]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert yaml.safe_load(out) == {"clientTimeoutInMills": expected}


def test_the_lab_rewrites_an_archives_client_timeout(tmp_path: Path) -> None:
    mar = tmp_path / "b4.mar"
    with zipfile.ZipFile(mar, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"configFile": "model-config.yaml"}}')
        archive.writestr("model-config.yaml", Registration().model_config())
    copy = with_client_timeout(mar, tmp_path / "copy.mar", 3000)
    with zipfile.ZipFile(copy) as archive:
        assert archive.read("model-config.yaml").decode() == "clientTimeoutInMills: 3000\n"
        assert archive.read("MAR-INF/MANIFEST.json") == (
            b'{"model": {"configFile": "model-config.yaml"}}'
        )
