"""One parity for every check a build runs: one check set, one quantity, one table of tolerances.

The quantity is the max |difference of the class probabilities| a model gives, averaged over
flip TTA as the worker answers (:func:`b4serve.serving.tta.tta_probabilities`), to those of a
reference, over every image and class. The tolerance depends on the precision the model runs in
(:data:`TOLERANCES`); in reduced precision every image must also keep its top-1 class.

Who checks what, against what, on which images:

- **Export proof** (:func:`prove_exported_files`): each model file export wrote, as written and
  as the CPU worker loads it, against the user's own module (unpickled, else rebuilt from the
  state dict), on :data:`PROBE_IMAGES` fixed probe images: fp32.
- **Runtime choice** (b4serve.build.runtimes): each candidate through the serving pipeline
  against fp32 TorchScript through the same pipeline, on :func:`check_images`: its precision.
- **ONNX check** (b4serve.build.onnx_export): ONNX Runtime against the eager model, right
  after the ONNX export and before any runtime is timed on it, on the probe images: fp32.
- **GPU check** (b4serve.build.gpu_parity): the GPU path on the device against fp32 TorchScript
  on the CPU, the same ``.npy`` bodies through both, on :func:`check_images`: the GPU precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from b4serve.build.check_images import DEMO_CLASSES, EXAMPLES_SEED, generate_images
from b4serve.build.checkpoint import CheckpointError
from b4serve.serving.codec import decode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import InferenceError
from b4serve.serving.pipeline import WARM_UP_CALLS
from b4serve.serving.runtime import OnnxRuntimeModel, load_torchscript
from b4serve.serving.tta import tta_probabilities

__all__ = [
    "MAX_CHECK_IMAGES",
    "PROBE_IMAGES",
    "QUANTITY",
    "TOLERANCES",
    "Agreement",
    "CheckImagesError",
    "ParityError",
    "ParityProbe",
    "agreement",
    "check_images",
    "probe_batch",
    "probe_images",
    "prove_exported_files",
    "tolerance",
    "varied_images",
]

QUANTITY = "max |probability difference|"
# Per precision the model runs in, on QUANTITY. fp32 is rounding alone (correct fp32 runtimes
# measured <= 2e-6 on the check set, docs/RUNTIMES.md); fp16 keeps 11 bits of mantissa and
# bf16 8, and the DEMO B4 in bf16 measured 3.9e-2 on the CPU (docs/GPU.md): refused.
# tf32: fp32 on a GPU, whose convolutions PyTorch runs in TF32 by default (10 bits of mantissa).
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 2e-2}
REDUCED = ("tf32", "fp16", "bf16")  # these must also keep every image's top-1 class
MAX_CHECK_IMAGES = 24  # of the user's own; more adds build time, not much proof
PROBE_IMAGES = 2  # the shape a lone image and its mirror make: what the CPU worker runs
_PROBE_SEED = 13
DEMO_EXAMPLES_PER_CLASS = 1

Model = Callable[[torch.Tensor], torch.Tensor]


class ParityError(CheckpointError):
    """An exported model does not reproduce the reference; the message says by how much."""


class CheckImagesError(ValueError):  # export reports a ValueError in one line
    """The user's check images cannot be used: none there, or one the server would refuse."""


def tolerance(precision: str, reduced: float | None = None) -> float:
    """The tolerance for a model running in ``precision``; ``reduced`` (the user's
    ``--reduced-tolerance``) replaces bf16's."""
    if precision == "bf16" and reduced is not None:
        return reduced
    return TOLERANCES[precision]


# --- the images ---------------------------------------------------------------------------


