"""Checkpoints of efficientnet_pytorch (``EfficientNet.from_name``/``from_pretrained``), and of
efficientnet_lite_pytorch, which saves the same keys, mapped onto gen-efficientnet's networks.

Their keys (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, ...) name the same layers as
gen-efficientnet's (``conv_stem``, ``blocks.S.I.conv_dw``, ``classifier``, ...), one to one, in
the same order: the blocks are numbered flat where gen-efficientnet groups them in stages, and a
stage starts where the output width changes. The library only builds TensorFlow's "same" padding
with batch-norm eps 1e-3 (its default), and documents ImageNet's mean/std as its preprocessing,
so its networks are gen-efficientnet's ``tf_`` ports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from b4serve.build.variants import Network, VariantError, scale_of
from b4serve.serving.archs import BN_EPS_TF, IMAGENET_MEAN, IMAGENET_STD, TF_SAME

__all__ = [
    "LIBRARY",
    "STEM_KEY",
    "find_efficientnet_pytorch",
    "input_size_of",
    "is_efficientnet_pytorch",
    "network_of_efficientnet_pytorch",
    "to_geffnet_keys",
]

LIBRARY = "efficientnet_pytorch"
STEM_KEY = "_conv_stem.weight"
# The attributes every efficientnet_pytorch network has (EfficientNet.__init__); _fc only with
# include_top, which a classifier needs.
_PARTS = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}  # fmt: skip
_SQUEEZE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
# gen-efficientnet's InvertedResidual (an expansion) and DepthwiseSeparableConv (none)
_EXPANDING = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
              "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3", **_SQUEEZE}  # fmt: skip
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2", **_SQUEEZE}  # fmt: skip
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"(_\w+)\.(\w+)$")


def is_efficientnet_pytorch(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict (its prefix not yet stripped) has efficientnet_pytorch's keys."""
    return any(key == STEM_KEY or key.endswith("." + STEM_KEY) for key in state_dict)


def find_efficientnet_pytorch(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The one efficientnet_pytorch network in ``module`` (itself or a wrapper's submodule) and
    its path in it; None for none; :class:`VariantError` for several."""
    found = [
        (name, sub)
        for name, sub in module.named_modules()
        if all(isinstance(getattr(sub, part, None), nn.Module) for part in _PARTS)
    ]
    if len(found) > 1:
        names = ", ".join(repr(name or "<itself>") for name, _ in found)
        raise VariantError(
            f"the checkpoint's {type(module).__name__} module holds {len(found)} "
            f"efficientnet_pytorch networks ({names}): save the one you serve on its own"
        )
    return found[0] if found else None


def to_geffnet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under gen-efficientnet's keys; :class:`VariantError` naming the first
    key that is no efficientnet_pytorch layer (e.g. a network built without its head)."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        block, top = _BLOCK_KEY.match(key), _TOP_KEY.match(key)
        if block:
            blocks.setdefault(int(block[1]), {})[f"{block[2]}.{block[3]}"] = value
        elif top and top[1] in _TOP:
            converted[f"{_TOP[top[1]]}.{top[2]}"] = value
        else:
            raise VariantError(f"the efficientnet_pytorch state dict has a key {key!r} of no layer")
    if "classifier.weight" not in converted:
        raise VariantError("the efficientnet_pytorch network has no _fc head (include_top=False)")
    if sorted(blocks) != list(range(len(blocks))):
        raise VariantError(f"the efficientnet_pytorch blocks are not numbered 0-{len(blocks) - 1}")
    ordered = [blocks[number] for number in sorted(blocks)]
    for (stage, index), layers in zip(_stages(ordered), ordered, strict=True):
        names = _EXPANDING if "_expand_conv.weight" in layers else _SEPARABLE
        for key, value in layers.items():
            layer, tensor = key.split(".", 1)
            if layer not in names:
                raise VariantError(f"the efficientnet_pytorch block has a layer {layer!r}")
            converted[f"blocks.{stage}.{index}.{names[layer]}.{tensor}"] = value
    return converted


def network_of_efficientnet_pytorch(
    converted: Mapping[str, torch.Tensor], network: nn.Module | None = None
) -> Network:
    """What an efficientnet_pytorch network is in gen-efficientnet's terms: its size from its
    (converted) keys; from a module also its batch-norm eps (a state dict: the library's 1e-3)."""
    eps = (BN_EPS_TF,)
    if network is not None:
        norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
        eps = tuple(sorted({float(norm.eps) for norm in norms}))
    return Network(
        scale=scale_of(converted),
        padding=TF_SAME,  # the library pads only this way (static or dynamic "same")
        bn_eps=eps,
        feeding=(IMAGENET_MEAN, IMAGENET_STD),
    )


def input_size_of(network: nn.Module) -> int | None:
    """The input size a module's static "same" padding was computed for (the library's default
    when built with an image size, as ``from_name`` does); None when it pads dynamically."""
    static = any(type(m).__name__ == "Conv2dStaticSamePadding" for m in network.modules())
    size = getattr(getattr(network, "_global_params", None), "image_size", None)
    if not static or size is None:
        return None
    return size if isinstance(size, int) else int(size[0])


def _stages(blocks: list[Mapping[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """(stage, index in stage) of each block: a stage starts where the output width changes."""
    places: list[tuple[int, int]] = []
    width = None
    for number, layers in enumerate(blocks):
        projection = layers.get("_project_conv.weight")
        if projection is None:
            raise VariantError(f"the efficientnet_pytorch block {number} has no _project_conv")
        stage, index = places[-1] if places else (-1, 0)
        new_stage = projection.shape[0] != width
        places.append((stage + 1, 0) if new_stage else (stage, index + 1))
        width = projection.shape[0]
    return places
