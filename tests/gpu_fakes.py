"""Fakes for the GPU path's tests: models that fail like a GPU, a recorder, and request bodies.

The network they wrap is the tests' one ConvNet (tests/small_models.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from small_models import ConvNet
from torch import nn

from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig

# What the CUDA caching allocator says when a batch does not fit.
CUDA_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB "
    "of which 1.06 GiB is free."
)


class OutOfMemoryInScript(nn.Module):
    """Fails as a CUDA out-of-memory error does inside a TorchScript forward (the interpreter
    re-raises it as a RuntimeError quoting the message) for more than ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = ConvNet()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (in TorchScript)")
        return self.net(images)


class RunsOutOfMemory:
    """Wraps a model; its next ``failures`` calls raise ``torch.cuda.OutOfMemoryError``."""

    def __init__(self, model: nn.Module, failures: int = 1) -> None:
        self.model = model
        self.failures = failures
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise torch.cuda.OutOfMemoryError(CUDA_OOM_MESSAGE)
        return self.model(images)


class Recording(nn.Module):
    """Wraps a model and records the shape and dtype of every batch it is given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[tuple[tuple[int, ...], torch.dtype, bool]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        channels_last = images.is_contiguous(memory_format=torch.channels_last)
        self.batches.append((tuple(images.shape), images.dtype, channels_last))
        return self.model(images.float())

    @property
    def sizes(self) -> list[int]:
        return [shape[0] for shape, _, _ in self.batches]


def scripted(path: Path, model: nn.Module | None = None) -> Path:
    """``model`` (default: a :class:`ConvNet`) scripted and saved at ``path``."""
    torch.jit.script((model or ConvNet()).eval()).save(str(path))
    return path


def mixed_bodies(rng: np.random.Generator, size: int) -> list[bytes]:
    """``.npy`` bodies of every kind the decoder accepts, at and off the input size."""
    images = [
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (size + 9, size - 5, 3), dtype=np.uint8),  # resized
        rng.random((size, size, 3), dtype=np.float32),  # floats in [0, 1]
        rng.random((size * 2, size * 2, 3)),  # float64, downscaled
        rng.integers(0, 256, (size, size), dtype=np.uint8),  # grey
        rng.integers(0, 256, (size, size, 4), dtype=np.uint8),  # RGBA
        rng.random((size, size, 1)).astype(">f4"),  # big-endian grey
        np.asfortranarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
    ]
    return [encode_npy(image) for image in images]


def uint8_bodies(rng: np.random.Generator, size: int, count: int) -> list[bytes]:
    return [encode_npy(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def with_buckets(config: ModelConfig, *buckets: int, **changes: object) -> ModelConfig:
    return dataclasses.replace(config, gpu_buckets=tuple(buckets), **changes)
