"""The serving data path as plain functions: bytes -> array -> tensor -> model -> JSON.

Nothing here knows TorchServe; ``handler.py`` adapts its context and request list to
:class:`Classifier`, and tests drive the same object in-process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from b4serve.codec import decode_npy
from b4serve.config import ModelConfig
from b4serve.errors import InferenceError, error_body
from b4serve.preprocess import Preprocessor, stack_channels_last
from b4serve.runtime import Model, micro_batch_size
from b4serve.tta import tta_probabilities

__all__ = ["Classifier", "Outcome", "request_body"]


def request_body(request: object) -> object:
    """The payload of one TorchServe request: its ``data`` or ``body`` field."""
    if isinstance(request, dict):
        for key in ("data", "body"):
            if request.get(key) is not None:
                return request[key]
        return None
    return request


@dataclass
class Outcome:
    """One request's answer: probabilities, or the error that request alone failed with."""

    probabilities: list[float] | None = None
    error: InferenceError | None = None

    @property
    def status(self) -> int:
        return self.error.status if self.error else 200

    def body(self) -> bytes:
        """JSON bytes sent back: the probability list, or ``{"code", "type", "message"}``."""
        if self.error is not None:
            return error_body(self.error)
        return json.dumps(self.probabilities).encode()


@dataclass
class StageTimes:
    """Seconds spent in each stage of the last batch, for logs and metrics."""

    decode: float = 0.0
    model: float = 0.0
    images: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class Classifier:
    """Classifies a batch of request bodies; each bad body fails alone."""

    def __init__(self, model: Model, config: ModelConfig, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.preprocess = Preprocessor(config)
        self.micro_batch = micro_batch_size(config.micro_batch, device)
        self.last = StageTimes()

    def decode(self, body: object) -> torch.Tensor:
        """Bytes of one request -> normalised HxWx3 tensor; raises :class:`InferenceError`."""
        return self.preprocess(decode_npy(body, self.config.max_pixels))

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> torch.Tensor:
        """TTA probabilities (N x classes) for decoded images, one forward per micro-batch."""
        step = self.micro_batch or len(images)
        return torch.cat([self._forward(images[i : i + step]) for i in range(0, len(images), step)])

    def _forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = stack_channels_last(images).to(self.device, non_blocking=True)
        if not self.config.optimize:  # the seed's baseline fed plain NCHW tensors
            batch = batch.contiguous()
        return tta_probabilities(self.model, batch).cpu()

    def warm_up(self, batch_sizes: Sequence[int] = (1, 2)) -> None:
        """Run a few forwards so the JIT's profiling runs happen before the first request."""
        size = self.config.input_size
        # only the forward shapes requests will produce: with micro-batches, one per size
        for count in sorted({min(c, self.micro_batch or c) for c in batch_sizes}):
            for _ in range(2):  # TorchScript's profiling executor optimises on the second call
                self.predict([torch.zeros(size, size, 3)] * count)

    def classify(self, bodies: Sequence[object]) -> list[Outcome]:
        """One :class:`Outcome` per body, in order."""
        started = time.perf_counter()
        outcomes = [Outcome() for _ in bodies]
        images: list[torch.Tensor] = []
        positions: list[int] = []
        for index, body in enumerate(bodies):
            try:
                images.append(self.decode(body))
                positions.append(index)
            except InferenceError as error:
                outcomes[index].error = error
        decoded = time.perf_counter()
        if images:
            for index, row in zip(positions, self.predict(images).tolist(), strict=True):
                outcomes[index].probabilities = row
        self.last = StageTimes(
            decode=decoded - started,
            model=time.perf_counter() - decoded,
            images=len(images),
            failed=len(bodies) - len(images),
            errors=[o.error.type for o in outcomes if o.error],
        )
        return outcomes
