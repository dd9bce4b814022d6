"""TTA: one forward of 2N images; the answer is the mean of the two softmaxes."""

from __future__ import annotations

import torch

from b4serve.serving.tta import flip_batch, tta_probabilities


def test_flip_batch_appends_the_mirrored_images() -> None:
    batch = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    doubled = flip_batch(batch)
    assert doubled.shape == (4, 3, 2, 4)
    torch.testing.assert_close(doubled[:2], batch)
    torch.testing.assert_close(doubled[2:], batch.flip(-1))
    assert doubled[2, 0, 0, 0] == batch[0, 0, 0, 3]


def test_tta_equals_mean_of_the_two_softmaxes(toy_model) -> None:
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = tta_probabilities(toy_model, batch)
        plain = torch.softmax(toy_model(batch), dim=1)
        mirrored = torch.softmax(toy_model(batch.flip(3)), dim=1)
    torch.testing.assert_close(got, (plain + mirrored) / 2)
    assert not torch.allclose(plain, mirrored)  # the toy model does see the flip
    torch.testing.assert_close(got.sum(dim=1), torch.ones(3))


def test_model_is_called_once_with_both_halves(toy_model) -> None:
    calls: list[int] = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return toy_model(images)

    with torch.inference_mode():
        tta_probabilities(counting, torch.zeros(5, 3, 32, 32))
    assert calls == [10]


def test_mirror_symmetric_image_gets_its_plain_softmax(toy_model) -> None:
    half = torch.randn(1, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    symmetric = torch.cat([half, half.flip(3)], dim=3)
    with torch.inference_mode():
        torch.testing.assert_close(
            tta_probabilities(toy_model, symmetric), torch.softmax(toy_model(symmetric), dim=1)
        )
