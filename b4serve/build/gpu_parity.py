"""Parity at export: the model a GPU worker runs against float32 TorchScript on the CPU.

Both sides are the serving code itself, on the exported file: on the CPU the float32 path every
CPU worker runs; on the device the GPU path (weights and inputs in ``gpu_precision``, frozen,
``channels_last``, uint8 batches normalised and flipped on the device, padded to a bucket). The
same ``.npy`` bodies go through both; the export is refused unless every image gets the same
top-1 class and no probability moves by more than :data:`PROBABILITY_TOLERANCE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from b4serve.build.onnx_export import check_images
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.gpu import DTYPES, DeviceBatches, load_device_torchscript
from b4serve.serving.pipeline import Classifier, Outcome
from b4serve.serving.runtime import load_runtime_file

__all__ = [
    "PROBABILITY_TOLERANCE",
    "GpuParity",
    "GpuParityError",
    "ParityMode",
    "check_gpu_parity",
    "load_check_images",
    "measure_gpu_parity",
    "parity_at_export",
]

PROBABILITY_TOLERANCE = 1e-2
CPU = torch.device("cpu")

ParityMode = Literal["auto", "require", "off"]


class GpuParityError(ValueError):
    """The GPU model disagrees with float32 on the CPU, or could not be checked as asked."""


@dataclass(frozen=True)
class GpuParity:
    """How the model on ``device`` in ``precision`` compared with float32 on the CPU."""

    device: str
    precision: str
    images: int
    max_difference: float  # max |probability difference| over every image and class
    top1_mismatches: tuple[int, ...]  # indices of the images whose top-1 class differs
    tolerance: float = PROBABILITY_TOLERANCE

    @property
    def passed(self) -> bool:
        return not self.top1_mismatches and self.max_difference <= self.tolerance  # NaN fails

    def summary(self) -> str:
        if self.top1_mismatches:
            top1 = f"top-1 differs on images {list(self.top1_mismatches)}"
        else:
            top1 = "same top-1"
        return (
            f"{self.precision} on {self.device} against float32 on the CPU, {self.images} "
            f"images: {top1}, max |probability difference| {self.max_difference:.2e} "
            f"(tolerance {self.tolerance:g})"
        )


def measure_gpu_parity(
    model_path: str | Path,
    config: ModelConfig,
    device: torch.device,
    images: Sequence[np.ndarray] | None = None,
    *,
    tolerance: float = PROBABILITY_TOLERANCE,
) -> GpuParity:
    """Run ``images`` (default: the export check images) through the CPU path and through the
    GPU path on ``device`` in ``config.gpu_precision``, and compare what they answer."""
    if images is None:
        images = list(check_images(config.input_size))
    bodies = [encode_npy(image) for image in images]
    reference = Classifier(load_runtime_file("torchscript", model_path, config, CPU), config, CPU)
    model = load_device_torchscript(model_path, device, config.gpu_precision)
    dtype = DTYPES[config.gpu_precision]
    on_device = Classifier(model, config, device, DeviceBatches(model, config, device, dtype))
    expected = _probabilities(reference.classify(bodies), "the CPU")
    got = _probabilities(on_device.classify(bodies), str(device))
    difference = float(np.abs(got - expected).max())
    mismatches = tuple(np.flatnonzero(got.argmax(1) != expected.argmax(1)).tolist())
    if math.isnan(difference):
        difference = math.inf  # NaN never passes; inf says so in the summary too
    return GpuParity(
        _describe(device), config.gpu_precision, len(bodies), difference, mismatches, tolerance
    )


def _probabilities(outcomes: list[Outcome], where: str) -> np.ndarray:
    failed = [(i, o.error) for i, o in enumerate(outcomes) if o.error is not None]
    if failed:
        index, error = failed[0]
        raise GpuParityError(f"check image {index} failed on {where}: {error.type}: {error}")
    return np.array([o.probabilities for o in outcomes], dtype=np.float64)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def load_check_images(directory: str | Path) -> list[np.ndarray]:
    """Every ``*.npy`` image in ``directory`` (sorted by name): the user's own check images."""
    paths = sorted(Path(directory).glob("*.npy"))
    if not paths:
        raise GpuParityError(f"no .npy files in {directory} to check the GPU model on")
    return [np.load(path, allow_pickle=False) for path in paths]


def parity_at_export(
    model_path: str | Path,
    config: ModelConfig,
    mode: ParityMode = "auto",
    images: Sequence[np.ndarray] | None = None,
) -> GpuParity | None:
    """Check the GPU model as ``mode`` says: ``auto`` when a CUDA device is present, ``require``
    fails without one, ``off`` never. Returns the passing figures, or None when not checked;
    raises :class:`GpuParityError` with the figures when the GPU model disagrees."""
    if mode == "off" or not config.optimize or config.runtime != "torchscript":
        return None  # GPU workers run these in float32, as the CPU does
    if not torch.cuda.is_available():
        if mode == "require":
            raise GpuParityError(
                "--gpu-parity require: no CUDA device on this machine; export on the GPU "
                "machine, or pass --gpu-parity auto to skip the check here"
            )
        return None
    return check_gpu_parity(model_path, config, torch.device("cuda", 0), images)


def check_gpu_parity(
    model_path: str | Path,
    config: ModelConfig,
    device: torch.device,
    images: Sequence[np.ndarray] | None = None,
    *,
    tolerance: float = PROBABILITY_TOLERANCE,
) -> GpuParity:
    """:func:`measure_gpu_parity`, raising :class:`GpuParityError` with the figures unless the
    model on ``device`` passes."""
    parity = measure_gpu_parity(model_path, config, device, images, tolerance=tolerance)
    if not parity.passed:
        raise GpuParityError(
            f"the GPU model disagrees with float32 on the CPU: {parity.summary()}; export "
            "with --gpu-precision fp32 to serve this model on a GPU in float32"
        )
    return parity
