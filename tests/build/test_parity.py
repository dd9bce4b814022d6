"""The parity proof: any callable is held to the reference's logits, and a failed proof leaves
no model file behind."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from b4serve.build.parity import (
    LOGIT_TOLERANCE,
    ParityError,
    ParityProbe,
    probe_batch,
    probe_images,
    prove_exported_files,
)
from b4serve.serving.config import ModelConfig


class Pooled(torch.nn.Module):
    """A tiny 'classifier': per-channel means, as logits."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def shifted(by: float):
    return lambda images: Pooled()(images) + by


def test_a_model_within_tolerance_passes_and_its_difference_is_reported(
    config: ModelConfig,
) -> None:
    probe = ParityProbe.of(Pooled(), config, against="the reference")
    assert probe.batch.shape == (2, 3, 32, 32)
    assert probe.prove(Pooled(), "itself") == 0.0
    assert probe.prove(shifted(LOGIT_TOLERANCE / 2), "nearly") == pytest.approx(5e-5, rel=1e-3)
    # fixed: two probes see the same images
    assert torch.equal(ParityProbe.of(Pooled(), config, against="x").batch, probe.batch)


def test_the_probe_is_fixed_images_normalised_as_the_variant_says() -> None:
    images = probe_images(40)
    assert images.dtype == torch.uint8 and images.shape == (2, 40, 40, 3)
    assert torch.equal(images, probe_images(40))
    assert images.float().std() > 30  # not a flat image: regions, edges and texture
    inception = probe_batch(40, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(inception, images.permute(0, 3, 1, 2).float() / 127.5 - 1)


@pytest.mark.parametrize(
    ("model", "shown"),
    [(shifted(2e-4), "by 0.0002"), (shifted(math.nan), "by nan"),
     (lambda images: torch.zeros(2, 4), "by inf")],
    ids=["over", "nan", "wrong-shape"],
)  # fmt: skip
def test_a_model_that_differs_is_refused_saying_by_how_much(config, model, shown: str) -> None:
    probe = ParityProbe.of(Pooled(), config, against="your module", hint="try X")
    with pytest.raises(ParityError) as refused:
        probe.prove(model, "TorchScript model.pt")
    assert str(refused.value) == (
        f"TorchScript model.pt differs from your module {shown} (max |logit difference| on 2 "
        "probe images, tolerance 0.0001); try X"
    )


def test_every_call_is_held_to_the_tolerance(config: ModelConfig) -> None:
    calls = iter([0.0, 0.0, 1e-3])  # a JIT that goes wrong once it has compiled
    probe = ParityProbe.of(Pooled(), config, against="x")
    with pytest.raises(ParityError, match=r"by 0\.001"):
        probe.prove(lambda images: Pooled()(images) + next(calls), "late", calls=3)


def test_a_failed_proof_removes_the_files_it_was_given(config: ModelConfig, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(Pooled()).save(str(path))
    plain = dataclasses.replace(config, optimize=False)  # the plain file alone
    proven = prove_exported_files(ParityProbe.of(Pooled(), config, against="x"), plain, path)
    assert proven == [("TorchScript model.pt", 0.0)] and path.is_file()
    with pytest.raises(ParityError, match=r"TorchScript model\.pt differs from x by 1"):
        prove_exported_files(ParityProbe.of(shifted(1.0), config, against="x"), plain, path)
    assert not path.exists()


class Offset(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) + 1e-3


def test_a_runtime_that_fails_after_the_file_passed_is_blamed_not_the_module(
    config: ModelConfig, tmp_path: Path
) -> None:
    scripted, onnx = tmp_path / "model.pt", tmp_path / "model.onnx"
    torch.jit.script(Pooled()).save(str(scripted))
    example = torch.zeros(2, 3, 32, 32)  # the probe's shape
    torch.onnx.export(Offset(), (example,), str(onnx), input_names=["images"], dynamo=False)
    probe = ParityProbe.of(Pooled(), config, against="your module", hint="the module's fault")
    with pytest.raises(ParityError) as refused:
        prove_exported_files(probe, dataclasses.replace(config, runtime="onnxruntime"), scripted,
                             onnx)  # fmt: skip
    assert str(refused.value).startswith("ONNX Runtime model.onnx differs from your module by ")
    assert str(refused.value).endswith(
        "; TorchScript model.pt matches, so this runtime's float32 arithmetic is what differs: "
        "serve it with --runtime torchscript"
    )
    assert list(tmp_path.iterdir()) == []
