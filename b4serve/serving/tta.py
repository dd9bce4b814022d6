"""Horizontal-flip test-time augmentation: one forward of 2N images, mean of the two softmaxes."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["flip_batch", "tta_probabilities"]


def flip_batch(batch: torch.Tensor) -> torch.Tensor:
    """``batch`` (NCHW) followed by its horizontal mirror: 2N images, one forward pass."""
    return torch.cat([batch, batch.flip(3)])


def tta_probabilities(
    model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
) -> torch.Tensor:
    """Class probabilities of each image, averaged with those of its mirror image."""
    count = batch.shape[0]
    probabilities = torch.softmax(model(flip_batch(batch)).float(), dim=1)
    return (probabilities[:count] + probabilities[count:]) / 2
