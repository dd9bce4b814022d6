"""Which gen-efficientnet variant a checkpoint holds, and where its network is inside it.

A whole module says everything: its padding layers, batch-norm eps, widths and depths. A state
dict says only the size (b0-b4, lite0-lite4): its keys and shapes are the same for every padding
variant, so ``--arch`` decides, and export warns when it was not given (:func:`choose_arch`).
A checkpoint of another library (b4serve.build.foreign) arrives here already in gen-efficientnet's
keys, with what its library fixes (padding, eps, preprocessing) filled in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from b4serve.build.models import create_model
from b4serve.serving.archs import (
    ARCHS,
    IMAGENET_MEAN,
    LITE_SCALES,
    SCALES,
    TF_SAME,
    ArchSpec,
    arch_spec,
)

__all__ = [
    "ALL_SCALES",
    "NETWORK_PARTS",
    "Choice",
    "Network",
    "VariantError",
    "choose_arch",
    "find_network",
    "network_of_module",
    "network_of_state_dict",
    "shape_differences",
    "split_prefix",
]

# The attributes every gen-efficientnet network has (GenEfficientNet.__init__)
NETWORK_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier")
_STEM_KEY = "conv_stem.weight"
_HEAD_PREFIX = "classifier."  # its shape depends on the class count, not on the variant
_PADDING_WORDS = {TF_SAME: "TensorFlow 'same' padding", "symmetric": "symmetric padding"}
ALL_SCALES = (*SCALES, *LITE_SCALES)


class VariantError(ValueError):
    """The checkpoint's network fits no known arch, or not the one asked for (one line)."""


