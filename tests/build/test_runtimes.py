"""--runtime auto and pinned runtimes: candidates proven against fp32 TorchScript, fp32
TorchScript kept unless a candidate is faster by more than its timings' spread, the choice
cached, GPU workers given their GPU path, hosts that cannot run a runtime refused. Hosts are
simulated through their /proc/cpuinfo (tests/small_models.py): nothing here asks the real CPU
what it has."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from small_models import AVX2_ONLY, AVX512_BF16, ConvNet

import export_torchscript
from b4serve.build import runtimes
from b4serve.build.parity import check_images
from b4serve.build.runtimes import (
    MIN_GAIN,
    Candidate,
    RuntimeChoiceError,
    check_set,
    choice_identity,
    choose_runtime,
    describe,
    pick,
)
from b4serve.serving.config import ModelConfig
from b4serve.serving.runtime import Unsupported


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


def test_auto_proves_every_candidate_on_a_simulated_avx512_bf16_host(convnet, config) -> None:
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
    # the record travels in the metadata, through JSON
    saved = ModelConfig(**{**config.__dict__, **selection.settings})
    record = json.loads(json.dumps(saved.runtime_choice))
    assert record["mode"] == "auto" and record["chosen"] == selection.runtime
    assert record["host"] == {"avx2": True, "avx512": True, "bf16": True, "amx": False}
    assert record["cpu"] == {"model": "AMD EPYC 9B14", "flags": sorted(AVX512_BF16.flags)}
    assert [c["runtime"] for c in record["candidates"]] == [r for r, _ in tried]
    assert all(c["spread"] >= 0 for c in record["candidates"] if c["timed_forwards"])
    assert record["why"].startswith(("kept torchscript fp32: no candidate", f"{selection.runtime}"))
    assert any(line.startswith(f"runtime {selection.runtime} (auto;") for line in lines)
    assert describe(saved).startswith(
        f"runtime: {selection.runtime} (auto, chosen in {record['seconds']} s) on AMD EPYC 9B14 "
        "with avx2"
    )
    # progress: a line as each step starts, and what it took
    assert "  runtime choice: loading onnxruntime fp32 ..." in lines
    assert any(line.startswith("  runtime choice: onnxruntime fp32 loaded in ") for line in lines)
    assert any(line.startswith("  runtime choice: parity and timing in ") for line in lines)


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
    runtimes._judge(candidate, torch.tensor(got), torch.tensor(expected))
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
    assert near_tie.excluded == (
        "against fp32 TorchScript: top-1 differs on 1 of 2 check images (bf16: every one must "
        "keep it)"
    )
    assert "over" in judged("fp32", [[float("nan"), 0.3], [0.45, 0.55]], expected).excluded


def timed_candidate(
    runtime: str, per_s: float, excluded: str = "", jitter: float = 0.0, precision: str = "fp32"
) -> Candidate:
    """A candidate whose forwards took 1/per_s seconds, each off by up to ``jitter`` of it."""
    pattern = [0.0, -1.0, 1.0, -0.5, 0.5] * 4
    seconds = [(1 + jitter * step) / per_s for step in pattern]
    return Candidate(runtime, precision, seconds=seconds, excluded=excluded)


def test_a_candidate_replaces_fp32_torchscript_only_when_clearly_faster() -> None:
    found = [timed_candidate("torchscript", 5), timed_candidate("openvino", 20, "over"),
             timed_candidate("onnxruntime", 7)]  # fmt: skip
    chosen, why = pick(found)
    assert chosen.runtime == "onnxruntime"
    assert why.startswith("onnxruntime fp32 40% faster than torchscript fp32 (needed over 5%")
    # 4% faster: under MIN_GAIN, whatever the spread
    chosen, why = pick([timed_candidate("torchscript", 5), timed_candidate("onnxruntime", 5.2)])
    assert chosen.runtime == "torchscript" and MIN_GAIN == 0.05
    assert (
        why == "kept torchscript fp32: no candidate faster by more than its timings' spread and 5%"
    )
    # 8% faster, but its forwards spread over 20%: not proven faster
    noisy = [timed_candidate("torchscript", 5, jitter=0.2), timed_candidate("onnxruntime", 5.4)]
    assert noisy[0].spread == pytest.approx(0.2, abs=0.01)
    assert pick(noisy)[0].runtime == "torchscript"
    assert pick([timed_candidate("torchscript", 5, jitter=0.2),
                 timed_candidate("onnxruntime", 6.5)])[0].runtime == "onnxruntime"  # fmt: skip
    with pytest.raises(RuntimeChoiceError, match="fp32 TorchScript does not match"):
        pick([timed_candidate("torchscript", 5, "over 0.0001"), timed_candidate("onnxruntime", 7)])
    with pytest.raises(RuntimeChoiceError, match="--runtime openvino failed its check"):
        pick([timed_candidate("openvino", 20, "over 0.02")], pinned="openvino")


def test_the_earlier_choice_on_this_kind_of_host_is_the_one_to_beat() -> None:
    found = [timed_candidate("torchscript", 5.2), timed_candidate("onnxruntime", 5)]
    chosen, why = pick(found, earlier=("onnxruntime", "fp32"))
    assert chosen.runtime == "onnxruntime" and "(the earlier choice on this kind of host)" in why
    assert pick(found)[0].runtime == "torchscript"  # without it, the reference stays
    # an earlier choice that is no longer eligible gives way to the reference
    gone = [timed_candidate("torchscript", 5.2), timed_candidate("onnxruntime", 5, "over")]
    assert pick(gone, earlier=("onnxruntime", "fp32"))[0].runtime == "torchscript"
    assert (
        pick([*found, timed_candidate("openvino", 7)], earlier=("onnxruntime", "fp32"))[0].runtime
        == "openvino"
    )


class ScriptedTimes:
    """The timing boundary of the runtime choice: each forward runs for real (its output is
    judged), and takes the seconds this says: ``base[runtime]`` times a jitter cycling through
    ``pattern`` (a spread of about 10%)."""

    pattern = (1.0, 0.9, 1.1, 0.95, 1.05)

    def __init__(self, base: dict[str, float]) -> None:
        self.base = base
        self.calls = 0

    def __call__(self, candidate: Candidate, forward):  # type: ignore[no-untyped-def]
        step = self.pattern[self.calls % len(self.pattern)]
        self.calls += 1
        return forward(), self.base.get(candidate.runtime, 1.0) * step


ONNX_FP32 = ["torchscript", "onnxruntime"]  # what these timings speak of


def choose(convnet, config, times: dict[str, float], **options):  # type: ignore[no-untyped-def]
    net, path = convnet
    timer = ScriptedTimes(times)
    lines: list[str] = []
    selection = choose_runtime(
        "auto", net, config, path, host=AVX2_ONLY, export=export_convnet, timer=timer,
        log=lines.append, **options,
    )  # fmt: skip
    return selection, timer, lines


def test_two_builds_whose_timings_differ_by_less_than_their_spread_choose_alike(
    convnet, config, monkeypatch
) -> None:
    monkeypatch.setattr(runtimes, "unsupported", only(ONNX_FP32))
    first, _, _ = choose(convnet, config, {"torchscript": 0.100, "onnxruntime": 0.097})
    second, _, _ = choose(convnet, config, {"torchscript": 0.097, "onnxruntime": 0.100})
    timed = [[c for c in s.candidates if c.seconds] for s in (first, second)]
    assert [[c.runtime for c in found] for found in timed] == [ONNX_FP32, ONNX_FP32]
    medians = [{c.runtime: c.images_per_s for c in found} for found in timed]
    # the fastest by median differs between the two builds: max() would have flipped
    assert [max(m, key=m.get) for m in medians] == ["onnxruntime", "torchscript"]
    assert all(c.spread > 0.05 for found in timed for c in found)
    assert first.runtime == second.runtime == "torchscript"
    faster, _, _ = choose(convnet, config, {"torchscript": 0.100, "onnxruntime": 0.070})
    assert faster.runtime == "onnxruntime"  # well past the spread: it is faster


def only(names: list[str]):  # type: ignore[no-untyped-def]
    """``unsupported`` as on a host that has only the runtimes ``names`` (by their packages)."""
    real = runtimes.unsupported

    def unsupported(runtime, host):  # type: ignore[no-untyped-def]
        found = real(runtime, host)
        if found is None and runtime not in names:
            return Unsupported(f"{runtime}-missing", f"{runtime} not installed")
        return found

    return unsupported


def test_a_repeat_build_on_the_same_kind_of_host_reads_the_choice_instead_of_timing(
    convnet, config, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runtimes, "unsupported", only(ONNX_FP32))
    sha = dataclasses.replace(config, extra={"checkpoint_sha256": "ab" * 32})
    cache = tmp_path / "runtime-choice"
    first, timer, _ = choose(convnet, sha, {"torchscript": 0.1, "onnxruntime": 0.07},
                             cache_dir=cache)  # fmt: skip
    assert first.runtime == "onnxruntime" and timer.calls > 0
    (entry,) = cache.glob("*.json")
    # the same checkpoint, settings, CPU and packages: nothing timed, the same choice
    convnet[1].with_name("model.onnx").unlink()
    again, timer, lines = choose(convnet, sha, {"torchscript": 0.05}, cache_dir=cache)
    assert timer.calls == 0 and again.runtime == "onnxruntime" and again.candidates == []
    assert again.settings["runtime_choice"]["cached"] is True
    assert any("not timed again" in line for line in lines), lines
    assert convnet[1].with_name("model.onnx").is_file()  # the chosen runtime's file is written
    # another setting: timed again, and the earlier choice is the one to beat
    threads = dataclasses.replace(sha, threads=1)
    kept, timer, _ = choose(convnet, threads, {"torchscript": 0.097, "onnxruntime": 0.100},
                            cache_dir=cache)  # fmt: skip
    assert timer.calls > 0 and kept.runtime == "onnxruntime"
    assert "earlier choice on this kind of host" in kept.settings["runtime_choice"]["why"]
    assert len(list(cache.glob("*.json"))) == 2 and entry.is_file()
    # another kind of host: its own choice, from the reference
    other = choose_runtime(
        "auto", convnet[0], threads, convnet[1], host=AVX512_BF16, export=export_convnet,
        timer=ScriptedTimes({"torchscript": 0.097, "onnxruntime": 0.100}), cache_dir=cache,
        log=lambda _: None,
    )  # fmt: skip
    assert other.runtime == "torchscript"


def test_the_choice_is_keyed_by_checkpoint_settings_cpu_and_packages(config) -> None:
    base = dataclasses.replace(config, extra={"checkpoint_sha256": "ab" * 32})
    identity = choice_identity(base, "auto", None, None, AVX2_ONLY)
    assert identity["checkpoint_sha256"] == "ab" * 32
    assert identity["cpu"] == {"model": "AMD EPYC 7B12", "flags": sorted(AVX2_ONLY.flags)}
    assert set(identity["packages"]) == {"torch", "openvino", "onnxruntime"}
    assert identity["packages"]["torch"] == torch.__version__
    changed = [
        choice_identity(dataclasses.replace(base, arch="tf_efficientnet_b4", padding="tf_same",
                                            bn_eps=1e-3), "auto", None, None, AVX2_ONLY),
        choice_identity(dataclasses.replace(base, extra={"checkpoint_sha256": "cd" * 32}),
                        "auto", None, None, AVX2_ONLY),
        choice_identity(base, "onnxruntime", None, None, AVX2_ONLY),
        choice_identity(base, "auto", 0.05, None, AVX2_ONLY),
        choice_identity(base, "auto", None, None, AVX512_BF16),
    ]  # fmt: skip
    assert all(other != identity for other in changed)
    # what the choice itself sets is not what it is chosen for
    chosen = dataclasses.replace(base, runtime="onnxruntime", runtime_choice={"mode": "auto"})
    assert choice_identity(chosen, "auto", None, None, AVX2_ONLY) == identity


def test_workers_with_gpus_serve_the_gpu_path_and_nothing_is_timed(convnet, config) -> None:
    net, path = convnet
    timer = ScriptedTimes({})
    lines: list[str] = []
    selection = choose_runtime("auto", net, config, path, host=AVX512_BF16, gpus=2, timer=timer,
                               log=lines.append)  # fmt: skip
    assert selection.runtime == "torchscript" and timer.calls == 0
    record = selection.settings["runtime_choice"]
    assert (record["workers"], record["gpus"], record["chosen"]) == ("gpu", 2, "torchscript")
    assert "only TorchScript has a GPU path (fp16 there" in record["why"]
    assert lines == [f"runtime torchscript (auto): {record['why']}"]
    for cpu_only in ("openvino", "onnxruntime", "torchscript-bf16"):
        with pytest.raises(RuntimeChoiceError, match=f"--runtime {cpu_only} runs on the CPU only"):
            choose_runtime(cpu_only, net, config, path, host=AVX512_BF16, gpus=1)
    pinned = choose_runtime("torchscript", net, config, path, host=AVX2_ONLY, gpus=1)
    assert pinned.settings["runtime_choice"]["workers"] == "gpu"


def test_export_counts_the_gpus_where_torch_is_asked(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert export_torchscript._worker_gpus(None) == 4
    assert export_torchscript._worker_gpus(0) == 0  # B4_GPUS=0: the CPU serves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert export_torchscript._worker_gpus(None) == 0


def test_the_check_set_is_the_one_paritys_preprocessed_as_the_worker_does(config) -> None:
    found = check_set(config)
    assert [name for name, _ in found][:8] == [name for name, _ in check_images(config)][:8]
    assert all(image.shape == (config.input_size, config.input_size, 3) for _, image in found)
