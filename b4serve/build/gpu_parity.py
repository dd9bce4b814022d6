"""Parity at export: the model a GPU worker runs against float32 TorchScript on the CPU.

Both sides are the serving code itself, on the exported file: on the CPU the float32 path every
CPU worker runs; on the device the GPU path (weights and inputs in ``gpu_precision``, frozen,
``channels_last``, uint8 batches normalised and flipped on the device, padded to a bucket). The
same ``.npy`` bodies (the check set of b4serve.build.parity) go through both; the export is
refused unless every image keeps its top-1 class and the probabilities agree within the
tolerance of b4serve.build.parity for that precision. Where the precision was not pinned, fp16
is tried first and bf16 when fp16 fails ("as the parity allows").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from b4serve.build.parity import QUANTITY, Agreement, agreement, check_images
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.gpu import DTYPES, DeviceBatches, load_device_torchscript
from b4serve.serving.pipeline import Classifier, Outcome
from b4serve.serving.runtime import load_runtime_file

__all__ = [
    "GpuParity",
    "GpuParityError",
    "ParityMode",
    "check_gpu_parity",
    "measure_gpu_parity",
    "parity_at_export",
]

CPU = torch.device("cpu")
FALLBACK_PRECISIONS = ("fp16", "bf16")  # tried in turn where --gpu-precision was not given

ParityMode = Literal["auto", "require", "off"]


class GpuParityError(ValueError):
    """The GPU model disagrees with float32 on the CPU, or could not be checked as asked."""


@dataclass(frozen=True)
class GpuParity:
    """How the model on ``device`` compared with float32 on the CPU (``found``)."""

    device: str
    found: Agreement  # judged as found.precision: tf32 for fp32 on a GPU
    gpu_precision: str  # the setting it ran with (ModelConfig.gpu_precision)

    def summary(self) -> str:
        found = self.found
        if found.top1_mismatches:
            top1 = f"top-1 differs on images {list(found.top1_mismatches)}"
        else:
            top1 = "same top-1"
        return (
            f"{found.precision} on {self.device} against float32 on the CPU, {found.images} "
            f"images: {top1}, {QUANTITY} {found.max_difference:.2e} "
            f"(tolerance {found.tolerance:g})"
        )


def measure_gpu_parity(
    model_path: str | Path,
    config: ModelConfig,
    device: torch.device,
    images: Sequence[np.ndarray] | None = None,
    *,
    tolerance: float | None = None,
) -> GpuParity:
    """Run ``images`` (default: the check set) through the CPU path and through the GPU path
    on ``device`` in ``config.gpu_precision``, and compare what they answer (``tolerance``:
    instead of the precision's own)."""
    if images is None:
        images = [image for _, image in check_images(config)]
    bodies = [encode_npy(image) for image in images]
    reference = Classifier(load_runtime_file("torchscript", model_path, config, CPU), config, CPU)
    model = load_device_torchscript(model_path, device, config.gpu_precision)
    dtype = DTYPES[config.gpu_precision]
    on_device = Classifier(model, config, device, DeviceBatches(model, config, device, dtype))
    expected = _probabilities(reference.classify(bodies), "the CPU")
    got = _probabilities(on_device.classify(bodies), str(device))
    found = agreement(got, expected, _judged_as(config.gpu_precision, device))
    if tolerance is not None:
        found = dataclasses.replace(found, tolerance=tolerance)
    return GpuParity(_describe(device), found, config.gpu_precision)


def _probabilities(outcomes: list[Outcome], where: str) -> np.ndarray:
    failed = [(i, o.error) for i, o in enumerate(outcomes) if o.error is not None]
    if failed:
        index, error = failed[0]
        raise GpuParityError(f"check image {index} failed on {where}: {error.type}: {error}")
    return np.array([o.probabilities for o in outcomes], dtype=np.float64)


def _judged_as(precision: str, device: torch.device) -> str:
    """fp32 on a GPU runs its convolutions in TF32 where PyTorch allows it (its default)."""
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return "tf32" if precision == "fp32" and tf32 else precision


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def parity_at_export(
    model_path: str | Path,
    config: ModelConfig,
    mode: ParityMode = "auto",
    images: Sequence[np.ndarray] | None = None,
    *,
    precisions: Sequence[str] = (),
) -> GpuParity | None:
    """Check the GPU model as ``mode`` says: ``auto`` when a CUDA device is present, ``require``
    fails without one, ``off`` never. ``precisions``: try each in turn and keep the first that
    passes (default: ``config.gpu_precision`` alone). Returns the passing figures (their
    ``precision`` is the one to serve), or None when not checked; raises
    :class:`GpuParityError` with every precision's figures when none passes."""
    if mode == "off" or not config.optimize or config.runtime != "torchscript":
        return None  # served on the CPU: the runtime choice chose no GPU path for this build
    if not torch.cuda.is_available():
        if mode == "require":
            raise GpuParityError(
                "--gpu-parity require: no CUDA device on this machine; export on the GPU "
                "machine, or pass --gpu-parity auto to skip the check here"
            )
        return None
    device = torch.device("cuda", 0)
    failed: list[GpuParity] = []
    for precision in precisions or (config.gpu_precision,):
        trying = dataclasses.replace(config, gpu_precision=precision)
        parity = measure_gpu_parity(model_path, trying, device, images)
        if parity.found.passed:
            return parity
        failed.append(parity)
    raise _disagrees(failed)


def check_gpu_parity(
    model_path: str | Path,
    config: ModelConfig,
    device: torch.device,
    images: Sequence[np.ndarray] | None = None,
    *,
    tolerance: float | None = None,
) -> GpuParity:
    """:func:`measure_gpu_parity`, raising :class:`GpuParityError` with the figures unless the
    model on ``device`` passes."""
    parity = measure_gpu_parity(model_path, config, device, images, tolerance=tolerance)
    if not parity.found.passed:
        raise _disagrees([parity])
    return parity


def _disagrees(failed: Sequence[GpuParity]) -> GpuParityError:
    figures = "; ".join(parity.summary() for parity in failed)
    return GpuParityError(
        f"the GPU model disagrees with float32 on the CPU: {figures}; export with "
        "--gpu-precision fp32 to serve this model on a GPU in float32"
    )
