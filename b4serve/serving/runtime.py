"""Load the archive's model once per worker, in the runtime its metadata records, ready to call.

Every runtime is a callable from an NCHW float32 batch to float32 logits, so the pipeline (TTA,
softmax) stays the same whatever runs the model and in whatever precision:

- ``torchscript``: fp32 TorchScript (``model.pt``), frozen and ``channels_last``; the reference,
  and the fallback. Every archive carries ``model.pt``.
- ``torchscript-bf16``: the same module with bf16 weights; inputs cast to bf16 and the logits
  back to fp32 inside the callable.
- ``openvino``: the ONNX export (``model.onnx``) read and compiled by OpenVINO's CPU plugin, in
  bf16 where the plugin reports BF16 and the archive's parity check ran in bf16, else in fp32.
- ``onnxruntime``: the ONNX export on ONNX Runtime's CPU provider, fp32.

A worker first checks that it can run the recorded runtime (:func:`unsupported`): an archive
copied to another node type or a KServe pod without the package falls back to fp32 TorchScript,
and a worker given a GPU runs TorchScript on it (the only runtime with a GPU path), whatever the
archive records; :class:`LoadedModel` says why, where the model runs and in what precision, and
whether the runtime was chosen on another kind of CPU (the handler logs it, labels a metric).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from b4serve.serving.config import ModelConfig

__all__ = [
    "MODEL_FILE",
    "ONNX_FILE",
    "REFERENCE",
    "RUNTIMES",
    "Bf16TorchScript",
    "HostCaps",
    "LoadedModel",
    "Model",
    "OneDnnFused",
    "OnnxRuntimeModel",
    "OpenVinoModel",
    "RuntimeSpec",
    "Unsupported",
    "host_caps",
    "load_model",
    "load_runtime",
    "load_torchscript",
    "micro_batch_size",
    "openvino_has_bf16",
    "openvino_runs_bf16",
    "other_kind_of_host",
    "select_device",
    "unsupported",
    "worker_runtime",
]

MODEL_FILE = "model.pt"  # in every archive: the reference runtime's file, and the fallback's
ONNX_FILE = "model.onnx"
REFERENCE = "torchscript"

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime: the archive file it runs, the package it needs beyond torch, its precision."""

    name: str
    file: str
    package: str  # Python package the runtime imports ("": torch alone)
    precision: str  # fp32 or bf16 (openvino: bf16 where its CPU plugin has it, else fp32)
    summary: str


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec("torchscript", MODEL_FILE, "", "fp32", "TorchScript fp32 (the reference)"),
        RuntimeSpec("torchscript-bf16", MODEL_FILE, "", "bf16", "TorchScript, bf16 weights"),
        RuntimeSpec("openvino", ONNX_FILE, "openvino", "bf16", "OpenVINO, from the ONNX"),
        RuntimeSpec("onnxruntime", ONNX_FILE, "onnxruntime", "fp32", "ONNX Runtime, CPU"),
    )
}

# --- the host -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCaps:
    """What this host's CPU offers the runtimes, from its ``/proc/cpuinfo`` model and flags."""

    flags: frozenset[str]
    model: str = ""  # "model name" ("" where cpuinfo has none, e.g. ARM)
    # Whether OpenVINO's CPU plugin reports BF16 here; None: ask it (a simulated host says)
    openvino_bf16: bool | None = None

    @classmethod
    def from_cpuinfo(cls, text: str) -> HostCaps:
        """The model and flags of the first CPU in ``text`` (x86 ``flags``, or ARM
        ``Features``)."""
        model, flags = "", frozenset[str]()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            if key.strip() in ("flags", "Features"):
                flags = frozenset(value.split())
                break
        return cls(flags, model)

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic that oneDNN uses: AVX512_BF16 or AMX-BF16 (x86)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    def summary(self) -> dict[str, bool]:
        """The capabilities the runtimes care about, for logs, metadata and the bench."""
        return {"avx2": self.avx2, "avx512": self.avx512, "bf16": self.bf16, "amx": self.amx}

    def kind(self) -> dict[str, Any]:
        """The kind of host a runtime choice holds for: CPU model and every flag (the build
        records it; a worker compares it with its own, :func:`other_kind_of_host`)."""
        return {"model": self.model, "flags": sorted(self.flags)}

    def describe(self) -> str:
        """The CPU in a few words: model and the capabilities it has."""
        have = [name for name, on in self.summary().items() if on]
        return f"{self.model or 'unknown CPU'}; {', '.join(have) or 'no avx2'}"


