"""Shared fixtures: a small model config and a deterministic toy model for in-process tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from b4serve.serving.config import ModelConfig

CLASS_NAMES = ("a", "b", "c", "d", "e", "f")


@pytest.fixture(scope="session", autouse=True)
def shared_sandbox_builds(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The session's test servers share their builds (b4serve.lab.sandbox.server_env): each
    distinct build is exported once per session, never reused from an earlier one."""
    os.environ.setdefault("B4_SANDBOX_BUILDS", str(tmp_path_factory.mktemp("builds")))


@pytest.fixture
def config() -> ModelConfig:
    """A config with a small input size so pure-function tests run in milliseconds."""
    return ModelConfig(
        arch="efficientnet_b4",
        num_classes=6,
        input_size=32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        class_names=CLASS_NAMES,
        max_pixels=256 * 256,
    )


class ToyModel(torch.nn.Module):
    """Logits that depend on position, so a flip changes them (TTA has something to average)."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(num_classes, 3 * 32 * 32, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight.T / 100


@pytest.fixture
def toy_model() -> ToyModel:
    return ToyModel().eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
