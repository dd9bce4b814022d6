"""Load the archive's model once per worker (TorchScript, or ONNX Runtime), ready to call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "RUNTIMES",
    "Model",
    "OnnxRuntimeModel",
    "load_model",
    "load_torchscript",
    "micro_batch_size",
    "select_device",
]

# How the archive's model file is run; TorchScript is the default and the reference.
RUNTIMES = {"torchscript": "model.pt", "onnxruntime": "model.onnx"}

Model = Callable[[torch.Tensor], torch.Tensor]


def select_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned to this worker when there is one, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", gpu_id)
    return torch.device("cpu")


def load_torchscript(
    path: str | Path, device: torch.device, *, optimize: bool = True
) -> torch.jit.ScriptModule:
    """Load ``path`` on ``device`` in eval mode, ``channels_last`` and frozen when ``optimize``.

    Freezing inlines the weights as constants so the JIT can fold batch norms into convolutions;
    ``channels_last`` lets oneDNN convolutions on the CPU skip layout conversions. Measured on a
    2-core CPU, the two together run B4 about 3x faster than the plain scripted model.
    """
    model = torch.jit.load(str(path), map_location=device).eval()
    if not optimize:
        return model
    model = model.to(memory_format=torch.channels_last)
    return torch.jit.freeze(model)


def micro_batch_size(configured: int, device: torch.device) -> int | None:
    """Images per forward pass: ``configured``, else 1 on the CPU and all (None) on a GPU."""
    if configured > 0:
        return configured
    return 1 if device.type == "cpu" else None


class OnnxRuntimeModel:
    """An ONNX model run by ONNX Runtime on the CPU (float32), called like a torch module."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime  # optional: only archives built with --runtime onnxruntime need it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.detach().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def load_model(
    path: str | Path, runtime: str, device: torch.device, *, optimize: bool = True
) -> Model:
    """The archive's model, ready to call: TorchScript on ``device``, or ONNX Runtime on the CPU."""
    if runtime == "onnxruntime":
        return OnnxRuntimeModel(path)
    if runtime != "torchscript":
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return load_torchscript(path, device, optimize=optimize)