def other_kind_of_host(recorded: dict[str, Any], host: HostCaps) -> str | None:
    """A sentence when ``host`` is not the kind of host ``recorded`` (:meth:`HostCaps.kind` of
    the build host) describes; None when it is, or when nothing was recorded."""
    if not recorded:
        return None
    flags = frozenset(recorded.get("flags", ()))
    model = recorded.get("model", "")
    if model == host.model and flags == host.flags:
        return None
    differences = []
    if model != host.model:
        unnamed = "an unnamed CPU"
        differences.append(f"chosen on {model or unnamed}, served on {host.model or unnamed}")
    missing, added = sorted(flags - host.flags), sorted(host.flags - flags)
    if missing:
        differences.append(f"flags missing here: {_few(missing)}")
    if added:
        differences.append(f"flags only here: {_few(added)}")
    return (
        "the runtime was chosen on another kind of host (" + "; ".join(differences) + "): "
        "its timings may not hold here; build the archive on this kind of host to choose again"
    )


def _few(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return " ".join(names[:shown]) + more


@functools.cache
def host_caps() -> HostCaps:
    """This host's capabilities (read once per process; none where there is no /proc/cpuinfo)."""
    try:
        return HostCaps.from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return HostCaps(frozenset())


def openvino_runs_bf16(host: HostCaps) -> bool:
    """Whether OpenVINO runs bf16 on ``host``: bf16 instructions, and its CPU plugin reporting
    BF16 (asked, unless ``host`` says)."""
    if not host.bf16:
        return False
    return openvino_has_bf16() if host.openvino_bf16 is None else host.openvino_bf16


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports BF16 here (imports openvino: build time only)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class Unsupported:
    """Why a host cannot run a runtime: a short code (metric label) and a sentence (log, error)."""

    code: str
    reason: str


def unsupported(runtime: str, host: HostCaps) -> Unsupported | None:
    """Why ``host`` cannot run ``runtime``, or None when it can. Checks without importing."""
    spec = runtime_spec(runtime)
    if spec.package and importlib.util.find_spec(spec.package) is None:
        return Unsupported(
            f"{spec.package}-missing",
            f"runtime {runtime} needs the {spec.package} package, which is not installed here "
            "(pip install -r requirements.txt installs it)",
        )
    if runtime == "torchscript-bf16" and not host.bf16:
        return Unsupported(
            "no-bf16",
            "runtime torchscript-bf16 needs a CPU with bf16 instructions (AVX512_BF16 or "
            "AMX-BF16); this one has none, and emulated bf16 is slower than fp32",
        )
    return None


def runtime_spec(runtime: str) -> RuntimeSpec:
    """The spec of ``runtime``; ``ValueError`` naming the known ones otherwise."""
    try:
        return RUNTIMES[runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}") from None


# --- loading ------------------------------------------------------------------------------


def select_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned to this worker when there is one, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", gpu_id)
    return torch.device("cpu")


@dataclass
class LoadedModel:
    """The model a worker serves: what runs it, where, in what precision, why not the recorded
    runtime if it fell back, and whether the runtime was chosen on another kind of host."""

    model: Model
    runtime: str
    recorded: str
    fallback: Unsupported | None = None
    where: str = "cpu"  # the device and what it is, e.g. "cpu (AMD EPYC; avx2)"
    precision: str = "fp32"
    other_host: str | None = None  # :func:`other_kind_of_host`'s sentence

    def runs_on(self) -> str:
        """Where and on what the model runs, for the worker's log."""
        return f"{self.runtime} runtime on {self.where} in {self.precision}"


def worker_runtime(
    config: ModelConfig, device: torch.device, host: HostCaps
) -> tuple[str, Unsupported | None]:
    """The runtime a worker on ``device`` serves ``config`` with, and why it is not the
    recorded one: a GPU worker runs TorchScript on its GPU (no other runtime has a GPU path:
    a CPU-only runtime would leave the GPU idle); a CPU worker falls back to fp32 TorchScript
    where ``host`` cannot run the recorded runtime."""
    if device.type == "cuda" and config.runtime != REFERENCE:
        return REFERENCE, Unsupported(
            "gpu-worker",
            f"runtime {config.runtime} runs on the CPU only, and this worker has GPU {device}: "
            f"TorchScript runs on it in {config.gpu_precision}, without the GPU parity check "
            "that an export on a GPU host makes (build the archive on this kind of host)",
        )
    refused = unsupported(config.runtime, host)
    return (REFERENCE if refused else config.runtime), refused


def load_model(
    directory: str | Path, config: ModelConfig, device: torch.device, host: HostCaps | None = None
) -> LoadedModel:
    """The model in ``directory`` (an unpacked archive or a build), in the runtime
    :func:`worker_runtime` gives ``config`` on ``device`` and ``host`` (default: this one)."""
    host = host or host_caps()
    runtime, refused = worker_runtime(config, device, host)
    model = load_runtime(runtime, Path(directory), config, device)
    return LoadedModel(
        model,
        runtime,
        config.runtime,
        refused,
        where=_device_words(device, host),
        precision=_precision(runtime, config, device, model),
        other_host=None if device.type == "cuda" else _chosen_elsewhere(config, host),
    )


def _device_words(device: torch.device, host: HostCaps) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({host.describe()})"


def _precision(runtime: str, config: ModelConfig, device: torch.device, model: Model) -> str:
    if runtime == REFERENCE and device.type == "cuda" and config.optimize:
        return config.gpu_precision
    if isinstance(model, OpenVinoModel):
        return model.precision  # fp32 where the plugin has no BF16, whatever was recorded
    return RUNTIMES[runtime].precision if runtime != "openvino" else config.openvino_precision


def _chosen_elsewhere(config: ModelConfig, host: HostCaps) -> str | None:
    """Whether the recorded runtime was chosen on another kind of host than ``host``."""
    return other_kind_of_host(config.runtime_choice.get("cpu", {}), host)


def load_runtime(runtime: str, directory: Path, config: ModelConfig, device: torch.device) -> Model:
    """``runtime``'s model from its file in ``directory``, set up as ``config`` says."""
    return load_runtime_file(runtime, directory / runtime_spec(runtime).file, config, device)


def load_runtime_file(
    runtime: str, path: str | Path, config: ModelConfig, device: torch.device
) -> Model:
    """``runtime``'s model from the file ``path``, set up as ``config`` says (no host check)."""
    if runtime == "torchscript" and device.type == "cuda" and config.optimize:
        from b4serve.serving.gpu import load_device_torchscript  # imports this module

        return load_device_torchscript(path, device, config.gpu_precision)  # half precision
    if runtime == "torchscript":
        return load_torchscript(path, device, optimize=config.optimize, fuse=config.onednn_fusion)
    if runtime == "torchscript-bf16":
        return load_torchscript_bf16(path, device)
    if runtime == "openvino":
        return OpenVinoModel(
            path,
            precision=config.openvino_precision,
            hint=config.openvino_hint,
            streams=config.openvino_streams,
            threads=config.threads,
        )
    return OnnxRuntimeModel(path, threads=config.threads or None)


def load_torchscript(
    path: str | Path, device: torch.device, *, optimize: bool = True, fuse: bool = True
) -> Model:
    """Load ``path`` on ``device`` in eval mode; ``optimize``: ``channels_last`` and frozen, and
    on the CPU with ``fuse``, run with oneDNN Graph fusion.

    Freezing inlines the weights as constants so the JIT can fold batch norms into convolutions;
    ``channels_last`` lets oneDNN convolutions on the CPU skip layout conversions. oneDNN Graph
    then fuses each convolution with its activation (SiLU) and the squeeze-excitation arithmetic,
    for more resident memory (the fused kernels keep their own prepacked weights). Whether that
    pays on a host is measured side by side by ``scripts/bench.sh`` (its in-process rows "oneDNN
    fusion" and "no fusion", and the fresh-process peaks in its memory table). It compiles on a
    shape's first calls (see :meth:`b4serve.serving.pipeline.Classifier.warm_up`).
    """
    model = torch.jit.load(str(path), map_location=device).eval()
    if not optimize:
        return model
    model = torch.jit.freeze(model.to(memory_format=torch.channels_last))
    return OneDnnFused(model) if fuse and device.type == "cpu" else model


class OneDnnFused:
    """A frozen TorchScript module whose calls run with oneDNN Graph fusion on.

    Fusion is a process-wide JIT switch, and it breaks graphs that are not frozen (a scripted
    module with its weights as attributes fails with "bad optional access"), so it is on only
    for the duration of this module's own calls.
    """

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        was_on = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            return self.module(images)
        finally:
            torch.jit.enable_onednn_fusion(was_on)


def load_torchscript_bf16(path: str | Path, device: torch.device) -> Bf16TorchScript:
    """``path`` with its weights in bf16, ``channels_last`` and frozen (batch norms folded)."""
    module = torch.jit.load(str(path), map_location=device).eval()
    module = module.to(torch.bfloat16).to(memory_format=torch.channels_last)
    return Bf16TorchScript(torch.jit.freeze(module))


class Bf16TorchScript:
    """A bf16 module called like an fp32 one: the casts live here, not in the pipeline."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # .to keeps the channels_last layout; the logits go back to fp32 for the softmax
        return self.module(images.to(torch.bfloat16)).float()


class OpenVinoModel:
    """An ONNX model compiled by OpenVINO for the CPU, called like a torch module.

    ``precision`` is what the archive's parity check ran: bf16 runs only where the CPU plugin
    reports BF16, fp32 otherwise (closer to the reference, never further). ``hint`` is OpenVINO's
    performance hint; with several streams (THROUGHPUT, or ``streams`` > 1) each image of a
    forward is its own infer request, so the streams share the batch.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "fp32",
        hint: str = "LATENCY",
        streams: int = 0,
        threads: int = 0,
    ) -> None:
        import openvino  # installed by default; unsupported() checks it before we get here

        core = openvino.Core()
        self.precision = "bf16" if precision == "bf16" and openvino_has_bf16() else "fp32"
        settings: dict[str, object] = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
        }
        if streams:
            settings["NUM_STREAMS"] = streams
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", settings)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.request = self.compiled.create_infer_request()
        self.queue = None
        self._outputs: list[np.ndarray] = []
        if self.streams > 1:  # one request per stream, each image its own
            self.queue = openvino.AsyncInferQueue(self.compiled, self.streams)
            self.queue.set_callback(self._collect)

    def _collect(self, request: object, index: int) -> None:
        self._outputs[index] = request.get_output_tensor(0).data.copy()  # type: ignore[attr-defined]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().cpu().contiguous().numpy()
        if self.queue is None or len(batch) == 1:
            # the output buffer is the request's own, reused by the next call: copy it out
            return torch.from_numpy(self.request.infer({0: batch})[0].copy())
        self._outputs = [np.empty(0)] * len(batch)
        for index in range(len(batch)):
            self.queue.start_async({0: batch[index : index + 1]}, index)
        self.queue.wait_all()
        return torch.from_numpy(np.concatenate(self._outputs))


class OnnxRuntimeModel:
    """An ONNX model run by ONNX Runtime on the CPU (float32), called like a torch module."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime  # installed by default; unsupported() checks it before we get here

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.detach().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def micro_batch_size(configured: int, device: torch.device) -> int | None:
    """Images per forward pass: ``configured``, else 1 on the CPU and all (None) on a GPU.

    1 for every CPU runtime: each ran as fast or faster per image at 1 as at 2 or 4, measured
    in-process on a 2-core AVX512_BF16 EPYC (a noisy one-off, 2026-12-01: OpenVINO bf16 24.6,
    24.5, 23.3 TTA images/s at 1, 2, 4; the issue's run: TorchScript 5.5 at 1, 3.7 at 4).
    ``scripts/bench.sh --layout`` measures it again per runtime.
    """
    if configured > 0:
        return configured
    return 1 if device.type == "cpu" else None
