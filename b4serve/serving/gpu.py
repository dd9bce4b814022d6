"""The GPU data path: frozen half-precision TorchScript, one pinned copy, whole-batch forwards.

On a GPU each ``.npy`` body is still decoded and checked on the CPU (:mod:`b4serve.serving.codec`,
:func:`b4serve.serving.preprocess.validated_rgb`), and nothing more is done to it there: the
batch's pixels are copied to the device once, from pinned host memory, as uint8 when every image
is uint8 at the model's input size (a quarter of the bytes of float32), and normalised and
flipped on the device. The whole server batch runs in one forward, padded up to the next bucket
size (``ModelConfig.gpu_buckets``), so that warm-up compiles and autotunes every shape a worker
will ever run; the probabilities come back to the host as float32.

Nothing here needs a GPU: on the CPU the staging buffer is ordinary memory and the device is the
CPU, which is how the tests run this path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import OutOfMemory
from b4serve.serving.preprocess import resize_hwc, validated_rgb
from b4serve.serving.telemetry import BatchStats
from b4serve.serving.tta import tta_probabilities

__all__ = [
    "DTYPES",
    "DeviceBatches",
    "forward_sizes",
    "load_device_torchscript",
    "model_dtype",
    "out_of_memory",
    "plan_forwards",
    "release_device_memory",
]

log = logging.getLogger(__name__)

# ModelConfig.gpu_precision -> the dtype of weights and inputs
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# What running out of device memory says: torch.OutOfMemoryError from eager code; inside a
# TorchScript forward the interpreter re-raises it as a RuntimeError (or torch.jit.Error)
# quoting the message. cuDNN and cuBLAS report a failed workspace allocation in their own words.
_OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)

_STAGING_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}

Model = Callable[[torch.Tensor], torch.Tensor]


def model_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the model runs in on ``device``: ``config.gpu_precision`` for optimised
    TorchScript on a GPU, float32 everywhere else (CPU, the seed's baseline, ONNX Runtime)."""
    if device.type == "cuda" and config.optimize and config.runtime == "torchscript":
        return DTYPES[config.gpu_precision]
    return torch.float32


def load_device_torchscript(
    path: str | Path, device: torch.device, precision: str
) -> torch.jit.ScriptModule:
    """``path`` on ``device`` with its weights in ``precision``, ``channels_last`` and frozen.

    The weights are converted before freezing, so the batch norms are folded into the
    convolutions in ``precision``; export checks the result against float32 on the CPU
    (:mod:`b4serve.build.gpu_parity`). On a GPU this also turns on cuDNN's autotuning.
    """
    model = torch.jit.load(str(path), map_location=device).eval()
    model = model.to(dtype=DTYPES[precision], memory_format=torch.channels_last)
    frozen = torch.jit.freeze(model)
    if device.type == "cuda":
        # Process-wide, and the worker process is this model's: it runs only the bucket sizes,
        # so each convolution's fastest algorithm is measured once per size, at warm-up.
        torch.backends.cudnn.benchmark = True
    return frozen


def forward_sizes(buckets: Sequence[int], micro_batch: int = 0) -> tuple[int, ...]:
    """The sizes forwards are padded to: ``buckets``, capped at ``micro_batch`` if one is set."""
    if micro_batch > 0:
        return tuple(sorted({min(size, micro_batch) for size in buckets}))
    return tuple(buckets)


