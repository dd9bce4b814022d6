"""ndarray -> normalised tensor at the model's input size; checks what the codec cannot."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import InvalidInput

__all__ = ["Preprocessor", "resize_hwc", "stack_channels_last", "validated_rgb"]


class Preprocessor:
    """Turns decoded arrays into normalised HxWx3 float32 tensors for one model config.

    Built once per worker: the normalisation constants are computed here, not per request.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.size = config.input_size
        mean = torch.tensor(config.mean, dtype=torch.float32)
        std = torch.tensor(config.std, dtype=torch.float32)
        # (x / scale - mean) / std == x * gain + bias, one fused pass per image
        self._gain = {np.uint8: 1.0 / (255.0 * std), np.floating: 1.0 / std}
        self._bias = -mean / std

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        """Validate ``array`` (HxW or HxWxC, uint8 or float in [0, 1]) and return HxWx3."""
        rgb = validated_rgb(array)
        gain = self._gain[np.uint8] if rgb.dtype == np.uint8 else self._gain[np.floating]
        image = torch.from_numpy(rgb.astype(np.float32, order="C"))  # the one copy we need
        if image.shape[:2] != (self.size, self.size):
            image = resize_hwc(image, self.size)
        return image.mul_(gain).add_(self._bias)


def stack_channels_last(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack HxWx3 tensors into an NCHW batch whose memory is NHWC (``channels_last``)."""
    return torch.stack(images).permute(0, 3, 1, 2)


def validated_rgb(array: np.ndarray) -> np.ndarray:
    """``array`` (HxW or HxWxC, uint8 or float in [0, 1]) as HxWx3 in native byte order, a view
    where possible; raises :class:`InvalidInput` for any other shape or float values."""
    rgb = _to_rgb(array)
    if rgb.dtype != np.uint8:
        _check_unit_range(rgb)
    return rgb


def _to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InvalidInput(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.shape[2] == 1:
        return np.broadcast_to(array, (*array.shape[:2], 3))
    return array[:, :, :3]  # RGBA: alpha dropped


def _check_unit_range(array: np.ndarray) -> None:
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InvalidInput("float image contains NaN or Inf")
    if low < 0.0 or high > 1.0:
        raise InvalidInput(
            f"float images must hold values in [0, 1]; got min {low:.4g}, max {high:.4g} "
            "(send uint8 for 0-255 data)"
        )


def resize_hwc(image: torch.Tensor, size: int) -> torch.Tensor:
    """A float HxWxC image resized to ``size`` x ``size`` (bilinear, antialiased)."""
    nchw = image.permute(2, 0, 1).unsqueeze(0)
    # antialias keeps downscaling close to PIL's bilinear resize
    resized = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True)
    return resized.squeeze(0).permute(1, 2, 0)
