"""Proof that an exported model reproduces the user's own: max |logit difference| on a probe batch.

Any callable that maps an NCHW float32 batch to logits can be proven this way (TorchScript,
ONNX Runtime, or a runtime added later), against the user's own unpickled module when the
checkpoint holds one, else against the eager model rebuilt from their state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from b4serve.build.checkpoint import CheckpointError
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS
from b4serve.serving.runtime import OnnxRuntimeModel, load_torchscript

__all__ = [
    "LOGIT_TOLERANCE",
    "PROBE_IMAGES",
    "ParityError",
    "ParityProbe",
    "probe_batch",
    "probe_images",
    "prove_exported_files",
]

LOGIT_TOLERANCE = 1e-4
PROBE_IMAGES = 2  # the shape a lone image and its mirror make: what the CPU worker runs
_PROBE_SEED = 13

Model = Callable[[torch.Tensor], torch.Tensor]


class ParityError(CheckpointError):
    """An exported model does not reproduce the reference; the message says by how much."""


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


@dataclass(frozen=True)
class ParityProbe:
    """A probe batch and the reference's logits for it, computed once for every model proven."""

    batch: torch.Tensor
    expected: torch.Tensor
    against: str  # the reference in words, e.g. "your module"
    hint: str = ""  # added to a failure: what to try

    @classmethod
    def of(
        cls, reference: Model, config: ModelConfig, *, against: str, hint: str = ""
    ) -> ParityProbe:
        """The probe for ``config``'s input size and normalisation, and ``reference``'s logits."""
        batch = probe_batch(config.input_size, config.mean, config.std)
        with torch.inference_mode():
            expected = reference(batch).float()
        return cls(batch, expected, against, hint)

    def difference(self, model: Model, *, calls: int = 1) -> float:
        """Max |logit difference| of ``model`` to the reference over ``calls`` calls (a JIT
        compiles on its first calls: each one must match); NaN if any output is NaN."""
        worst = 0.0
        with torch.inference_mode():
            for _ in range(calls):
                got = model(self.batch).float()
                if got.shape != self.expected.shape:
                    return math.inf
                difference = (got - self.expected).abs().max().item()
                if math.isnan(difference):
                    return difference
                worst = max(worst, difference)
        return worst

    def prove(
        self,
        model: Model,
        what: str,
        *,
        tolerance: float = LOGIT_TOLERANCE,
        calls: int = 1,
        hint: str | None = None,
    ) -> float:
        """``model``'s difference; raise :class:`ParityError` naming ``what`` if it is over
        ``tolerance`` (or NaN), with ``hint`` (default: the probe's) saying what to try."""
        difference = self.difference(model, calls=calls)
        if not difference <= tolerance:
            hint = self.hint if hint is None else hint
            raise ParityError(
                f"{what} differs from {self.against} by {difference:.3g} (max |logit "
                f"difference| on {len(self.batch)} probe images, tolerance {tolerance:g})"
                + (f"; {hint}" if hint else "")
            )
        return difference


def prove_exported_files(
    probe: ParityProbe, config: ModelConfig, torchscript: Path, onnx: Path | None = None
) -> list[tuple[str, float]]:
    """Prove every float32 model file export wrote, as written and as the worker runs it.

    Returns (what, max |logit difference|) for each; on a failure, removes the files (nothing
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
