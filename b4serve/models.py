"""Model factory: the architectures we serve and the preprocessing that travels with each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "ArchSpec",
    "arch_spec",
    "classifier_of",
    "create_model",
    "pooled_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """What a caller must know to feed an architecture: its native input size and normalisation."""

    name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# gen-efficientnet's native resolutions; the PyTorch-trained variants use ImageNet mean/std.
ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("efficientnet_b0", 224),
        ArchSpec("efficientnet_b1", 240),
        ArchSpec("efficientnet_b2", 260),
        ArchSpec("efficientnet_b3", 300),
        ArchSpec("efficientnet_b4", 380),
    )
}


def arch_spec(arch: str) -> ArchSpec:
    """Return the spec of ``arch``; raise ``ValueError`` naming the known ones otherwise."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}") from None


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
