"""Model factory: gen-efficientnet networks built for export (scriptable or ONNX-exportable)."""

from __future__ import annotations

import torch
from torch import nn

from b4serve.serving.archs import arch_spec

__all__ = [
    "classifier_of",
    "create_model",
    "pooled_features",
]


def create_model(arch: str, num_classes: int, *, exportable: bool = False) -> nn.Module:
    """Build a randomly initialised ``arch`` with ``num_classes`` outputs, in eval mode.

    ``exportable`` builds the ONNX-friendly variant (static same-padding); otherwise the model is
    built scriptable so that ``torch.jit.script`` accepts it.
    """
    import geffnet  # imported here so the serving path (TorchScript only) never needs geffnet

    arch_spec(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    layer_flag = geffnet.config.set_exportable if exportable else geffnet.config.set_scriptable
    with layer_flag(True):
        model = geffnet.create_model(arch, pretrained=False, num_classes=num_classes)
    return model.eval()


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer of a gen-efficientnet model."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear 'classifier' head")
    return head


@torch.inference_mode()
def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Globally pooled penultimate features (the classifier's input) for a batch of images."""
    return model.global_pool(model.features(images)).flatten(1)