@dataclass(frozen=True)
class Network:
    """What a checkpoint shows of its network; ``None`` where it cannot tell."""

    scale: str | None  # the b0-b4/lite0-4 whose widths and depths the weights have; None: none
    padding: str | None = None  # a state dict cannot tell
    bn_eps: tuple[float, ...] | None = None  # every distinct eps of its batch norms
    # the (mean, std) the checkpoint's library feeds its networks; None: it does not say
    feeding: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def fits(self, spec: ArchSpec) -> bool:
        """Whether ``spec`` builds this network (so its weights load and its logits match)."""
        return (
            self.scale == spec.scale
            and self.padding in (None, spec.padding)
            and (self.bn_eps is None or _same_eps(self.bn_eps, spec.bn_eps))
        )

    def describe(self) -> str:
        """What it is, in words, for messages: 'b4 widths and depths, ..., batch-norm eps 0.001'."""
        size = (
            f"{self.scale} widths and depths"
            if self.scale
            else "widths and depths of no b0-b4 or lite0-lite4"
        )
        parts = [size]
        if self.padding is not None:
            parts.append(_PADDING_WORDS[self.padding])
        if self.bn_eps is not None:
            eps = " and ".join(f"{e:g}" for e in self.bn_eps) or "none"
            parts.append(f"batch-norm eps {eps}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Choice:
    """The arch export uses, and the warning to show when the checkpoint fits others too."""

    arch: str
    warning: str | None = None


def describe_spec(spec: ArchSpec) -> str:
    return (
        f"{spec.scale} widths and depths, {_PADDING_WORDS[spec.padding]}, "
        f"batch-norm eps {spec.bn_eps:g}"
    )


def find_network(module: nn.Module) -> tuple[str, nn.Module]:
    """The one gen-efficientnet network in ``module`` (itself, or a wrapper's submodule) and
    its path inside it ('' for itself); raise :class:`VariantError` for none or several."""
    found = [
        (name, sub)
        for name, sub in module.named_modules()
        if all(isinstance(getattr(sub, part, None), nn.Module) for part in NETWORK_PARTS)
    ]
    if not found:
        raise VariantError(
            f"the checkpoint's {type(module).__name__} module holds no gen-efficientnet network "
            f"(a module with {', '.join(NETWORK_PARTS)})"
        )
    if len(found) > 1:
        names = ", ".join(repr(name or "<itself>") for name, _ in found)
        raise VariantError(
            f"the checkpoint's {type(module).__name__} module holds {len(found)} gen-efficientnet "
            f"networks ({names}): save the one you serve on its own"
        )
    return found[0]


def network_of_module(network: nn.Module) -> Network:
    """Size, padding and batch-norm eps of a gen-efficientnet network module."""
    same = any(type(m).__name__.startswith("Conv2dSame") for m in network.modules())
    eps = sorted({float(m.eps) for m in network.modules() if isinstance(m, nn.BatchNorm2d)})
    return Network(
        scale=scale_of(network.state_dict()),
        padding=TF_SAME if same else "symmetric",
        bn_eps=tuple(eps),
    )


def network_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Network:
    """A state dict's network: its size only (its keys fit every padding variant)."""
    return Network(scale=scale_of(state_dict))


def split_prefix(
    state_dict: Mapping[str, torch.Tensor],
    stem: str = _STEM_KEY,
    library: str = "gen-efficientnet",
) -> tuple[str, dict[str, torch.Tensor]]:
    """The prefix all keys share before the network's own (e.g. 'module.', 'model.',
    'module.backbone.') and the keys without it; ('', unchanged) when there is none. ``stem``
    is the key of ``library``'s first layer, which the prefix is read from."""
    stems = [key for key in state_dict if key == stem or key.endswith("." + stem)]
    if len(stems) > 1:
        prefixes = ", ".join(repr(key[: -len(stem)]) for key in stems)
        raise VariantError(
            f"the state dict holds {len(stems)} {library} networks (key prefixes "
            f"{prefixes}): save the one you serve on its own"
        )
    prefix = stems[0][: -len(stem)] if stems else ""
    if not prefix:
        return "", dict(state_dict)
    outside = [key for key in state_dict if not key.startswith(prefix)]
    if outside:
        raise VariantError(
            f"the state dict holds {len(outside)} keys outside its network's prefix {prefix!r} "
            f"(first {outside[0]!r}): layers the service cannot rebuild; save the network alone"
        )
    return prefix, {key[len(prefix) :]: value for key, value in state_dict.items()}


def scale_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The b0-b4 whose keys and shapes (the head aside) the state dict has exactly, or None."""
    shapes = _shapes_of(state_dict)
    return next((scale for scale in ALL_SCALES if _backbone_shapes(scale) == shapes), None)


def closest_scale(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The size the state dict is nearest to, and how it differs from it (for errors)."""
    found = _shapes_of(state_dict)
    counted = [(shape_differences(_backbone_shapes(s), found), s) for s in ALL_SCALES]
    (_, details), scale = min(counted, key=lambda item: (item[0][0], ALL_SCALES.index(item[1])))
    return scale, details


def choose_arch(requested: str | None, network: Network, *, source: str) -> Choice:
    """The arch to export ``network`` as: ``requested`` if it fits, else the first known arch
    that fits, with a warning when others fit too but would serve different answers.

    ``source`` names what the network came from ('module', 'state dict') in messages.
    """
    fitting = [spec for spec in ARCHS.values() if network.fits(spec)]
    if requested is not None:
        spec = arch_spec(requested)
        if network.scale is not None and not network.fits(spec):
            raise VariantError(
                f"checkpoint does not match {requested}: its {source} has "
                f"{network.describe()}, {requested} has {describe_spec(spec)}; "
                + _would_match(fitting)
            )
        return Choice(requested)
    if not fitting:
        raise VariantError(
            f"the checkpoint's {source} fits no known arch: it has {network.describe()}; "
            f"known: {', '.join(ARCHS)}"
        )
    fed = [spec for spec in fitting if (spec.mean, spec.std) == network.feeding]
    fitting = fed or fitting  # its library's own preprocessing, where the library says it
    chosen = fitting[0]
    differing = _differences(chosen, fitting)
    if not differing:
        return Choice(chosen.name)
    names = ", ".join(spec.name for spec in fitting)
    why = " (its keys cannot tell them apart)" if network.padding is None else ""
    hint = (
        "; a B4 fine-tuned from geffnet's pretrained weights is a tf_ variant"
        if network.padding is None
        else ""
    )
    return Choice(
        chosen.name,
        f"the checkpoint's {source} fits {names}{why}, which differ in {' and '.join(differing)}: "
        f"exporting {chosen.name} ({_traits(chosen, differing)}); pass --arch to choose{hint}",
    )


def shape_differences(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> tuple[int, str]:
    """How many keys differ between two key -> shape maps, and the first of each kind, in words."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{key}: expected {expected[key]}, found {found[key]}"
        for key in expected
        if key in found and tuple(expected[key]) != tuple(found[key])
    ]
    details = "; ".join(
        part
        for part in (
            f"{len(wrong)} shape mismatches, first {wrong[0]}" if wrong else "",
            f"{len(missing)} missing keys, first {missing[0]}" if missing else "",
            f"{len(unexpected)} unexpected keys, first {unexpected[0]}" if unexpected else "",
        )
        if part
    )
    return len(missing) + len(unexpected) + len(wrong), details


def _would_match(fitting: list[ArchSpec]) -> str:
    if not fitting:
        return "no known arch matches it"
    return f"{' or '.join(spec.name for spec in fitting)} would match"


def _differences(chosen: ArchSpec, fitting: list[ArchSpec]) -> list[str]:
    """What the other fitting archs would serve differently from ``chosen``."""
    words = []
    others = [spec for spec in fitting if spec != chosen]
    if any(spec.padding != chosen.padding for spec in others):
        words.append("padding")
    if any(not math.isclose(spec.bn_eps, chosen.bn_eps) for spec in others):
        words.append("batch-norm eps")
    if any(spec.input_size != chosen.input_size for spec in others):
        words.append("input size")
    if any((spec.mean, spec.std) != (chosen.mean, chosen.std) for spec in others):
        words.append("mean/std")
    return words


def _traits(spec: ArchSpec, differing: list[str]) -> str:
    """``spec``'s values of the ``differing`` traits, in words."""
    words = []
    if "padding" in differing:
        words.append(_PADDING_WORDS[spec.padding])
    if "batch-norm eps" in differing:
        words.append(f"batch-norm eps {spec.bn_eps:g}")
    if "input size" in differing:
        words.append(f"{spec.input_size} px")
    if "mean/std" in differing:
        words.append("ImageNet mean/std" if spec.mean == IMAGENET_MEAN else f"mean {spec.mean}")
    return ", ".join(words)


def _same_eps(found: tuple[float, ...], expected: float) -> bool:
    return len(found) == 1 and math.isclose(found[0], expected, rel_tol=1e-6)


def _shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.startswith(_HEAD_PREFIX) and isinstance(value, torch.Tensor)
    }


@functools.cache
def _backbone_shapes(scale: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a ``scale`` network without its head (the same for every variant)."""
    arch = next(spec.name for spec in ARCHS.values() if spec.scale == scale)
    return _shapes_of(create_model(arch, 1).state_dict())
