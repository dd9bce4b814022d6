"""The GPU path on a real CUDA device: half-precision loading, pinned staging, answers against
the CPU path, parity, and a real out-of-memory error. Skipped without a GPU (CI never has one);
scripts/gpu_check.sh runs them on the GPU machine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gpu_fakes import mixed_bodies, scripted, uint8_bodies, with_buckets
from small_models import ConvNet
from torch import nn

from b4serve.build.gpu_parity import check_gpu_parity
from b4serve.serving.gpu import DTYPES
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import load_runtime_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU, and there is none here: scripts/gpu_check.sh runs these on "
        "the GPU machine",
    ),
]

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


class HungryInScript(nn.Module):
    """Asks the device for a terabyte inside its TorchScript forward beyond ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = ConvNet()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(images)
        if images.shape[0] > self.limit:
            hoard = torch.empty([1 << 40], dtype=torch.uint8, device=images.device)
            logits = logits + hoard[:1].float() * 0.0
        return logits


@pytest.fixture
def model_path(tmp_path):
    return scripted(tmp_path / "model.pt")


def fill_device(leave_mib: tuple[int, ...]) -> torch.Tensor:
    """One tensor taking all free device memory but the first of ``leave_mib`` that the
    driver lets us leave."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    for mib in leave_mib:
        try:
            return torch.empty(free - (mib << 20), dtype=torch.uint8, device=CUDA)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    pytest.fail(f"could not fill the device leaving {leave_mib[-1]} MiB of {free >> 20} free")


def probabilities(outcomes) -> np.ndarray:
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    return np.array([o.probabilities for o in outcomes])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_model_loads_frozen_in_half_precision_with_cudnn_autotuning(
    model_path, config, precision
) -> None:
    model = load_runtime_file(
        "torchscript", model_path, dataclasses.replace(config, gpu_precision=precision), CUDA
    )
    assert not hasattr(model, "features")  # frozen
    assert torch.backends.cudnn.benchmark
    batch = torch.rand(2, 3, 32, 32, device=CUDA).to(DTYPES[precision])
    with torch.inference_mode():
        logits = model(batch.contiguous(memory_format=torch.channels_last))
    assert logits.dtype == DTYPES[precision] and logits.device == CUDA


def test_the_cuda_path_answers_like_the_cpu_path_batch_after_batch(model_path, config, rng):
    on_gpu = Classifier(load_runtime_file("torchscript", model_path, config, CUDA), config, CUDA)
    assert on_gpu.device_batches is not None and on_gpu.device_batches.dtype == torch.float16
    on_gpu.warm_up()
    reference = Classifier(load_runtime_file("torchscript", model_path, config, CPU), config, CPU)
    first = mixed_bodies(rng, config.input_size)
    second = uint8_bodies(rng, config.input_size, 8)  # reuses the pinned buffer at once
    for bodies in (first, second, first):
        got = probabilities(on_gpu.classify(bodies))
        expected = probabilities(reference.classify(bodies))
        assert np.abs(got - expected).max() <= 1e-2
        assert [images for images, _ in on_gpu.last.forwards] == [8]  # one forward
    buffers = on_gpu.device_batches._staging.values()
    assert {b.dtype for b in buffers} == {torch.uint8, torch.float32}
    assert all(buffer.is_pinned() for buffer in buffers)


def test_parity_with_float32_on_the_cpu_holds_on_the_gpu(model_path, config) -> None:
    parity = check_gpu_parity(model_path, config, CUDA)
    assert parity.found.passed and parity.device.startswith("cuda:0 (")
    print(parity.summary())


def test_a_real_out_of_memory_in_torchscript_gives_507_and_the_worker_goes_on(
    tmp_path, config, rng
) -> None:
    path = scripted(tmp_path / "hungry.pt", HungryInScript(limit=4))
    classifier = Classifier(
        load_runtime_file("torchscript", path, config, CUDA), with_buckets(config, 2, 4), CUDA
    )
    bodies = uint8_bodies(rng, config.input_size, 3)
    outcomes = classifier.classify(bodies)  # 3 images, padded to 4, with mirrors: 8 > 4
    assert [o.status for o in outcomes] == [507] * 3
    assert "CUDA out of memory" in outcomes[0].error.message
    assert [o.status for o in classifier.classify(bodies[:2])] == [200, 200]


def test_a_full_device_gives_507_the_cache_is_freed_and_the_next_batch_is_served(config, rng):
    big = dataclasses.replace(config, input_size=380, max_pixels=380 * 380)
    big = with_buckets(big, 1, 64)
    classifier = Classifier(ConvNet().to(CUDA).half(), big, CUDA)
    classifier.warm_up()  # cuDNN and cuBLAS handles exist before memory runs out
    bodies = uint8_bodies(rng, 380, 64)
    hog = fill_device(leave_mib=(64, 128, 256))
    reserved = torch.cuda.memory_reserved()
    try:
        outcomes = classifier.classify(bodies)  # the normalised batch alone is 111 MB, and
        # its activations 300 MB: more than the 256 MiB left at most
        assert {o.status for o in outcomes} == {507}
        assert outcomes[0].error.type == "OutOfMemory"
        assert torch.cuda.memory_reserved() <= reserved  # what the failed batch held is freed
    finally:
        del hog
    assert {o.status for o in classifier.classify(bodies)} == {200}
