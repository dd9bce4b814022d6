"""A user's tf_ B4, saved the seed's way, deployed with the real scripts and served equal to the
user's own module: as a second model on the session server, unregistered at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server
from b4serve.lab.user_checkpoints import flip_tta_reference, save_checkpoint, user_module
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy

pytestmark = pytest.mark.integration

MODEL = "b4tf"  # beside the session's b4, which the other tests keep serving
# timm's published preprocessing for tf_efficientnet_b4_ns: ImageNet's mean/std, 380 px
MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 380


@pytest.fixture
def second_model(server: Server) -> Iterator[str]:
    yield MODEL
    api = ManagementAPI(server.endpoints, server.keys)
    for version in api.versions(MODEL):
        api.unregister(MODEL, version["modelVersion"], timeout_s=120)


def test_a_tf_b4_saved_the_seeds_way_is_served_equal_to_the_users_module(
    server: Server, second_model: str, tmp_path: Path
) -> None:
    module = user_module("tf_efficientnet_b4_ns", seed=13)
    checkpoint = save_checkpoint(module, "module", tmp_path / "finetuned.pth")
    deployed = server.deploy(
        "--checkpoint", str(checkpoint), "--trust-checkpoint", B4_MODEL_NAME=second_model
    )
    assert "your module is tf_efficientnet_b4 (b4 widths and depths, TensorFlow 'same' " \
        "padding, batch-norm eps 0.001)" in deployed.stderr  # fmt: skip
    assert "model.pt reproduces your module" in deployed.stderr  # auto then picks the runtime
    version = ManagementAPI(server.endpoints, server.keys).default_version(second_model)
    assert version is not None
    assert server.classifier(version).config.arch == "tf_efficientnet_b4"

    discs, _ = generate_images(per_class=1, seed=31, size=SIZE)
    noise = np.random.default_rng(32).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    images = np.concatenate([discs[:4], noise])
    url = f"{server.endpoints.inference_url}/predictions/{second_model}"
    headers = {"Content-Type": "application/octet-stream", **server.keys.auth_headers("inference")}
    responses = [
        requests.post(url, data=encode_npy(image), headers=headers, timeout=120) for image in images
    ]
    assert [r.status_code for r in responses] == [200] * len(images), responses[0].text[:300]
    served = np.array([r.json() for r in responses])
    expected = flip_tta_reference(module, images, MEAN, STD)
    difference = float(np.abs(served - expected).max())
    print(f"\n[variants] served vs the user's module, flip TTA: max |p diff| {difference:.2e}")
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
