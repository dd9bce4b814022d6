"""The one parity: its table, its check set, its judgement; the export proof holds any callable
to the reference's TTA probabilities, and a failed proof leaves no model file behind."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from b4serve.build.parity import (
    TOLERANCES,
    CheckImagesError,
    ParityError,
    ParityProbe,
    agreement,
    check_images,
    probe_batch,
    probe_images,
    prove_exported_files,
    tolerance,
)
from b4serve.serving.config import ModelConfig


class Pooled(torch.nn.Module):
    """A tiny 'classifier': per-channel means, as logits."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def even(images: torch.Tensor) -> torch.Tensor:
    """Two classes at probability 1/2 each, whatever the image."""
    return torch.zeros(len(images), 2)


def shifted(by: float):
    """Probabilities 1/2 + by and 1/2 - by: ``by`` off :func:`even`'s, exactly."""
    return lambda images: torch.log(torch.tensor([0.5 + by, 0.5 - by])).expand(len(images), 2)


def test_a_model_within_tolerance_passes_and_its_difference_is_reported(
    config: ModelConfig,
) -> None:
    probe = ParityProbe.of(even, config, against="the reference")
    assert probe.batch.shape == (2, 3, 32, 32)
    assert probe.prove(even, "itself") == 0.0
    half = TOLERANCES["fp32"] / 2
    assert probe.prove(shifted(half), "nearly") == pytest.approx(half, rel=1e-2)
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
    [(shifted(2e-4), "by 0.0002"), (lambda images: torch.full((len(images), 2), math.nan),
     "by inf"), (lambda images: torch.zeros(len(images), 4), "by inf")],
    ids=["over", "nan", "wrong-shape"],
)  # fmt: skip
def test_a_model_that_differs_is_refused_saying_by_how_much(config, model, shown: str) -> None:
    probe = ParityProbe.of(even, config, against="your module", hint="try X")
    with pytest.raises(ParityError) as refused:
        probe.prove(model, "TorchScript model.pt")
    assert str(refused.value) == (
        f"TorchScript model.pt differs from your module {shown} (max |probability difference| "
        "with flip TTA on 2 probe images, tolerance 0.0001); try X"
    )


def test_every_call_is_held_to_the_tolerance(config: ModelConfig) -> None:
    shifts = iter([0.0] * 4 + [1e-3] * 2)  # a JIT that goes wrong once it has compiled
    probe = ParityProbe.of(even, config, against="x")
    with pytest.raises(ParityError, match=r"by 0\.001"):
        probe.prove(lambda images: shifted(next(shifts))(images), "late", calls=3)


def test_a_failed_proof_removes_the_files_it_was_given(config: ModelConfig, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(Pooled()).save(str(path))
    plain = dataclasses.replace(config, optimize=False)  # the plain file alone
    proven = prove_exported_files(ParityProbe.of(Pooled(), config, against="x"), plain, path)
    assert proven == [("TorchScript model.pt", 0.0)] and path.is_file()
    other = ParityProbe.of(lambda images: Pooled()(images) + torch.tensor([2.0, 0, 0]), config,
                           against="x")  # fmt: skip
    with pytest.raises(ParityError, match=r"TorchScript model\.pt differs from x by 0\.[1-9]"):
        prove_exported_files(other, plain, path)
    assert not path.exists()


class Offset(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) + torch.tensor([0.01, 0.0, 0.0])


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


def test_one_table_of_tolerances_per_precision() -> None:
    assert TOLERANCES == {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 2e-2}
    assert tolerance("bf16") == 2e-2 and tolerance("bf16", reduced=5e-2) == 5e-2
    assert tolerance("fp32", reduced=5e-2) == 1e-4  # the user's bf16 tolerance is bf16's alone


def test_agreement_judges_each_precision_by_the_table() -> None:
    expected = torch.tensor([[0.7, 0.3], [0.495, 0.505]])
    within = torch.tensor([[0.70005, 0.29995], [0.495, 0.505]])
    assert agreement(within, expected, "fp32").passed
    over = agreement(torch.tensor([[0.7002, 0.2998], [0.495, 0.505]]), expected, "fp32")
    assert not over.passed and "is over 0.0001 (fp32)" in over.failure()
    tie = torch.tensor([[0.69, 0.31], [0.505, 0.495]])  # 1e-2 off, the near tie flips
    flipped = agreement(tie, expected, "bf16")
    assert flipped.top1_mismatches == (1,) and not flipped.passed
    assert flipped.failure() == (
        "top-1 differs on 1 of 2 check images (bf16: every one must keep it)"
    )
    assert agreement(tie, expected, "bf16").max_difference == pytest.approx(1e-2)
    # fp32 is held to its tolerance alone: a top-1 flip within 1e-4 is a tie, not an error
    near = torch.tensor([[0.7, 0.3], [0.50001, 0.49999]])
    assert agreement(near, torch.tensor([[0.7, 0.3], [0.49999, 0.50001]]), "fp32").passed
    nan = agreement(torch.tensor([[math.nan, 0.3], [0.5, 0.5]]), expected, "fp16")
    assert nan.max_difference == math.inf and not nan.passed
    assert agreement(torch.zeros(2, 3), expected, "fp32").max_difference == math.inf


def test_one_check_set_the_demo_examples_the_probes_and_varied_inputs(config) -> None:
    found = check_images(config)
    names = [name for name, _ in found]
    assert names[:6] == [f"demo demo_{c}_blob" for c in
                         ("red", "green", "blue", "yellow", "cyan", "magenta")]  # fmt: skip
    assert names[6:8] == ["probe 1", "probe 2"]  # the export proof's images are in it too
    assert torch.equal(torch.from_numpy(found[6][1]), probe_images(config.input_size)[0])
    assert {"black", "white", "noise", "gradient", "small float, resized"} <= set(names[8:])


def test_the_users_own_images_make_the_check_set(config, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("b.npy", "a.npy"):
        np.save(tmp_path / name, rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    found = check_images(config, tmp_path)
    assert [name for name, _ in found] == ["a.npy", "b.npy"]
    np.save(tmp_path / "c.npy", np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(
        CheckImagesError, match=r"the server would refuse .*c\.npy: expected 1, 3 or 4 channels"
    ):
        check_images(config, tmp_path)
    with pytest.raises(CheckImagesError, match=r"no \.npy files"):
        check_images(config, tmp_path / "empty")
