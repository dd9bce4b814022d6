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

from b4serve.ops.checkpoint import CheckpointError
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS
from b4serve.serving.runtime import OnnxRuntimeModel, load_torchscript

__all__ = [
    "LOGIT_TOLERANCE",
    "PROBE_IMAGES",
    "ParityError",
    "ParityProbe",
    "probe_batch",
    "prove_exported_files",
]

LOGIT_TOLERANCE = 1e-4
PROBE_IMAGES = 2  # the shape a lone image and its mirror make: what the CPU worker runs
_PROBE_SEED = 13

Model = Callable[[torch.Tensor], torch.Tensor]


class ParityError(CheckpointError):
    """An exported model does not reproduce the reference; the message says by how much."""


def probe_batch(input_size: int, images: int = PROBE_IMAGES) -> torch.Tensor:
    """The fixed probe batch: seeded standard-normal images (NCHW float32), inputs as spread as
    any normalisation makes real images, so every channel and padded border is exercised."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn(images, 3, input_size, input_size, generator=generator)


@dataclass(frozen=True)
class ParityProbe:
    """A probe batch and the reference's logits for it, computed once for every model proven."""

    batch: torch.Tensor
    expected: torch.Tensor
    against: str  # the reference in words, e.g. "your module"
    hint: str = ""  # added to a failure: what to try

    @classmethod
    def of(cls, reference: Model, input_size: int, *, against: str, hint: str = "") -> ParityProbe:
        batch = probe_batch(input_size)
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
        self, model: Model, what: str, *, tolerance: float = LOGIT_TOLERANCE, calls: int = 1
    ) -> float:
        """``model``'s difference; raise :class:`ParityError` naming ``what`` if it is over
        ``tolerance`` (or NaN)."""
        difference = self.difference(model, calls=calls)
        if not difference <= tolerance:
            raise ParityError(
                f"{what} differs from {self.against} by {difference:.3g} (max |logit "
                f"difference| on {len(self.batch)} probe images, tolerance {tolerance:g})"
                + (f"; {self.hint}" if self.hint else "")
            )
        return difference


def prove_exported_files(
    probe: ParityProbe, config: ModelConfig, torchscript: Path, onnx: Path | None = None
) -> list[tuple[str, float]]:
    """Prove every float32 model file export wrote, as written and as the worker runs it.

    Returns (what, max |logit difference|) for each; on a failure, removes the files (nothing
    half-exported is left to archive) and raises :class:`ParityError`.
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
            proven.append((what, probe.prove(load(), what, calls=calls)))
    except ParityError:
        _remove([torchscript, onnx] if onnx else [torchscript])
        raise
    return proven


def _fed_channels_last(model: Model) -> Model:
    # the worker stacks its images channels_last (b4serve.serving.preprocess)
    return lambda batch: model(batch.contiguous(memory_format=torch.channels_last))


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
