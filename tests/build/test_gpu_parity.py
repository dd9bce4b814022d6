"""Parity at export between the GPU model and float32 on the CPU, run here with the CPU as the
"device" (bf16): the figures, and the refusals (a top-1 that flips, a probability that moves)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from gpu_fakes import scripted
from small_models import ConvNet
from torch import nn

import export_torchscript
from b4serve.build.gpu_parity import (
    GpuParityError,
    check_gpu_parity,
    measure_gpu_parity,
    parity_at_export,
)
from b4serve.build.models import create_model
from b4serve.build.parity import TOLERANCES, CheckImagesError, check_images
from b4serve.serving.config import ModelConfig

CPU = torch.device("cpu")


class NearTie(nn.Module):
    """Class 1 beats class 0 by 1e-3 at a logit of 256: float32 sees it, bf16 (whose values
    near 256 are 2 apart) rounds both to 256, and its top-1 becomes class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(256.0))
        self.offset = nn.Parameter(torch.tensor([0.0, 1e-3, -9.0, -9.0, -9.0, -9.0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((1, 2, 3))[:, None] * 0.0 + self.level + self.offset


@pytest.fixture
def bf16(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, gpu_precision="bf16")


def test_half_precision_passes_with_its_figures(tmp_path, config) -> None:
    assert config.gpu_precision == "fp16"  # the default
    path = scripted(tmp_path / "model.pt")
    parity = check_gpu_parity(path, config, CPU)
    images = len(check_images(config))  # the one check set, as every parity check uses
    found = parity.found
    assert found.passed and found.images == images and found.tolerance == TOLERANCES["fp16"]
    assert found.max_difference <= TOLERANCES["fp16"] and found.top1_mismatches == ()
    assert parity.summary().startswith(
        f"fp16 on cpu against float32 on the CPU, {images} images: same"
    )
    # it did run in fp16: float32 on the same path differs from the CPU's by rounding alone
    full = measure_gpu_parity(path, dataclasses.replace(config, gpu_precision="fp32"), CPU)
    assert parity.found.max_difference > 10 * full.found.max_difference


def test_a_top1_that_flips_in_half_precision_is_refused_with_the_figures(tmp_path, bf16):
    path = scripted(tmp_path / "model.pt", NearTie())
    parity = measure_gpu_parity(path, bf16, CPU)
    assert parity.found.top1_mismatches == tuple(range(len(check_images(bf16))))
    assert not parity.found.passed
    assert parity.found.max_difference < TOLERANCES["bf16"]  # refused for the top-1 alone
    with pytest.raises(GpuParityError) as refused:
        check_gpu_parity(path, bf16, CPU)
    message = str(refused.value)
    assert "top-1 differs on images [0, 1, 2" in message
    assert f"max |probability difference| {parity.found.max_difference:.2e}" in message
    assert "--gpu-precision fp32" in message


def test_a_probability_that_moves_past_the_tolerance_is_refused(tmp_path, bf16) -> None:
    path = scripted(tmp_path / "model.pt")
    with pytest.raises(GpuParityError, match=r"same top-1, max \|probability difference\| "
                                             r"\S+ \(tolerance 1e-07\)"):  # fmt: skip
        check_gpu_parity(path, bf16, CPU, tolerance=1e-7)


def test_the_users_own_check_images_are_used(tmp_path, bf16, rng) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        np.save(folder / f"{index}.npy", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    images = [image for _, image in check_images(bf16, folder)]
    assert len(images) == 3
    parity = check_gpu_parity(scripted(tmp_path / "model.pt"), bf16, CPU, images)
    assert parity.found.images == 3
    with pytest.raises(CheckImagesError, match=r"no \.npy files there"):
        check_images(bf16, tmp_path / "model.pt.d")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_parity_is_skipped_or_refused_as_asked(tmp_path, config) -> None:
    path = scripted(tmp_path / "model.pt")
    assert parity_at_export(path, config, "auto") is None
    assert parity_at_export(path, config, "off") is None
    with pytest.raises(GpuParityError, match="no CUDA device on this machine; export on the GPU"):
        parity_at_export(path, config, "require")
    baseline = dataclasses.replace(config, optimize=False)  # GPU workers run it in float32
    assert parity_at_export(path, baseline, "require") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_export_writes_the_gpu_settings_and_says_parity_was_not_checked(tmp_path, capsys):
    checkpoint = tmp_path / "b0.pth"
    torch.save(create_model("efficientnet_b0", 6).state_dict(), checkpoint)
    output = tmp_path / "out" / "model.pt"
    argv = ["--checkpoint", str(checkpoint), "--arch", "efficientnet_b0", "--output",
            str(output), "--gpu-precision", "bf16", "--gpu-buckets", "1,4,16",
            "--runtime", "torchscript"]  # the CPU runtime is not what this tests  # fmt: skip
    assert export_torchscript.main(argv) == 0
    config = ModelConfig.load(output.parent)
    assert (config.gpu_precision, config.gpu_buckets) == ("bf16", (1, 4, 16))
    assert "gpu_parity" not in config.extra
    assert "GPU parity not checked: no CUDA device here (a GPU worker runs this model in bf16" in (
        capsys.readouterr().out
    )
    meta = json.loads((output.parent / "model_meta.json").read_text())
    assert meta["gpu_buckets"] == [1, 4, 16]
    assert export_torchscript.main([*argv, "--gpu-buckets", "4,2"]) == 1
    assert "gpu_buckets must be increasing" in capsys.readouterr().err


def test_convnet_fixture_is_not_trivially_flip_invariant(config) -> None:
    # parity would prove little if the mirror gave the same logits
    images = torch.rand(2, 3, config.input_size, config.input_size)
    with torch.inference_mode():
        model = ConvNet()
        assert (model(images) - model(images.flip(3))).abs().max() > 1e-3
