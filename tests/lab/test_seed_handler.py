"""The seed's handler (the bench's baseline), driven by TorchServe's own loader and Service: it
answers what ours does for good images, and one bad body fails its whole batch, as the seed's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from test_handler import ROOT, _decode_response, _request

from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import load_torchscript


def seed_archive(directory: Path, config: ModelConfig, model: torch.nn.Module) -> Path:
    torch.jit.script(model).save(str(directory / "model.pt"))
    config.save(directory)
    shutil.copy(ROOT / "b4serve" / "lab" / "seed_handler.py", directory / "seed_handler.py")
    model = {"modelName": "b4", "serializedFile": "model.pt", "handler": "seed_handler.py",
             "modelVersion": "1"}  # fmt: skip
    manifest = {"runtime": "python", "model": model}
    (directory / "MAR-INF").mkdir()
    (directory / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return directory


def load_seed_service(directory: Path):
    """TorchServe's own loader and Service for the seed's unpacked archive."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    loader = ModelLoaderFactory.get_model_loader()
    service = loader.load("b4", str(directory), "seed_handler.py", None, 4, metrics_cache=metrics)
    service.cl_socket = None
    return service


def test_the_seed_answers_as_ours_and_fails_whole_batches(
    tmp_path, config, toy_model, rng, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # as a worker imports its archive's handler
    service = load_seed_service(seed_archive(tmp_path, config, toy_model))
    assert type(service._entry_point.__self__).__name__ == "SeedHandler"  # not ours
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),  # resized, as ours does
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]  # fmt: skip
    bodies = [encode_npy(image) for image in images]
    responses = _decode_response(service.predict([_request(i, b) for i, b in enumerate(bodies)]))
    assert [r["status"] for r in responses] == [200, 200]
    cpu = torch.device("cpu")
    ours = Classifier(load_torchscript(tmp_path / "model.pt", cpu), config, cpu).classify(bodies)
    for response, outcome in zip(responses, ours, strict=True):
        np.testing.assert_allclose(json.loads(response["body"]), outcome.probabilities, atol=1e-5)
    # no per-request errors: the good body fails beside the bad one
    mixed = _decode_response(service.predict([_request(0, bodies[0]), _request(1, b"junk")]))
    assert [r["status"] for r in mixed] == [503, 503]  # TorchServe fails the batch
