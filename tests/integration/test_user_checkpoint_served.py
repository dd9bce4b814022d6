"""A user's tf_ B4 and an efficientnet_pytorch B4, saved the seed's way, deployed with the real
scripts and served equal to the user's own module: as further models on the session server,
unregistered at the end."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
import torch

from b4serve.build.parity import probe_batch
from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import ROOT, Server
from b4serve.lab.user_checkpoints import (
    efficientnet_pytorch_module,
    flip_tta_reference,
    save_checkpoint,
    user_module,
)
from b4serve.ops.manage import ManagementAPI

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
    # TorchScript pinned: auto's choice is proven on real photos (test_real_network_served.py)
    deployed = server.deploy(
        "--checkpoint",
        str(checkpoint),
        "--trust-checkpoint",
        B4_MODEL_NAME=second_model,
        B4_RUNTIME="torchscript",
    )
    assert "your module is tf_efficientnet_b4 (b4 widths and depths, TensorFlow 'same' " \
        "padding, batch-norm eps 0.001)" in deployed.stderr  # fmt: skip
    assert "model.pt reproduces your module" in deployed.stderr
    version = ManagementAPI(server.endpoints, server.keys).default_version(second_model)
    assert version is not None
    assert server.classifier(version).config.arch == "tf_efficientnet_b4"

    discs, _ = generate_images(per_class=1, seed=31, size=SIZE)
    noise = np.random.default_rng(32).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    images = np.concatenate([discs[:4], noise])
    served = server.probabilities(images, second_model)
    expected = flip_tta_reference(module, images, MEAN, STD)
    difference = float(np.abs(served - expected).max())
    print(f"\n[variants] served vs the user's module, flip TTA: max |p diff| {difference:.2e}")
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


EP_MODEL = "b4ep"  # an efficientnet_pytorch B4, beside the others


@pytest.fixture
def ep_model(server: Server) -> Iterator[str]:
    yield EP_MODEL
    api = ManagementAPI(server.endpoints, server.keys)
    for version in api.versions(EP_MODEL):
        api.unregister(EP_MODEL, version["modelVersion"], timeout_s=120)


def build_mar(server: Server, checkpoint: Path, store: Path, **env: str) -> CompletedProcess:
    """scripts/build_mar.sh alone (no deploy) into its own model store and build cache."""
    command = [str(ROOT / "scripts" / "build_mar.sh"), "--checkpoint", str(checkpoint)]
    settings = {**server.env, "B4_MODEL_STORE": str(store), "B4_CACHE_DIR": str(store / "cache"),
                "B4_MODEL_NAME": EP_MODEL, "B4_RUNTIME": "torchscript", **env}  # fmt: skip
    return subprocess.run(command, env=settings, capture_output=True, text=True, timeout=900)


def test_an_efficientnet_pytorch_b4_is_served_equal_to_the_users_module(
    server: Server, ep_model: str, tmp_path: Path
) -> None:
    module = efficientnet_pytorch_module("b4", seed=17)  # EfficientNet.from_name("efficientnet-b4")
    checkpoint = save_checkpoint(module, "module", tmp_path / "ep-b4.pth")
    # the whole module, no B4_ARCH: told from its class and layers (the runtime is pinned: one
    # B4 export fewer; tests/integration/test_runtime_choice.py covers the choice)
    deployed = server.deploy(
        "--checkpoint", str(checkpoint), "--trust-checkpoint",
        B4_MODEL_NAME=ep_model, B4_RUNTIME="torchscript",
    )  # fmt: skip
    assert "your efficientnet_pytorch module is tf_efficientnet_b4 (b4 widths and depths, " \
        "TensorFlow 'same' padding, batch-norm eps 0.001)" in deployed.stderr  # fmt: skip
    assert "warning" not in deployed.stderr  # its library says its preprocessing
    version = ManagementAPI(server.endpoints, server.keys).default_version(ep_model)
    assert version is not None
    config = server.classifier(version).config
    assert (config.arch, config.input_size, config.mean, config.std) == (
        "tf_efficientnet_b4", SIZE, MEAN, STD
    )  # fmt: skip
    assert config.extra["checkpoint_library"] == "efficientnet_pytorch"

    discs, _ = generate_images(per_class=1, seed=33, size=SIZE)
    noise = np.random.default_rng(34).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    images = np.concatenate([discs[:3], noise])
    served = server.probabilities(images, ep_model)
    expected = flip_tta_reference(module, images, MEAN, STD)
    assert np.abs(expected[0] - expected[-1]).max() > 1e-3  # answers that depend on the input
    difference = float(np.abs(served - expected).max())
    print(f"\n[efficientnet_pytorch] served B4 vs the user's module, flip TTA: max |p diff| "
          f"{difference:.2e}")  # fmt: skip
    assert difference <= 1e-4

    # The same network as a state dict (DataParallel's keys): with B4_ARCH it builds an archive
    # proven against the same module; with an arch of another network it is refused, naming
    # the arch that fits.
    state_dict = save_checkpoint(module, "dataparallel", tmp_path / "ep-b4-sd.pth")
    built = build_mar(server, state_dict, tmp_path / "sd", B4_ARCH="tf_efficientnet_b4")
    assert built.returncode == 0, built.stderr[-2000:]
    scripted = next((tmp_path / "sd" / "cache" / "build").glob("*/model.pt"))
    probe = probe_batch(SIZE, MEAN, STD)
    with torch.inference_mode():
        sd_difference = (torch.jit.load(str(scripted))(probe) - module(probe)).abs().max().item()
    print(f"[efficientnet_pytorch] B4 state dict's archive vs the module: max |logit diff| "
          f"{sd_difference:.2e}")  # fmt: skip
    assert sd_difference <= 1e-4
    refused = build_mar(server, state_dict, tmp_path / "wrong", B4_ARCH="efficientnet_b4")
    assert refused.returncode != 0
    assert "export_torchscript: error: checkpoint does not match efficientnet_b4: its state " \
        "dict has b4 widths and depths, TensorFlow 'same' padding, batch-norm eps 0.001, " \
        "efficientnet_b4 has b4 widths and depths, symmetric padding, batch-norm eps 1e-05; " \
        "tf_efficientnet_b4 or tf_efficientnet_b4_ap or tf_efficientnet_b4_ns would match" \
        in refused.stderr  # fmt: skip
    assert not list((tmp_path / "wrong").glob("*.mar"))
