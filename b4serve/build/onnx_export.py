"""Export to ONNX for the optional ONNX Runtime runtime, checked against the eager model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from b4serve.build.models import create_model
from b4serve.build.parity import Agreement, agreement, check_images
from b4serve.serving.config import ModelConfig
from b4serve.serving.preprocess import Preprocessor, stack_channels_last
from b4serve.serving.runtime import OnnxRuntimeModel
from b4serve.serving.tta import tta_probabilities

__all__ = ["export_onnx"]

_CHUNK = 4  # images per forward of the check: memory stays bounded at a B4's 380 px


def export_onnx(model: nn.Module, config: ModelConfig, path: Path) -> float:
    """Write ``model`` to ``path`` as ONNX and return its max abs probability difference.

    The ONNX graph comes from the eager model rebuilt with geffnet's exportable layers (static
    same-padding), not from the TorchScript one, which the ONNX exporter cannot convert. ONNX
    Runtime (float32) is checked against the eager ``model`` on the check set through the shared
    preprocessing, by the one parity (b4serve.build.parity: fp32 tolerance, flip TTA).
    """
    exportable = create_model(config.arch, config.num_classes, exportable=True)
    exportable.load_state_dict(model.state_dict())
    example = torch.zeros(1, 3, config.input_size, config.input_size)
    with torch.inference_mode():
        # geffnet's Conv2dSameExport (tf_ variants) sets its padding on its first call; traced
        # on that call, the graph comes out wrong (0.27 max logit error measured on a B4)
        exportable(example)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        exportable,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,  # the TorchScript-based exporter handles geffnet's layers as they are
    )
    found = _check_parity(model, OnnxRuntimeModel(path), config)
    if not found.passed:
        raise ValueError(f"ONNX export differs from eager: {found.failure()}")
    return found.max_difference


def _check_parity(model: nn.Module, onnx_model: OnnxRuntimeModel, config: ModelConfig) -> Agreement:
    preprocess = Preprocessor(config)
    tensors = [preprocess(image) for _, image in check_images(config)]
    expected, got = [], []
    with torch.inference_mode():
        for start in range(0, len(tensors), _CHUNK):
            batch = stack_channels_last(tensors[start : start + _CHUNK]).contiguous()
            expected.append(tta_probabilities(model, batch))
            got.append(tta_probabilities(onnx_model, batch))
    return agreement(torch.cat(got), torch.cat(expected), "fp32")
