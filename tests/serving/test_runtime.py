"""Loading the exported model: freezing, channels_last and oneDNN Graph fusion on the CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS
from b4serve.serving.runtime import OneDnnFused, load_model, load_torchscript

CPU = torch.device("cpu")


class ConvNet(nn.Module):
    """The layer kinds B4 is made of: convolution, batch norm, SiLU, pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runtime") / "model.pt"
    torch.jit.script(ConvNet().eval()).save(str(path))
    return path


def run(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        for _ in range(WARM_UP_CALLS):  # the fused graph is compiled on these
            model(images)
        return model(images)


def test_fused_model_answers_as_the_unfused_one_and_leaves_the_switch_off(scripted) -> None:
    images = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = load_torchscript(scripted, CPU, fuse=True)
    plain = load_torchscript(scripted, CPU, fuse=False)
    assert isinstance(fused, OneDnnFused) and not isinstance(plain, OneDnnFused)
    torch.testing.assert_close(run(fused, images), run(plain, images), atol=1e-5, rtol=1e-4)
    assert not torch.jit.onednn_fusion_enabled()
    # with the switch left on, an unfrozen scripted module would fail ("bad optional access")
    unfrozen = torch.jit.script(ConvNet().eval())
    assert run(unfrozen, images).shape == (2, 6)


def test_baseline_is_the_plain_scripted_module(scripted) -> None:
    model = load_torchscript(scripted, CPU, optimize=False, fuse=True)
    assert isinstance(model, torch.jit.ScriptModule)
    assert hasattr(model, "features")  # not frozen: the submodules are still there


def test_load_model_follows_the_config(scripted, config: ModelConfig) -> None:
    assert isinstance(load_model(scripted, config, CPU), OneDnnFused)
    unfused = dataclasses.replace(config, onednn_fusion=False)
    assert not isinstance(load_model(scripted, unfused, CPU), OneDnnFused)
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        load_model(scripted, dataclasses.replace(config, runtime="tvm"), CPU)
