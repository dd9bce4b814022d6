"""The architectures we serve, as data: input size and normalisation travel with each one."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "ArchSpec", "arch_spec"]

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
