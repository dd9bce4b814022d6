"""--runtime auto and pinned runtimes: candidates proven against fp32 TorchScript, the fastest
eligible kept, hosts that cannot run a runtime refused (simulated through their CPU flags)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from small_models import AVX2_ONLY, AVX512_BF16, ConvNet

from b4serve.build import runtimes
from b4serve.build.runtimes import (
    Candidate,
    RuntimeChoiceError,
    check_set,
    choose_runtime,
    describe,
    pick,
)
from b4serve.serving.config import ModelConfig


def export_convnet(model: torch.nn.Module, config: ModelConfig, path: Path) -> float:
    """Stands in for export_onnx, which rebuilds the config's geffnet arch (too big here)."""
    torch.onnx.export(
        model, (torch.zeros(1, 3, config.input_size, config.input_size),), str(path),
        input_names=["images"], dynamic_axes={"images": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    return 0.0


@pytest.fixture(scope="module")
def convnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    net = ConvNet().eval()
    path = tmp_path_factory.mktemp("auto") / "model.pt"
    torch.jit.script(net).save(str(path))
    return net, path


def test_auto_proves_every_candidate_and_keeps_the_fastest_eligible(convnet, config) -> None:
    pytest.importorskip("openvino")
    net, path = convnet
    lines: list[str] = []
    selection = choose_runtime(
        "auto", net, config, path, host=AVX512_BF16, export=export_convnet, log=lines.append
    )
    tried = [(c.runtime, c.precision) for c in selection.candidates]
    assert tried[:3] == [("torchscript", "fp32"), ("torchscript-bf16", "bf16"),
                         ("openvino", "bf16")][: len(tried[:3])]  # fmt: skip
    assert ("openvino", "fp32") in tried and ("onnxruntime", "fp32") in tried
    for candidate in selection.candidates:
        assert candidate.images == len(check_set(config)) and len(candidate.seconds) >= 12
        bound = 2e-2 if candidate.precision == "bf16" else 1e-4
        assert candidate.max_abs_diff is not None and candidate.max_abs_diff <= bound, candidate
    eligible = [c for c in selection.candidates if not c.excluded]
    fastest = max(eligible, key=lambda c: c.images_per_s or 0)
    assert selection.runtime == fastest.runtime
    # the record travels in the metadata, through JSON
    saved = ModelConfig(**{**config.__dict__, **selection.settings})
    record = json.loads(json.dumps(saved.runtime_choice))
    assert record["mode"] == "auto" and record["chosen"] == selection.runtime
    assert record["host"] == {"avx2": True, "avx512": True, "bf16": True, "amx": False}
    assert [c["runtime"] for c in record["candidates"]] == [r for r, _ in tried]
    assert any(line.startswith(f"runtime {selection.runtime} (auto;") for line in lines)
    assert describe(saved).startswith(
        f"runtime: {selection.runtime} (auto, chosen in {record['seconds']} s) on a CPU with avx2"
    )


def test_candidates_are_timed_as_the_worker_runs_them_each_after_the_cores_settle(
    convnet, config, monkeypatch
) -> None:
    """The worker's allocator setting, and an idle pause before every timed forward: without
    them TorchScript was timed 25% and 40% slow beside ONNX Runtime (docs/RUNTIMES.md)."""
    net, path = convnet
    events: list[str] = []
    monkeypatch.setattr(runtimes, "keep_freed_memory", lambda mb: events.append(f"keep {mb}"))
    monkeypatch.setattr(runtimes, "_settle", lambda: events.append("settle"))
    forward = runtimes.Classifier.predict

    def predict(self, images):  # type: ignore[no-untyped-def]
        events.append("forward")
        return forward(self, images)

    monkeypatch.setattr(runtimes.Classifier, "predict", predict)
    selection = choose_runtime("onnxruntime", net, config, path, host=AVX512_BF16,
                               export=export_convnet, log=lambda _: None)  # fmt: skip
    assert events[0] == f"keep {config.malloc_keep_mb}"  # before any model is run
    timed = sum(len(c.seconds) for c in selection.candidates)
    assert timed > 0 and events.count("settle") == timed
    for index, event in enumerate(events):
        if event == "settle":
            assert events[index + 1] == "forward"


def test_auto_on_an_avx2_only_host_tries_no_bf16_and_says_why(convnet, config) -> None:
    net, path = convnet
    selection = choose_runtime(
        "auto", net, config, path, host=AVX2_ONLY, export=export_convnet, log=lambda _: None
    )
    precisions = {c.precision for c in selection.candidates if c.images}
    assert precisions == {"fp32"}  # OpenVINO too runs fp32 where the CPU has no bf16
    (skipped,) = [c for c in selection.candidates if c.runtime == "torchscript-bf16"]
    assert "needs a CPU with bf16 instructions" in skipped.excluded and not skipped.seconds
    assert selection.runtime != "torchscript-bf16"


def test_a_pinned_runtime_this_host_cannot_run_is_an_error(convnet, config, monkeypatch) -> None:
    net, path = convnet
    with pytest.raises(RuntimeChoiceError, match="--runtime torchscript-bf16 cannot run on this"):
        choose_runtime("torchscript-bf16", net, config, path, host=AVX2_ONLY)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "openvino" else real_find_spec(name),
    )
    with pytest.raises(RuntimeChoiceError, match="needs the openvino package"):
        choose_runtime("openvino", net, config, path, host=AVX512_BF16)
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        choose_runtime("tvm", net, config, path, host=AVX512_BF16)


def test_pinned_fp32_torchscript_is_the_reference_and_needs_no_check(convnet, config) -> None:
    net, path = convnet
    selection = choose_runtime("torchscript", net, config, path, host=AVX2_ONLY, log=print)
    assert selection.runtime == "torchscript" and selection.candidates == []
    assert selection.settings["runtime_choice"]["mode"] == "pinned"


def test_a_pinned_runtime_that_fails_its_check_is_an_error(convnet, config) -> None:
    net, path = convnet
    with pytest.raises(RuntimeChoiceError, match="--runtime torchscript-bf16 failed its check"):
        choose_runtime(
            "torchscript-bf16", net, config, path, host=AVX512_BF16, reduced_tolerance=1e-9,
            log=lambda _: None,
        )  # fmt: skip


def judged(precision: str, got: list[list[float]], expected: list[list[float]]) -> Candidate:
    candidate = Candidate("x", precision, seconds=[0.1])
    runtimes._judge(candidate, torch.tensor(got), torch.tensor(expected), 2e-2)
    return candidate


def test_parity_rules_per_precision() -> None:
    expected = [[0.7, 0.3], [0.45, 0.55]]
    assert judged("fp32", [[0.70005, 0.29995], [0.45, 0.55]], expected).excluded == ""
    assert (
        "over 0.0001 (fp32)" in judged("fp32", [[0.7002, 0.2998], [0.45, 0.55]], expected).excluded
    )
    assert judged("bf16", [[0.69, 0.31], [0.46, 0.54]], expected).excluded == ""
    flipped = judged("bf16", [[0.69, 0.31], [0.51, 0.49]], expected)  # within 2e-2? no: 0.06
    assert "over 0.02 (bf16)" in flipped.excluded
    near_tie = judged("bf16", [[0.69, 0.31], [0.505, 0.495]], [[0.7, 0.3], [0.495, 0.505]])
    assert near_tie.excluded == "top-1 differs from fp32 TorchScript on 1 of 2 check images"
    assert "over" in judged("fp32", [[float("nan"), 0.3], [0.45, 0.55]], expected).excluded


def timed_candidate(runtime: str, per_s: float, excluded: str = "") -> Candidate:
    return Candidate(runtime, "fp32", seconds=[1 / per_s] * 3, excluded=excluded)


def test_the_fastest_eligible_candidate_wins() -> None:
    found = [timed_candidate("torchscript", 5), timed_candidate("openvino", 20, "over"),
             timed_candidate("onnxruntime", 7)]  # fmt: skip
    assert pick(found).runtime == "onnxruntime"
    with pytest.raises(RuntimeChoiceError, match="fp32 TorchScript does not match"):
        pick([timed_candidate("torchscript", 5, "over 0.0001"), timed_candidate("onnxruntime", 7)])
    with pytest.raises(RuntimeChoiceError, match="--runtime openvino failed its check"):
        pick([timed_candidate("openvino", 20, "over 0.02")], pinned="openvino")


def test_the_users_own_images_make_the_check_set(config, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("b.npy", "a.npy"):
        np.save(tmp_path / name, rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    found = check_set(config, tmp_path)
    assert [name for name, _ in found] == ["a.npy", "b.npy"]
    assert found[0][1].shape == (config.input_size, config.input_size, 3)  # as the server has it
    np.save(tmp_path / "c.npy", np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(
        RuntimeChoiceError, match=r"the server would refuse .*c\.npy: expected 1, 3 or 4 channels"
    ):
        check_set(config, tmp_path)
    with pytest.raises(RuntimeChoiceError, match=r"no \.npy files"):
        check_set(config, tmp_path / "empty")


def test_default_check_set_is_the_demo_examples_and_varied_probes(config) -> None:
    names = [name for name, _ in check_set(config)]
    assert names[:6] == [f"demo demo_{c}_blob" for c in
                         ("red", "green", "blue", "yellow", "cyan", "magenta")]  # fmt: skip
    assert {"black", "white", "noise", "gradient"} <= set(names[6:])
