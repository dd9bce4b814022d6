"""efficientnet_pytorch checkpoints (B0-B4, and Lite0-Lite4 from efficientnet_lite_pytorch): every
size maps onto its gen-efficientnet tf_ port with the user's exact weights and logits, every form
loads, export proves and records it, and what does not fit is refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import export_torchscript
from b4serve.build.checkpoint import CheckpointError, load_checkpoint
from b4serve.build.foreign import to_geffnet_keys
from b4serve.lab.user_checkpoints import (
    FORMS,
    WHOLE_MODULE_FORMS,
    efficientnet_pytorch_module,
    flip_tta_reference,
    save_checkpoint,
)
from b4serve.serving.archs import IMAGENET_MEAN, IMAGENET_STD, TF_SAME, arch_spec
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import load_runtime_file

SIZES = ("b0", "b1", "b2", "b3", "b4", "lite0", "lite1", "lite2", "lite3", "lite4")
SMALL = 64  # px: every size's network at a size a shared 2-core machine runs in a moment
TOLERANCE = 1e-4  # the export's own proof (b4serve.build.parity.LOGIT_TOLERANCE)


def batch(arch: str, size: int, seed: int = 1, images: int = 2) -> torch.Tensor:
    """Uniform noise images normalised as ``arch`` feeds them."""
    spec = arch_spec(arch)
    pixels = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


@pytest.mark.parametrize("scale", SIZES)
def test_every_size_maps_onto_its_tf_port_with_the_users_weights_and_logits(
    tmp_path: Path, scale: str
) -> None:
    arch = f"tf_efficientnet_{scale}"
    calibration = batch(arch, SMALL, seed=2, images=6)  # few: every size in a few seconds
    module = efficientnet_pytorch_module(
        scale, seed=SIZES.index(scale), image_size=SMALL, calibration=calibration
    )
    path = save_checkpoint(module, "state-dict", tmp_path / "sd.pth")
    loaded = load_checkpoint(path, None, 6)
    # the library's own network and feeding: no padding or mean/std left to guess
    assert (loaded.arch, loaded.warning, loaded.library) == (arch, None, "efficientnet_pytorch")
    theirs, ours = module.state_dict(), loaded.model.state_dict()
    assert len(ours) == len(theirs)
    for key, value in to_geffnet_keys(theirs).items():  # bit for bit
        assert torch.equal(ours[key], value), key
    images = batch(loaded.arch, SMALL)
    with torch.inference_mode():
        expected, got = module(images), loaded.model(images)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # answers that depend on the input
    difference = (got - expected).abs().max().item()
    print(f"\n[efficientnet_pytorch] {scale} as {arch} at {SMALL} px: max |logit difference| "
          f"{difference:.2e} (logits' spread {expected.std().item():.2f})")  # fmt: skip
    assert difference <= TOLERANCE


@pytest.fixture(scope="module")
def b0() -> nn.Module:
    """A calibrated efficientnet_pytorch B0 whose padding is computed for 64 px."""
    return efficientnet_pytorch_module("b0", seed=5, image_size=SMALL)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_of_an_efficientnet_pytorch_checkpoint_loads_as_tf_efficientnet_b0(
    b0: nn.Module, tmp_path: Path, form: str
) -> None:
    path = save_checkpoint(b0, form, tmp_path / "ckpt.pth")
    whole = form in WHOLE_MODULE_FORMS
    loaded = load_checkpoint(path, None, 6, trust=whole)
    assert (loaded.arch, loaded.warning, loaded.user_module) == ("tf_efficientnet_b0", None, whole)
    if whole:
        assert loaded.input_size == SMALL  # its static padding's size
        assert "your efficientnet_pytorch module is tf_efficientnet_b0 (b0 widths and depths, " \
            "TensorFlow 'same' padding, batch-norm eps 0.001)" in loaded.notes  # fmt: skip
    else:
        assert (
            "efficientnet_pytorch keys mapped onto gen-efficientnet's, one to one" in loaded.notes
        )
    if form == "wrapped-module":
        assert "efficientnet_pytorch network at 'model' inside your SeedNet" in loaded.notes[0]
    images = batch(loaded.arch, SMALL)
    with torch.inference_mode():
        assert (loaded.model(images) - b0(images)).abs().max().item() <= TOLERANCE


def test_an_exported_module_is_proven_and_recorded_and_the_worker_serves_it_equal(
    b0: nn.Module, tmp_path: Path, capsys
) -> None:
    checkpoint = save_checkpoint(b0, "module", tmp_path / "seed.pth")
    output = tmp_path / "out" / "model.pt"
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--trust-checkpoint",
            "--runtime", "torchscript"]  # fmt: skip
    assert export_torchscript.main(argv) == 0
    printed = capsys.readouterr().out
    assert "TorchScript model.pt reproduces your module" in printed
    assert (
        "TorchScript model.pt as served (frozen, oneDNN fusion) reproduces your module" in printed
    )
    config = ModelConfig.load(output.parent)
    assert (config.arch, config.input_size, config.padding, config.bn_eps) == (
        "tf_efficientnet_b0", SMALL, TF_SAME, 1e-3,
    )  # fmt: skip
    assert (config.mean, config.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the library's own
    assert config.extra["checkpoint_library"] == "efficientnet_pytorch"
    # the worker's path: decode, normalise, flip TTA, against the user's own module
    images = np.random.default_rng(7).integers(0, 256, (3, SMALL, SMALL, 3), np.uint8)
    runtime_config = dataclasses.replace(config, runtime="torchscript")
    cpu = torch.device("cpu")
    classifier = Classifier(load_runtime_file("torchscript", output, runtime_config, cpu),
                            runtime_config, cpu)  # fmt: skip
    served = np.array([outcome.probabilities for outcome in classifier.classify(list(images))])
    expected = flip_tta_reference(b0, images, IMAGENET_MEAN, IMAGENET_STD)
    assert np.abs(served - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("form", "arch", "refusal"),
    [
        ("module", "efficientnet_b0", "checkpoint does not match efficientnet_b0: its module has "
         "b0 widths and depths, TensorFlow 'same' padding, batch-norm eps 0.001, efficientnet_b0 "
         "has b0 widths and depths, symmetric padding, batch-norm eps 1e-05; tf_efficientnet_b0 "
         "or tf_efficientnet_b0_ap or tf_efficientnet_b0_ns would match"),
        ("dataparallel", "tf_efficientnet_lite0", "checkpoint does not match "
         "tf_efficientnet_lite0: its state dict has b0 widths and depths, TensorFlow 'same' "
         "padding, batch-norm eps 0.001, tf_efficientnet_lite0 has lite0 widths and depths"),
    ],
)  # fmt: skip
def test_a_mismatched_arch_is_refused_naming_the_arch_that_fits(
    b0: nn.Module, tmp_path: Path, form: str, arch: str, refusal: str
) -> None:
    path = save_checkpoint(b0, form, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path, arch, 6, trust=True)
    assert refusal in str(refused.value)
    assert "tf_efficientnet_b0" in str(refused.value).split(";")[-1]
    assert "\n" not in str(refused.value)


def test_what_is_no_whole_efficientnet_pytorch_classifier_is_refused_in_one_line(
    b0: nn.Module, tmp_path: Path
) -> None:
    state = b0.state_dict()
    headless = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # include_top=False
    strange = {**state, "_blocks.3._attention.weight": state["_fc.weight"]}
    for broken, message in ((headless, "has no _fc head"), (strange, "layer '_attention'")):
        path = tmp_path / "broken.pth"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, None, 6)
    two = {f"{net}.{key}": value for net in "ab" for key, value in state.items()}
    torch.save(two, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="holds 2 efficientnet_pytorch networks"):
        load_checkpoint(tmp_path / "two.pth", None, 6)
