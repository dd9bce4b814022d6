"""The architectures we serve, as data: what defines each variant travels with its name.

gen-efficientnet builds each EfficientNet size (b0-b4, which set the widths and depths) in two
network forms that share state-dict keys and shapes: its own PyTorch-trained ``efficientnet_bN``
(symmetric padding, batch-norm eps 1e-5) and the TensorFlow ports ``tf_efficientnet_bN``,
``..._ap`` (AdvProp) and ``..._ns`` (Noisy Student) (TensorFlow "same" padding, eps 1e-3).
geffnet 1.0.2 has ImageNet weights for the ``tf_`` B4s only, so a fine-tuned B4 is usually one of
them. The Lite sizes (``tf_efficientnet_lite0``-``lite4``: ReLU6, no squeeze-excite, stem and head
fixed) are TensorFlow ports too. Input size and normalisation follow timm's published configs for
the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHS",
    "BN_EPS_PYTORCH",
    "BN_EPS_TF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "LITE_SCALES",
    "PADDINGS",
    "SCALES",
    "SYMMETRIC",
    "TF_SAME",
    "ArchSpec",
    "arch_spec",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's Inception preprocessing, x / 127.5 - 1: what the AdvProp weights were trained with
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

SYMMETRIC = "symmetric"  # PyTorch: k // 2 zeros on every side
TF_SAME = "tf_same"  # TensorFlow "SAME": zeros computed from the input size, extra one after
PADDINGS = (SYMMETRIC, TF_SAME)
BN_EPS_PYTORCH = 1e-5
BN_EPS_TF = 1e-3

# EfficientNet size -> native input resolution (the widths and depths are geffnet's)
SCALES: dict[str, int] = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380}
# EfficientNet-Lite size -> native input resolution (timm's tf_efficientnet_liteN configs)
LITE_SCALES: dict[str, int] = {
    "lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300,
}  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """One variant: its network (size, padding, batch-norm eps) and how its inputs are fed."""

    name: str
    scale: str  # "b0".."b4", "lite0".."lite4": widths and depths, so the state dict's shapes
    input_size: int
    padding: str = SYMMETRIC
    bn_eps: float = BN_EPS_PYTORCH
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def network(self) -> tuple[str, str, float]:
        """What the layers compute: variants with the same network take the same weights and
        give the same logits; they may still differ in how inputs are fed."""
        return (self.scale, self.padding, self.bn_eps)

    @property
    def feeding(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """What the service does to an image before the network sees it."""
        return (self.input_size, self.mean, self.std)


def _variants() -> list[ArchSpec]:
    specs: list[ArchSpec] = []
    for prefix, suffix, padding, eps, mean, std in (
        ("efficientnet", "", SYMMETRIC, BN_EPS_PYTORCH, IMAGENET_MEAN, IMAGENET_STD),
        ("tf_efficientnet", "", TF_SAME, BN_EPS_TF, IMAGENET_MEAN, IMAGENET_STD),
        ("tf_efficientnet", "_ap", TF_SAME, BN_EPS_TF, INCEPTION_MEAN, INCEPTION_STD),
        ("tf_efficientnet", "_ns", TF_SAME, BN_EPS_TF, IMAGENET_MEAN, IMAGENET_STD),
    ):
        specs += [
            ArchSpec(f"{prefix}_{scale}{suffix}", scale, size, padding, eps, mean, std)
            for scale, size in SCALES.items()
        ]
    # TensorFlow's Lite preprocessing, (x - 127) / 128: timm publishes it as Inception's
    specs += [
        ArchSpec(f"tf_efficientnet_{scale}", scale, size, TF_SAME, BN_EPS_TF, INCEPTION_MEAN,
                 INCEPTION_STD)
        for scale, size in LITE_SCALES.items()
    ]  # fmt: skip
    return specs


# In order of preference when a checkpoint fits several (see b4serve.build.variants).
ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in _variants()}


def arch_spec(arch: str) -> ArchSpec:
    """Return the spec of ``arch``; raise ``ValueError`` naming the known ones otherwise."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None
