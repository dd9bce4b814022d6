"""Loading the exported model: freezing, channels_last and oneDNN Graph fusion on the CPU; the
bf16, OpenVINO and ONNX Runtime runtimes; the host check and the fallback to fp32 TorchScript."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from small_models import AVX2_ONLY, AVX512_BF16, SAPPHIRE_RAPIDS, ConvNet

from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS
from b4serve.serving.runtime import (
    Bf16TorchScript,
    HostCaps,
    OneDnnFused,
    OnnxRuntimeModel,
    OpenVinoModel,
    load_model,
    load_torchscript,
    openvino_has_bf16,
    unsupported,
)
from b4serve.serving.tta import tta_probabilities

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build directory's model.pt and model.onnx of the same ConvNet."""
    path = tmp_path_factory.mktemp("runtime") / "model.pt"
    net = ConvNet().eval()
    torch.jit.script(net).save(str(path))
    torch.onnx.export(
        net, (torch.zeros(1, 3, 32, 32),), str(path.with_name("model.onnx")),
        input_names=["images"], dynamic_axes={"images": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    return path


def probabilities(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        for _ in range(WARM_UP_CALLS):
            tta_probabilities(model, images)
        return tta_probabilities(model, images)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    batch = torch.rand(3, 3, 32, 32, generator=generator) * 4 - 2
    return batch.contiguous(memory_format=torch.channels_last)


def run(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        for _ in range(WARM_UP_CALLS):  # the fused graph is compiled on these
            model(images)
        return model(images)


def test_fused_model_answers_as_the_unfused_one_and_leaves_the_switch_off(scripted) -> None:
    images = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = load_torchscript(scripted, CPU, fuse=True)
    plain = load_torchscript(scripted, CPU, fuse=False)
    assert isinstance(fused, OneDnnFused) and not isinstance(plain, OneDnnFused)
    torch.testing.assert_close(run(fused, images), run(plain, images), atol=1e-5, rtol=1e-4)
    assert not torch.jit.onednn_fusion_enabled()
    # with the switch left on, an unfrozen scripted module would fail ("bad optional access")
    unfrozen = torch.jit.script(ConvNet().eval())
    assert run(unfrozen, images).shape == (2, 6)


def test_baseline_is_the_plain_scripted_module(scripted) -> None:
    model = load_torchscript(scripted, CPU, optimize=False, fuse=True)
    assert isinstance(model, torch.jit.ScriptModule)
    assert hasattr(model, "features")  # not frozen: the submodules are still there


def test_load_model_follows_the_config(scripted, config: ModelConfig) -> None:
    build = scripted.parent
    assert isinstance(load_model(build, config, CPU).model, OneDnnFused)
    unfused = dataclasses.replace(config, onednn_fusion=False)
    assert not isinstance(load_model(build, unfused, CPU).model, OneDnnFused)
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        load_model(build, dataclasses.replace(config, runtime="tvm"), CPU)


def test_host_capabilities_come_from_the_cpu_flags() -> None:
    assert AVX512_BF16.summary() == {"avx2": True, "avx512": True, "bf16": True, "amx": False}
    assert AVX2_ONLY.summary() == {"avx2": True, "avx512": False, "bf16": False, "amx": False}
    assert SAPPHIRE_RAPIDS.bf16 and SAPPHIRE_RAPIDS.amx
    assert not HostCaps.from_cpuinfo("").flags  # no cpuinfo: nothing assumed


def test_a_host_refuses_what_it_cannot_run_with_a_reason(monkeypatch) -> None:
    assert unsupported("torchscript", AVX2_ONLY) is None
    assert unsupported("torchscript-bf16", AVX512_BF16) is None
    refused = unsupported("torchscript-bf16", AVX2_ONLY)
    assert refused is not None and refused.code == "no-bf16"
    assert "AVX512_BF16 or AMX-BF16" in refused.reason
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "openvino" else real_find_spec(name),
    )
    missing = unsupported("openvino", AVX512_BF16)
    assert missing is not None and missing.code == "openvino-missing"
    assert "pip install -r requirements.txt" in missing.reason
    assert unsupported("onnxruntime", AVX2_ONLY) is None
    with pytest.raises(ValueError, match="unknown runtime"):
        unsupported("tensorrt", AVX512_BF16)


def test_an_archive_this_host_cannot_run_falls_back_to_fp32_torchscript(
    scripted, config: ModelConfig, images
) -> None:
    bf16 = dataclasses.replace(config, runtime="torchscript-bf16")
    here = load_model(scripted.parent, bf16, CPU, host=AVX512_BF16)
    assert (here.runtime, here.fallback) == ("torchscript-bf16", None)
    assert isinstance(here.model, Bf16TorchScript)
    copied = load_model(scripted.parent, bf16, CPU, host=AVX2_ONLY)  # another node type
    assert (copied.runtime, copied.recorded) == ("torchscript", "torchscript-bf16")
    assert copied.fallback is not None and copied.fallback.code == "no-bf16"
    reference = load_torchscript(scripted, CPU)
    torch.testing.assert_close(
        probabilities(copied.model, images), probabilities(reference, images)
    )


def test_bf16_torchscript_takes_and_gives_fp32_within_the_reduced_tolerance(
    scripted, config: ModelConfig, images
) -> None:
    # torch runs bf16 on any CPU (emulated where it has no bf16 instructions): parity holds
    model = load_model(
        scripted.parent, dataclasses.replace(config, runtime="torchscript-bf16"), CPU,
        host=AVX512_BF16,
    ).model  # fmt: skip
    with torch.inference_mode():
        logits = model(images)
    assert logits.dtype == torch.float32 and images.dtype == torch.float32
    got = probabilities(model, images)
    expected = probabilities(load_torchscript(scripted, CPU), images)
    difference = (got - expected).abs().max().item()
    assert 0 < difference <= 2e-2  # not fp32 in disguise
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_openvino_and_onnxruntime_answer_as_torchscript(scripted, images) -> None:
    pytest.importorskip("openvino")
    onnx = scripted.with_name("model.onnx")
    expected = probabilities(load_torchscript(scripted, CPU), images)
    fp32 = OpenVinoModel(onnx, precision="fp32")
    assert fp32.precision == "fp32"
    torch.testing.assert_close(probabilities(fp32, images), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        probabilities(OnnxRuntimeModel(onnx), images), expected, atol=1e-5, rtol=0
    )
    bf16 = OpenVinoModel(onnx, precision="bf16")
    assert bf16.precision == ("bf16" if openvino_has_bf16() else "fp32")
    assert (probabilities(bf16, images) - expected).abs().max().item() <= 2e-2


def test_openvino_streams_share_a_forward_and_keep_its_order(scripted, images) -> None:
    pytest.importorskip("openvino")
    onnx = scripted.with_name("model.onnx")
    one = OpenVinoModel(onnx, hint="LATENCY")
    spread = OpenVinoModel(onnx, hint="THROUGHPUT", streams=2, threads=2)
    assert (one.streams, spread.streams) == (1, 2) and spread.queue is not None
    with torch.inference_mode():
        torch.testing.assert_close(spread(images), one(images), atol=1e-5, rtol=0)
