"""The GPU data path (b4serve.serving.gpu) run on the CPU: buckets, padding and un-padding,
normalisation and flip on the device tensor, the staging buffer, half-precision loading, and a
507 for the batch that runs out of device memory. tests/serving/test_gpu_cuda.py runs it on a
GPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_fakes import (
    CUDA_OOM_MESSAGE,
    OutOfMemoryInScript,
    Recording,
    RunsOutOfMemory,
    mixed_bodies,
    scripted,
    uint8_bodies,
    with_buckets,
)
from small_models import ConvNet

from b4serve.serving.codec import decode_npy, encode_npy
from b4serve.serving.config import GPU_PRECISIONS, ModelConfig
from b4serve.serving.errors import OutOfMemory
from b4serve.serving.gpu import (
    DTYPES,
    DeviceBatches,
    forward_sizes,
    load_device_torchscript,
    model_dtype,
    out_of_memory,
    plan_forwards,
)
from b4serve.serving.pipeline import WARM_UP_CALLS, Classifier
from b4serve.serving.preprocess import Preprocessor, stack_channels_last
from b4serve.serving.runtime import load_torchscript

CPU = torch.device("cpu")
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def device_classifier(model, config: ModelConfig, dtype: torch.dtype = torch.float32):
    """A Classifier on the GPU path, with the CPU as its device."""
    return Classifier(model, config, CPU, DeviceBatches(model, config, CPU, dtype))


def probabilities(outcomes) -> np.ndarray:
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    return np.array([o.probabilities for o in outcomes])


def test_batches_pad_to_the_next_bucket_and_split_at_the_largest() -> None:
    assert plan_forwards(1, BUCKETS) == [(1, 1)]
    assert plan_forwards(3, BUCKETS) == [(3, 4)]
    assert plan_forwards(33, BUCKETS) == [(33, 64)]
    assert plan_forwards(64, BUCKETS) == [(64, 64)]
    assert plan_forwards(70, BUCKETS) == [(64, 64), (6, 8)]
    assert plan_forwards(128, BUCKETS) == [(64, 64), (64, 64)]
    assert plan_forwards(5, (4,)) == [(4, 4), (1, 4)]
    # a configured micro-batch caps the forwards, and becomes the largest size
    assert forward_sizes(BUCKETS, micro_batch=48) == (1, 2, 4, 8, 16, 32, 48)
    assert forward_sizes(BUCKETS, micro_batch=3) == (1, 2, 3)
    assert forward_sizes(BUCKETS) == BUCKETS


def test_padded_forwards_give_each_image_its_own_answer_in_order(config, rng) -> None:
    model = Recording(ConvNet())
    padded = device_classifier(model, with_buckets(config, 1, 4, 8))
    reference = Classifier(ConvNet(), dataclasses.replace(config, micro_batch=1), CPU)
    bodies = uint8_bodies(rng, config.input_size, 11)
    got = probabilities(padded.classify(bodies))
    np.testing.assert_allclose(got, probabilities(reference.classify(bodies)), atol=1e-5)
    assert model.sizes == [16, 8]  # 8 images then 3 padded to 4, each with its mirror
    assert [images for images, _ in padded.last.forwards] == [8, 3]  # real images only


def test_device_path_normalises_and_flips_like_the_cpu_path(config, rng) -> None:
    bodies = mixed_bodies(rng, config.input_size)
    on_device = device_classifier(ConvNet(), config)
    reference = Classifier(ConvNet(), config, CPU)
    got = probabilities(on_device.classify(bodies))
    np.testing.assert_allclose(got, probabilities(reference.classify(bodies)), atol=1e-5)

    # the batch itself: what the CPU path builds image by image, normalised on the "device"
    batches = on_device.device_batches
    arrays = [decode_npy(body, config.max_pixels) for body in bodies]
    staged = batches.stage([batches.pixels(a) for a in arrays], padded=8)
    normalised = batches.normalised(staged)
    expected = stack_channels_last([Preprocessor(config)(a) for a in arrays])
    torch.testing.assert_close(normalised, expected, atol=2e-6, rtol=1e-5)
    assert normalised.is_contiguous(memory_format=torch.channels_last)


def test_the_flip_is_a_mirror_of_each_image(config, rng) -> None:
    model = Recording(ConvNet())
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    image = rng.integers(0, 256, (config.input_size, config.input_size, 3), dtype=np.uint8)
    device_classifier(model, with_buckets(config, 2)).classify([encode_npy(image)])
    (batch,) = seen
    assert batch.shape == (4, 3, config.input_size, config.input_size)
    torch.testing.assert_close(batch[2], batch[0].flip(2))  # the image's mirror, after the pad


def test_uint8_images_stage_as_uint8_and_the_buffer_is_pinned_only_with_a_gpu(config, rng):
    on_device = device_classifier(ConvNet(), config)
    batches = on_device.device_batches
    on_device.classify(uint8_bodies(rng, config.input_size, 3))
    (buffer,) = batches._staging.values()
    assert buffer.dtype == torch.uint8 and buffer.shape == (64, 32, 32, 3)
    assert not buffer.is_pinned() and not batches.pinned  # no page-locked memory without a GPU
    on_device.classify(mixed_bodies(rng, config.input_size))  # floats and resized ones
    assert {b.dtype for b in batches._staging.values()} == {torch.uint8, torch.float32}
    native = rng.integers(0, 256, (config.input_size, config.input_size, 3), dtype=np.uint8)
    assert np.shares_memory(batches.pixels(native), native)  # no copy before staging


def test_warm_up_runs_every_bucket_size_before_the_first_request(config) -> None:
    model = Recording(ConvNet())
    device_classifier(model, with_buckets(config, 1, 2, 4)).warm_up()
    assert model.sizes == [2] * WARM_UP_CALLS + [4] * WARM_UP_CALLS + [8] * WARM_UP_CALLS
    assert all(channels_last for _, _, channels_last in model.batches)


def test_out_of_memory_fails_only_that_batch_with_507_and_the_worker_goes_on(config, rng):
    model = RunsOutOfMemory(ConvNet())
    classifier = device_classifier(model, config)
    good = uint8_bodies(rng, config.input_size, 2)
    outcomes = classifier.classify([good[0], b"not npy", good[1]])
    assert [o.status for o in outcomes] == [507, 415, 507]
    body = json.loads(outcomes[0].answer())
    assert body["code"] == 507 and body["type"] == "OutOfMemory"
    assert "batch of 2 images" in body["message"] and "batch_size" in body["message"]
    assert CUDA_OOM_MESSAGE.split(".")[0] in body["message"]
    assert classifier.last.errors == ["OutOfMemory", "UnsupportedMediaType", "OutOfMemory"]
    assert [o.status for o in classifier.classify(good)] == [200, 200]  # the next batch


def test_out_of_memory_inside_torchscript_is_recognised_by_its_message(config, rng, tmp_path):
    model = torch.jit.load(str(scripted(tmp_path / "m.pt", OutOfMemoryInScript(limit=4))))
    classifier = device_classifier(model, with_buckets(config, 2, 4))
    bodies = uint8_bodies(rng, config.input_size, 3)
    outcomes = classifier.classify(bodies)  # 3 images -> 4 padded -> 8 with mirrors: fails
    assert [o.status for o in outcomes] == [507] * 3
    message = outcomes[0].error.message
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in message
    assert "TorchScript interpreter" not in message  # the line that says what happened
    assert [o.status for o in classifier.classify(bodies[:2])] == [200, 200]


def test_other_forward_errors_are_not_turned_into_507(config, rng) -> None:
    def broken(images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        device_classifier(broken, config).classify(uint8_bodies(rng, config.input_size, 1))
    assert out_of_memory(ValueError("out of range"), 1) is None
    assert isinstance(out_of_memory(RuntimeError("CUDNN_STATUS_ALLOC_FAILED"), 1), OutOfMemory)


@pytest.mark.parametrize(("precision", "tolerance"), [("bf16", 3e-2), ("fp16", 5e-3)])
def test_half_precision_model_is_frozen_and_close_to_float32(
    config, rng, tmp_path, precision, tolerance
) -> None:
    path = scripted(tmp_path / "model.pt")
    model = load_device_torchscript(path, CPU, precision)
    assert not hasattr(model, "features")  # frozen: weights inlined as constants
    bodies = uint8_bodies(rng, config.input_size, 5)
    half = device_classifier(model, config, DTYPES[precision])
    full = Classifier(load_torchscript(path, CPU), config, CPU)
    got, expected = probabilities(half.classify(bodies)), probabilities(full.classify(bodies))
    assert np.abs(got - expected).max() <= tolerance
    assert np.abs(got - expected).max() > 0  # it did run in half precision
    image = torch.zeros(1, 3, 8, 8, dtype=DTYPES[precision])
    with torch.inference_mode():
        assert model(image.contiguous(memory_format=torch.channels_last)).dtype == image.dtype


def test_the_model_runs_in_the_configured_precision_only_on_a_gpu(config) -> None:
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert model_dtype(config, cuda) == torch.float16  # the default
    assert model_dtype(dataclasses.replace(config, gpu_precision="bf16"), cuda) == torch.bfloat16
    assert model_dtype(dataclasses.replace(config, optimize=False), cuda) == torch.float32
    assert model_dtype(dataclasses.replace(config, runtime="onnxruntime"), cuda) == torch.float32
    assert model_dtype(config, CPU) == torch.float32
    assert set(DTYPES) == set(GPU_PRECISIONS)
    # and a Classifier takes the GPU path by itself only on a GPU
    assert Classifier(ConvNet(), config, CPU).device_batches is None


def test_gpu_settings_travel_in_the_archive_config_and_bad_ones_are_refused(
    config, tmp_path: Path
) -> None:
    chosen = dataclasses.replace(config, gpu_precision="bf16", gpu_buckets=(1, 8, 32))
    chosen.save(tmp_path)
    assert ModelConfig.load(tmp_path) == chosen
    meta = json.loads((tmp_path / "model_meta.json").read_text())
    del meta["gpu_precision"], meta["gpu_buckets"]  # an archive exported before these existed
    (tmp_path / "model_meta.json").write_text(json.dumps(meta))
    assert ModelConfig.load(tmp_path).gpu_buckets == BUCKETS
    with pytest.raises(ValueError, match="gpu_precision must be one of fp16, bf16, fp32"):
        dataclasses.replace(config, gpu_precision="int8")
    for buckets in [(), (0, 4), (8, 4), (4, 4)]:
        with pytest.raises(ValueError, match="gpu_buckets must be increasing sizes >= 1"):
            dataclasses.replace(config, gpu_buckets=buckets)
