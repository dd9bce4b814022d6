"""Config in its homes: the exported metadata, config.properties, and the scripts' --help."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from b4serve.serving.config import MAX_BODY_BYTES, ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def server_properties() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (ROOT / "config.properties").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_model_config_round_trips_through_its_two_files(tmp_path: Path) -> None:
    config = ModelConfig.for_arch(
        "efficientnet_b4", 3, ["cat", "dog", "eel"], demo=True, micro_batch=2, threads=1,
        malloc_keep_mb=64, onednn_fusion=False,
    )  # fmt: skip
    written = config.save(tmp_path)
    assert sorted(p.name for p in written) == ["index_to_name.json", "model_meta.json"]
    assert ModelConfig.load(tmp_path) == config
    assert (config.input_size, config.mean) == (380, (0.485, 0.456, 0.406))


def test_model_config_refuses_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        ModelConfig.for_arch("efficientnet_b4", 3, ["a", "b"])
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig.for_arch("resnet50", 3)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        ModelConfig.for_arch("efficientnet_b4", 3, threads=-1)
    with pytest.raises(ValueError, match="malloc_keep_mb must be in"):
        ModelConfig.for_arch("efficientnet_b4", 3, malloc_keep_mb=2048)


def test_model_config_records_the_variant_and_refuses_one_its_arch_is_not() -> None:
    config = ModelConfig.for_arch("tf_efficientnet_b4_ap", 6)
    assert (config.padding, config.bn_eps, config.input_size) == ("tf_same", 1e-3, 380)
    assert (config.mean, config.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="tf_efficientnet_b4 has tf_same padding and batch-norm"):
        dataclasses.replace(ModelConfig.for_arch("tf_efficientnet_b4", 6), padding="symmetric")
    with pytest.raises(ValueError, match="padding must be one of symmetric, tf_same"):
        dataclasses.replace(config, padding="valid")


def test_max_request_size_is_the_largest_body_the_handler_accepts() -> None:
    assert int(server_properties()["max_request_size"]) == MAX_BODY_BYTES


def test_server_defaults_are_safe() -> None:
    properties = server_properties()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert properties[key].startswith("http://127.0.0.1:"), key
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "true"
    assert properties["decode_input_request"] == "false"
    assert properties["allowed_urls"] == "(?!)"  # no URL at all: model-store names only
    assert "-Dlog4j.configurationFile=log4j.properties" in properties["vmargs"]


@pytest.mark.parametrize(
    "script",
    ["bootstrap.sh", "build_mar.sh", "deploy.sh", "test.sh", "health.sh", "soak.sh", "bench.sh",
     "kserve_layout.sh", "serve.sh"],
)  # fmt: skip
def test_every_script_answers_help(script: str) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "Usage: scripts/" + script in result.stdout


def test_scripts_refuse_unknown_arguments() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "deploy.sh"), "--bogus"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "unknown argument: --bogus" in result.stderr


def test_model_config_load_reads_every_field_and_refuses_unknown_ones(tmp_path: Path) -> None:
    config = ModelConfig.for_arch("efficientnet_b0", 2, ["x", "y"], threads=3, optimize=False)
    config.save(tmp_path)
    meta_path = tmp_path / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta) == {f.name for f in dataclasses.fields(ModelConfig)} - {"class_names"}
    loaded = ModelConfig.load(tmp_path)
    assert (loaded.threads, loaded.optimize, type(loaded.mean)) == (3, False, tuple)
    meta_path.write_text(json.dumps({**meta, "thread": 2}))
    with pytest.raises(ValueError, match="unknown fields: thread"):
        ModelConfig.load(tmp_path)
