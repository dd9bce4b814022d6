"""Load the exported TorchScript model once per worker, ready for fast inference."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_torchscript", "micro_batch_size", "select_device"]


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