def plan_forwards(count: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(images, padded size)`` of each forward for ``count`` images: forwards of the largest
    size while they fill, then the rest padded up to the smallest size that holds it."""
    largest = sizes[-1]
    plan = [(largest, largest)] * (count // largest)
    rest = count % largest
    if rest:
        plan.append((rest, next(size for size in sizes if size >= rest)))
    return plan


class DeviceBatches:
    """Stages, normalises, flips and classifies decoded images on ``device``, by bucket."""

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype or model_dtype(config, device)
        self.size = config.input_size
        self.sizes = forward_sizes(config.gpu_buckets, config.micro_batch)
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (pixel / 255 - mean) / std == pixel * gain + bias, pixels on the 0..255 scale
        self.gain = (1.0 / (255.0 * std)).to(device)
        self.bias = (-mean / std).to(device)
        self.pinned = device.type == "cuda"  # page-locked host memory needs a GPU to exist
        self._staging: dict[np.dtype, torch.Tensor] = {}

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """A decoded image checked and ready to stage: uint8 at the input size as it came (a
        view, not a copy); anything else float32 on the 0..255 scale, resized on the CPU."""
        rgb = validated_rgb(array)
        native = rgb.shape[:2] == (self.size, self.size)
        if rgb.dtype == np.uint8 and native:
            return rgb
        image = rgb.astype(np.float32)
        if rgb.dtype != np.uint8:
            image *= 255.0  # float images hold [0, 1]
        if not native:  # resizing is linear: the same as resizing after normalising
            image = resize_hwc(torch.from_numpy(image), self.size).numpy()
        return image

    def stage(self, images: Sequence[np.ndarray], padded: int) -> torch.Tensor:
        """``images`` copied into the host staging buffer (NHWC), ``padded`` slots long.

        The slots past ``images`` keep what an earlier batch left (zeros at first): the model
        runs each image on its own, and their answers are dropped.
        """
        kind = np.uint8 if all(image.dtype == np.uint8 for image in images) else np.float32
        buffer = self._buffer(np.dtype(kind))
        for slot, image in zip(buffer.numpy(), images, strict=False):
            np.copyto(slot, image)
        return buffer[:padded]

    def _buffer(self, dtype: np.dtype) -> torch.Tensor:
        buffer = self._staging.get(dtype)
        if buffer is None:  # one per pixel type, as large as the largest forward, kept
            shape = (self.sizes[-1], self.size, self.size, 3)
            buffer = torch.zeros(shape, dtype=_STAGING_DTYPES[dtype], pin_memory=self.pinned)
            self._staging[dtype] = buffer
        return buffer

    def normalised(self, staged: torch.Tensor) -> torch.Tensor:
        """Staged NHWC pixels as a normalised NCHW batch (``channels_last`` memory) on the
        device, in the model's dtype: one copy to the device; the arithmetic runs there."""
        # Asynchronous from pinned memory; the buffer is refilled only after forward() has
        # brought the answers back, which waits for everything queued before, this copy too.
        pixels = staged.to(self.device, non_blocking=self.pinned)
        nchw = pixels.permute(0, 3, 1, 2)  # a view: the memory stays NHWC
        return torch.addcmul(self.bias, nchw.float(), self.gain).to(self.dtype)

    def forward(self, images: Sequence[np.ndarray], padded: int) -> torch.Tensor:
        """TTA probabilities (float32, on the host) of ``images``, run as one forward of
        ``padded`` images and their mirrors."""
        batch = self.normalised(self.stage(images, padded))
        return tta_probabilities(self.model, batch)[: len(images)].cpu()

    def predict(
        self, images: Sequence[np.ndarray], stats: BatchStats | None = None
    ) -> torch.Tensor:
        """TTA probabilities (N x classes) of ``images`` (from :meth:`pixels`), by bucket.

        Each forward's image count and time (staging and both copies included) is added to
        ``stats`` when given.
        """
        rows = []
        start = 0
        for count, padded in plan_forwards(len(images), self.sizes):
            started = time.perf_counter()
            rows.append(self.forward(images[start : start + count], padded))
            start += count
            if stats is not None:
                stats.forwards.append((count, time.perf_counter() - started))
        return torch.cat(rows)

    def warm_up(self, calls: int) -> None:
        """``calls`` forwards at every bucket size: the JIT profiles and compiles, and cuDNN
        picks its algorithms, for each shape before the first request."""
        blank = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        for size in self.sizes:
            for _ in range(calls):
                self.forward([blank] * size, size)
        log.info(
            "warmed up %s on %s at forward sizes %s (each image also runs mirrored)",
            self.dtype, self.device, list(self.sizes),
        )  # fmt: skip


def out_of_memory(error: BaseException, images: int) -> OutOfMemory | None:
    """The 507 each request of a batch of ``images`` gets when its forward failed with
    ``error`` because the device ran out of memory; None for any other error."""
    text = str(error)
    if not isinstance(error, torch.cuda.OutOfMemoryError) and not any(
        marker in text for marker in _OUT_OF_MEMORY_MARKERS
    ):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next(
        (line for line in lines if any(marker in line for marker in _OUT_OF_MEMORY_MARKERS)),
        lines[0] if lines else type(error).__name__,
    )
    return OutOfMemory(
        f"the GPU ran out of memory running the batch of {images} images this request was in "
        f"({detail[:200]}); the worker freed its cached memory and goes on serving: retry, or "
        "register the model with a smaller batch_size"
    )


def release_device_memory(device: torch.device) -> None:
    """Give the memory the caching allocator holds back to the device after a failed batch."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
