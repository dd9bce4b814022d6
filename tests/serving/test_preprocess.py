"""Preprocessor: channel handling, value checks, resize only when needed, exact normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import InvalidInput
from b4serve.serving.preprocess import Preprocessor, stack_channels_last


def reference(rgb01: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """Normalisation written the textbook way, HxWx3."""
    mean, std = torch.tensor(config.mean), torch.tensor(config.std)
    return (torch.from_numpy(rgb01.astype(np.float32)) - mean) / std


def test_uint8_rgb_is_scaled_and_normalised(config: ModelConfig, rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = Preprocessor(config)(image)
    assert out.shape == (32, 32, 3)
    torch.testing.assert_close(out, reference(image / 255.0, config), atol=1e-5, rtol=0)


def test_float_input_in_unit_range_matches_uint8_path(config: ModelConfig, rng) -> None:
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    preprocess = Preprocessor(config)
    for dtype in (np.float32, np.float64):
        torch.testing.assert_close(
            preprocess((image / 255.0).astype(dtype)), preprocess(image), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1)])
def test_grey_is_replicated_to_three_channels(config: ModelConfig, shape, rng) -> None:
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    out = Preprocessor(config)(grey)
    plane = grey.reshape(32, 32)
    expected = reference(np.repeat(plane[:, :, None], 3, axis=2) / 255.0, config)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_rgba_drops_alpha(config: ModelConfig, rng) -> None:
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    preprocess = Preprocessor(config)
    torch.testing.assert_close(preprocess(rgba), preprocess(np.ascontiguousarray(rgba[:, :, :3])))


def test_big_endian_and_fortran_arrays_give_the_same_tensor(config: ModelConfig, rng) -> None:
    image = rng.random((32, 32, 3))
    preprocess = Preprocessor(config)
    expected = preprocess(image)
    torch.testing.assert_close(preprocess(image.astype(">f8")), expected)
    torch.testing.assert_close(preprocess(np.asfortranarray(image)), expected)


def test_resizes_only_when_needed_with_bilinear(config: ModelConfig, rng) -> None:
    preprocess = Preprocessor(config)
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(
        preprocess(exact), reference(exact / 255.0, config), atol=1e-5, rtol=0
    )
    large = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    out = preprocess(large)
    assert out.shape == (32, 32, 3)
    nchw = torch.from_numpy(large / 255.0).float().permute(2, 0, 1)[None]
    resized = F.interpolate(nchw, size=(32, 32), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(
        out, reference(resized.permute(1, 2, 0).numpy(), config), atol=1e-4, rtol=0
    )


def test_constant_image_stays_constant_after_resize(config: ModelConfig) -> None:
    out = Preprocessor(config)(np.full((100, 70, 3), 0.5, dtype=np.float32))
    expected = reference(np.full((32, 32, 3), 0.5), config)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("value", "words"),
    [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]")],
)
def test_bad_float_values_are_refused(config: ModelConfig, value: float, words: str) -> None:
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    image[3, 4, 1] = value
    with pytest.raises(InvalidInput, match=words):
        Preprocessor(config)(image)


def test_stacked_batch_is_nchw_with_channels_last_memory(config: ModelConfig, rng) -> None:
    preprocess = Preprocessor(config)
    images = [preprocess(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    batch = stack_channels_last(images)
    assert batch.shape == (3, 3, 32, 32)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch[1], images[1].permute(2, 0, 1))
