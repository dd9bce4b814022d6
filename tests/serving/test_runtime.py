"""Loading the exported model: freezing, channels_last and oneDNN Graph fusion on the CPU; the
bf16, OpenVINO and ONNX Runtime runtimes; the host check and the fallback to fp32 TorchScript;
GPU workers on TorchScript; what the worker says about where it runs and the build host. Hosts
are simulated (tests/small_models.py), GPUs where torch is asked for them."""

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
    openvino_runs_bf16,
    other_kind_of_host,
    select_device,
    unsupported,
    worker_runtime,
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
    assert AVX2_ONLY.kind() == {"model": "AMD EPYC 7B12",
                                "flags": ["avx", "avx2", "fma", "fpu", "sse2"]}  # fmt: skip
    assert AVX2_ONLY.describe() == "AMD EPYC 7B12; avx2"
    # a simulated host says what OpenVINO's plugin reports: the real one is not asked
    assert openvino_runs_bf16(SAPPHIRE_RAPIDS) and not openvino_runs_bf16(AVX2_ONLY)
    assert not openvino_runs_bf16(dataclasses.replace(AVX512_BF16, openvino_bf16=False))


def test_a_worker_on_another_kind_of_host_says_so(scripted, config: ModelConfig) -> None:
    chosen_on = dataclasses.replace(config, runtime_choice={"cpu": AVX512_BF16.kind()})
    same = load_model(scripted.parent, chosen_on, CPU, host=AVX512_BF16)
    assert same.other_host is None
    assert (
        same.runs_on() == "torchscript runtime on cpu (AMD EPYC 9B14; avx2, avx512, bf16) in fp32"
    )
    moved = load_model(scripted.parent, chosen_on, CPU, host=AVX2_ONLY)
    assert moved.other_host is not None
    assert moved.other_host.startswith(
        "the runtime was chosen on another kind of host (chosen on AMD EPYC 9B14, served on AMD "
        "EPYC 7B12; flags missing here: avx512_bf16 avx512_vnni avx512f; flags only here: fma): "
        "its timings may not hold"
    )
    more = dataclasses.replace(AVX2_ONLY, flags=AVX2_ONLY.flags | {"avx512f"})
    flags_only = other_kind_of_host(AVX2_ONLY.kind(), more)
    assert flags_only is not None and "flags only here: avx512f" in flags_only
    assert other_kind_of_host({}, AVX2_ONLY) is None  # an archive from before the record


def test_a_gpu_worker_runs_torchscript_on_its_gpu_whatever_the_archive_records(
    config: ModelConfig, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host, as torch says
    gpu = select_device(1)  # TorchServe's gpu_id for this worker
    assert gpu == torch.device("cuda", 1)
    for recorded in ("openvino", "onnxruntime", "torchscript-bf16"):
        runtime, why = worker_runtime(dataclasses.replace(config, runtime=recorded), gpu,
                                      AVX512_BF16)  # fmt: skip
        assert runtime == "torchscript" and why is not None and why.code == "gpu-worker"
        assert f"runtime {recorded} runs on the CPU only, and this worker has GPU cuda:1" in (
            why.reason
        )
        assert "TorchScript runs on it in fp16" in why.reason
    assert worker_runtime(config, gpu, AVX2_ONLY) == ("torchscript", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = select_device(1)  # a gpu_id but no CUDA: the CPU, and the recorded runtime
    onnx = dataclasses.replace(config, runtime="onnxruntime")
    assert cpu == CPU and worker_runtime(onnx, cpu, AVX2_ONLY) == ("onnxruntime", None)


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