def probe_images(input_size: int, images: int = PROBE_IMAGES) -> torch.Tensor:
    """The fixed probe images, uint8 NHWC: smooth random colour fields with sharp-edged blocks
    and pixel noise, like photographs in what the network sees (regions, edges, texture, and
    content up to every border, where the padding variants differ)."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    fields = torch.rand(images, 3, 6, 6, generator=generator)
    smooth = F.interpolate(fields, size=(input_size, input_size), mode="bicubic")
    blocks = F.interpolate(torch.rand(images, 3, 5, 5, generator=generator), size=smooth.shape[2:])
    texture = 0.05 * torch.randn(smooth.shape, generator=generator)
    pixels = (0.6 * smooth + 0.4 * blocks + texture).clamp(0, 1).mul(255).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1)


def probe_batch(
    input_size: int, mean: Sequence[float], std: Sequence[float], images: int = PROBE_IMAGES
) -> torch.Tensor:
    """The probe images normalised with ``mean`` and ``std``, as NCHW float32."""
    batch = probe_images(input_size, images).permute(0, 3, 1, 2).float().div(255)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def varied_images(size: int) -> list[tuple[str, np.ndarray]]:
    """Varied inputs the server accepts: flat, extreme, noisy, striped, resized, float, grey."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                         np.full((size, size), 128.0, np.float32)], axis=2)  # fmt: skip
    squares = (np.indices((size, size)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8)
    return [
        ("black", np.zeros((size, size, 3), np.uint8)),
        ("white", np.full((size, size, 3), 255, np.uint8)),
        ("noise", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        ("gradient", gradient.astype(np.uint8)),
        ("checkerboard grey", squares),
        ("small float, resized", rng.random((97, 131, 3), dtype=np.float32)),
    ]


def check_images(
    config: ModelConfig, directory: str | Path | None = None
) -> list[tuple[str, np.ndarray]]:
    """The check set, named and decoded as the server would take them: the user's ``.npy``
    files in ``directory`` (the first :data:`MAX_CHECK_IMAGES` by name), else one demo example
    of each class, the probe images and :func:`varied_images`."""
    if directory is not None:
        return _users_images(Path(directory), config.max_pixels)
    size = config.input_size
    images, labels = generate_images(DEMO_EXAMPLES_PER_CLASS, EXAMPLES_SEED, size)
    demo = [
        (f"demo {DEMO_CLASSES[label]}", image) for image, label in zip(images, labels, strict=True)
    ]
    probes = [(f"probe {i + 1}", image.numpy()) for i, image in enumerate(probe_images(size))]
    return demo + probes + varied_images(size)


def _users_images(directory: Path, max_pixels: int) -> list[tuple[str, np.ndarray]]:
    paths = sorted(directory.glob("*.npy"))[:MAX_CHECK_IMAGES]
    if not paths:
        raise CheckImagesError(f"--check-images {directory}: no .npy files there")
    found = []
    for path in paths:
        try:  # as the server would take it
            found.append((path.name, decode_npy(path.read_bytes(), max_pixels)))
        except InferenceError as error:
            raise CheckImagesError(
                f"--check-images: the server would refuse {path}: {error}"
            ) from None
    return found


# --- the comparison -----------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How one model's probabilities compared with the reference's, judged for ``precision``."""

    precision: str
    images: int
    max_difference: float  # QUANTITY over every image and class; inf for NaN or a wrong shape
    top1_mismatches: tuple[int, ...]  # indices of the images whose top-1 class differs
    tolerance: float

    @property
    def passed(self) -> bool:
        if not self.max_difference <= self.tolerance:
            return False
        return self.precision not in REDUCED or not self.top1_mismatches

    def failure(self) -> str:
        """Why it failed, in words ("" when it passed)."""
        if not self.max_difference <= self.tolerance:
            return (
                f"{QUANTITY} {self.max_difference:.3g} is over {self.tolerance:g} "
                f"({self.precision})"
            )
        if not self.passed:
            return (
                f"top-1 differs on {len(self.top1_mismatches)} of {self.images} check images "
                f"({self.precision}: every one must keep it)"
            )
        return ""


def agreement(
    got: torch.Tensor | np.ndarray,
    expected: torch.Tensor | np.ndarray,
    precision: str,
    reduced: float | None = None,
) -> Agreement:
    """``got`` against ``expected`` (probabilities, images x classes), judged for ``precision``
    by :data:`TOLERANCES` (``reduced``: the user's bf16 tolerance)."""
    got, expected = torch.as_tensor(got).double(), torch.as_tensor(expected).double()
    limit = tolerance(precision, reduced)
    if got.shape != expected.shape:
        return Agreement(precision, len(expected), math.inf, (), limit)
    difference = (got - expected).abs().max().item() if got.numel() else 0.0
    if math.isnan(difference):
        difference = math.inf  # NaN never passes; inf says so in the figures too
    mismatches = torch.nonzero(got.argmax(1) != expected.argmax(1)).flatten().tolist()
    return Agreement(precision, len(expected), difference, tuple(mismatches), limit)


# --- the export proof ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParityProbe:
    """A probe batch and the reference's probabilities for it, computed once for every model
    proven."""

    batch: torch.Tensor
    expected: torch.Tensor
    against: str  # the reference in words, e.g. "your module"
    hint: str = ""  # added to a failure: what to try

    @classmethod
    def of(
        cls, reference: Model, config: ModelConfig, *, against: str, hint: str = ""
    ) -> ParityProbe:
        """The probe for ``config``'s input size and normalisation, and ``reference``'s
        probabilities (flip TTA)."""
        batch = probe_batch(config.input_size, config.mean, config.std)
        with torch.inference_mode():
            expected = torch.cat([tta_probabilities(reference, image[None]) for image in batch])
        return cls(batch, expected, against, hint)

    def difference(self, model: Model, *, calls: int = 1) -> float:
        """:data:`QUANTITY` of ``model`` to the reference over ``calls`` calls (a JIT compiles
        on its first calls: each one must match); inf for NaN or a wrong shape."""
        worst = 0.0
        with torch.inference_mode():
            for _ in range(calls):
                # one image and its mirror a forward, as the CPU worker runs them
                got = torch.cat([tta_probabilities(model, image[None]) for image in self.batch])
                found = agreement(got, self.expected, "fp32")
                if math.isinf(found.max_difference):
                    return found.max_difference
                worst = max(worst, found.max_difference)
        return worst

    def prove(
        self,
        model: Model,
        what: str,
        *,
        limit: float = TOLERANCES["fp32"],
        calls: int = 1,
        hint: str | None = None,
    ) -> float:
        """``model``'s difference; raise :class:`ParityError` naming ``what`` if it is over
        ``limit`` (or NaN), with ``hint`` (default: the probe's) saying what to try."""
        difference = self.difference(model, calls=calls)
        if not difference <= limit:
            hint = self.hint if hint is None else hint
            raise ParityError(
                f"{what} differs from {self.against} by {difference:.3g} ({QUANTITY} with flip "
                f"TTA on {len(self.batch)} probe images, tolerance {limit:g})"
                + (f"; {hint}" if hint else "")
            )
        return difference


def prove_exported_files(
    probe: ParityProbe, config: ModelConfig, torchscript: Path, onnx: Path | None = None
) -> list[tuple[str, float]]:
    """Prove every float32 model file export wrote, as written and as the worker runs it.

    Returns (what, :data:`QUANTITY`) for each; on a failure, removes the files (nothing
    half-exported is left to archive) and raises :class:`ParityError`. The file as written runs
    the module's own operations, so its failure is the probe's (the module computes something
    else); a runtime failing after it passed is that runtime's arithmetic.
    """
    cpu = torch.device("cpu")
    checks: list[tuple[str, Callable[[], Model], int]] = [
        (f"TorchScript {torchscript.name}", lambda: torch.jit.load(str(torchscript), cpu), 1)
    ]
    if config.runtime == "torchscript" and config.optimize:
        served = "frozen, oneDNN fusion" if config.onednn_fusion else "frozen"
        fuse = config.onednn_fusion
        checks.append((
            f"TorchScript {torchscript.name} as served ({served})",
            lambda: _fed_channels_last(load_torchscript(torchscript, cpu, fuse=fuse)),
            WARM_UP_CALLS,
        ))  # fmt: skip
    if onnx is not None:
        checks.append((f"ONNX Runtime {onnx.name}", lambda: OnnxRuntimeModel(onnx), 1))
    proven: list[tuple[str, float]] = []
    try:
        for what, load, calls in checks:
            hint = None if not proven else _runtime_hint(proven[0][0], config)
            proven.append((what, probe.prove(load(), what, calls=calls, hint=hint)))
    except ParityError:
        _remove([torchscript, onnx] if onnx else [torchscript])
        raise
    return proven


def _runtime_hint(matching: str, config: ModelConfig) -> str:
    instead = (
        "export with --no-optimize to serve it as written"
        if config.runtime == "torchscript"
        else "serve it with --runtime torchscript"
    )
    return f"{matching} matches, so this runtime's float32 arithmetic is what differs: {instead}"


def _fed_channels_last(model: Model) -> Model:
    # the worker stacks its images channels_last (b4serve.serving.preprocess)
    return lambda batch: model(batch.contiguous(memory_format=torch.channels_last))


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
