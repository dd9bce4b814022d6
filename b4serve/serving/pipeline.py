"""The serving data path as plain functions: bytes -> array -> tensor -> model -> JSON.

One server batch goes in and its answers come out in one call, :meth:`Classifier.answer`:
parse (b4serve.serving.protocol) -> decode -> predict -> one reply per request. Nothing here
knows TorchServe; ``handler.py`` only hands the batch over and copies each reply's status and
headers onto TorchServe's context, and tests drive the same call without TorchServe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from b4serve.serving.codec import check_array, decode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import InferenceError, InvalidInput, OutOfMemory
from b4serve.serving.gpu import DeviceBatches, out_of_memory, release_device_memory
from b4serve.serving.preprocess import Preprocessor, stack_channels_last
from b4serve.serving.protocol import (
    OUTPUT_NAME,
    ParsedRequest,
    Protocol,
    RequestLimits,
    answer_of,
    detect_protocol,
    parse_requests,
    raw_answer,
)
from b4serve.serving.request_ids import Handled, handled_line, request_id_of
from b4serve.serving.runtime import Model, micro_batch_size
from b4serve.serving.telemetry import BatchStats
from b4serve.serving.tta import tta_probabilities

__all__ = [
    "WARM_UP_CALLS",
    "BatchAnswer",
    "Classifier",
    "Decoded",
    "Outcome",
    "Reply",
    "replies",
]

# Calls per input shape before TorchScript runs its optimised graph: the profiling executor
# records shapes on the first, and with oneDNN fusion compiles on the next ones (measured: the
# fourth call of a new shape is the first at full speed).
WARM_UP_CALLS = 4

log = logging.getLogger(__name__)

# A decoded image: a normalised HxWx3 tensor, or on the GPU path checked pixels to stage.
Decoded = torch.Tensor | np.ndarray


@dataclass
class Outcome:
    """One request's answer: probabilities, or the error that request alone failed with."""

    probabilities: list[float] | None = None
    error: InferenceError | None = None

    @property
    def status(self) -> int:
        return self.error.status if self.error else 200

    def answer(self, protocol: Protocol = "raw") -> Any:
        """What the handler returns for this request in ``protocol`` (JSON bytes when raw)."""
        return answer_of(self.probabilities, self.error, protocol)


@dataclass
class Reply:
    """What goes back for one TorchServe request: the body the handler returns for it (under a
    KServe envelope, the list of per-image answers the envelope wraps), its failed images, and
    its content type and extra headers (the v2 binary-data extension's header length)."""

    body: Any
    failures: list[tuple[int, InferenceError]]  # (image index in the request, its error)
    images: int = 1
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> InferenceError | None:
        """The first failure: it sets the request's HTTP status."""
        return self.failures[0][1] if self.failures else None


@dataclass
class BatchAnswer:
    """One server batch answered: a reply per request, in batch order, and what the server
    returns for it. Under a KServe envelope the batch is one request, whose reply's body is
    the per-image answers the envelope wraps into one response."""

    protocol: Protocol
    replies: list[Reply]
    handled: list[Handled]  # each request's client id and status, for the server's log
    images: int

    @property
    def bodies(self) -> list[Any]:
        """What the handler returns: a body per request, or the envelope's per-image answers."""
        if self.protocol != "raw":
            return self.replies[0].body
        return [reply.body for reply in self.replies]

    @property
    def output_names(self) -> list[str] | None:
        """Under the kservev2 envelope, the name of each output it builds (TorchServe's
        envelope takes them from ``context.input_names``); None otherwise."""
        return [OUTPUT_NAME] * len(self.replies[0].body) if self.protocol == "v2" else None


def replies(
    requests: Sequence[ParsedRequest],
    outcomes: Sequence[Outcome],
    protocol: Protocol,
    model_name: str,
    model_version: str,
) -> list[Reply]:
    """Group per-image outcomes back into one reply per request, in the caller's protocol."""
    found: list[Reply] = []
    position = 0
    for request in requests:
        mine = outcomes[position : position + len(request.payloads)]
        position += len(request.payloads)
        failures = [(i, o.error) for i, o in enumerate(mine) if o.error is not None]
        if protocol != "raw":  # the envelope formats the answers itself
            body = [outcome.answer(protocol) for outcome in mine]
            found.append(Reply(body, failures, len(mine)))
            continue
        results = [(o.probabilities, o.error) for o in mine]
        answer = raw_answer(request, results, model_name, model_version)
        found.append(Reply(answer.body, failures, len(mine), answer.content_type, answer.headers))
    return found


class Classifier:
    """Classifies a batch of request bodies; each bad body fails alone."""

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: torch.device,
        device_batches: DeviceBatches | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.preprocess = Preprocessor(config)
        self.micro_batch = micro_batch_size(config.micro_batch, device)
        # On a GPU: uint8 batches normalised, flipped and classified on the device, by bucket
        # (b4serve.serving.gpu). Tests pass one to run that path on the CPU.
        if device_batches is None and device.type == "cuda":
            device_batches = DeviceBatches(model, config, device)
        self.device_batches = device_batches
        self.last = BatchStats()  # what the latest classify() did, for logs and metrics

    def decode(self, body: object) -> Decoded:
        """One request -> normalised HxWx3 tensor (on the GPU path: checked pixels to stage);
        raises :class:`InferenceError`.

        ``body`` is ``.npy`` bytes, an array a KServe envelope carried, or the error the
        protocol layer already found (:func:`b4serve.serving.protocol.payload_of`).
        """
        if isinstance(body, InferenceError):
            raise body
        if isinstance(body, np.ndarray):
            array = check_array(body, self.config.max_pixels)
        else:
            array = decode_npy(body, self.config.max_pixels)
        if self.device_batches is not None:
            return self.device_batches.pixels(array)
        return self.preprocess(array)

    def _decoded(self, body: object) -> Decoded:
        """:meth:`decode`, with any failure but a request error (a decoder bug the fuzz target
        missed) made that image's 400, the traceback in the log: never the batch's."""
        try:
            return self.decode(body)
        except InferenceError:
            raise
        except Exception:  # whatever it is, it must not fail the batch
            log.exception("decoding an image failed; the image is answered 400")
        raise InvalidInput("the image could not be decoded")

    @torch.inference_mode()
    def predict(self, images: list[Decoded], stats: BatchStats | None = None) -> torch.Tensor:
        """TTA probabilities (N x classes) for decoded images, one forward per micro-batch (on
        the GPU path, per bucket).

        Each forward's size and time is added to ``stats`` when given.
        """
        if self.device_batches is not None:
            return self.device_batches.predict(images, stats)
        step = self.micro_batch or len(images)
        chunks = [images[i : i + step] for i in range(0, len(images), step)]
        return torch.cat([self._forward(chunk, stats) for chunk in chunks])

    def _forward(self, images: list[torch.Tensor], stats: BatchStats | None) -> torch.Tensor:
        started = time.perf_counter()
        batch = stack_channels_last(images).to(self.device, non_blocking=True)
        if not self.config.optimize:  # the seed's baseline fed plain NCHW tensors
            batch = batch.contiguous()
        probabilities = tta_probabilities(self.model, batch).cpu()
        if stats is not None:
            stats.forwards.append((len(images), time.perf_counter() - started))
        return probabilities

    def warm_up(self, batch_sizes: Sequence[int] = (1, 2)) -> None:
        """Run a few forwards so the JIT profiles and compiles before the first request (on
        the GPU path: at every bucket size)."""
        if self.device_batches is not None:
            with torch.inference_mode():
                self.device_batches.warm_up(WARM_UP_CALLS)
            return
        size = self.config.input_size
        # only the forward shapes requests will produce: with micro-batches, one per size
        for count in sorted({min(c, self.micro_batch or c) for c in batch_sizes}):
            for _ in range(WARM_UP_CALLS):
                self.predict([torch.zeros(size, size, 3)] * count)

    def answer(
        self,
        data: list[Any],
        headers_of: Callable[[int], Mapping[str, str]],
        model_name: str,
        model_version: str,
    ) -> BatchAnswer:
        """Answer one server batch: TorchServe's request items (``.npy`` bodies or KServe
        requests, ``headers_of(i)`` for each one's headers) or one enveloped KServe request.

        Never raises for a bad request: each is answered with its own error, the rest are
        served. Each failure and the batch's request ids are logged here.
        """
        protocol = detect_protocol(data)
        requests = parse_requests(data, headers_of, RequestLimits.of(self.config))
        outcomes = self.classify([payload for r in requests for payload in r.payloads])
        found = replies(requests, outcomes, protocol, model_name, model_version)
        for index, reply in enumerate(found):
            for image, error in reply.failures:
                where = f"image {image}: " if reply.images > 1 else ""
                log.warning(
                    "request %d of %d failed: %d %s: %s%.300s", index, len(found),
                    error.status, error.type, where, error.message,
                )  # fmt: skip
        # under an envelope the batch is one request, whose headers are the first item's
        handled = [
            Handled(request_id_of(headers_of(index)), reply.error.status if reply.error else 200)
            for index, reply in enumerate(found)
        ]
        log.info("%s", handled_line(handled))  # what the server answered, by client id
        return BatchAnswer(protocol, found, handled, len(outcomes))

    def classify(self, bodies: Sequence[object]) -> list[Outcome]:
        """One :class:`Outcome` per body, in order."""
        self.last = stats = BatchStats()
        outcomes = [Outcome() for _ in bodies]
        images: list[Decoded] = []
        positions: list[int] = []
        for index, body in enumerate(bodies):
            started = time.perf_counter()
            try:
                images.append(self._decoded(body))
                positions.append(index)
                stats.errors.append(None)
            except InferenceError as error:
                # Kept without its traceback: its frames hold this batch's bodies and images, and
                # through ``outcomes`` the traceback itself, a cycle that only the garbage
                # collector frees, batches later (each bad body held its whole batch).
                outcomes[index].error = error.with_traceback(None)
                stats.errors.append(error.type)
            stats.decode_seconds.append(time.perf_counter() - started)
        if not images:
            return outcomes
        found = self._rows(images, stats)
        if isinstance(found, InferenceError):  # out of device memory: 507 for the whole batch
            for index in positions:
                outcomes[index].error = found
                stats.errors[index] = found.type
        else:
            for index, row in zip(positions, found, strict=True):
                outcomes[index].probabilities = row
        return outcomes

    def _rows(self, images: list[Decoded], stats: BatchStats) -> list[list[float]] | OutOfMemory:
        """The probabilities of ``images``, or the error they all get if the device ran out of
        memory; then the worker frees the memory its allocator caches and goes on."""
        try:
            return self.predict(images, stats).tolist()
        except (RuntimeError, torch.jit.Error) as error:  # what forwards fail with, OOM too
            failure = out_of_memory(error, len(images))
            if failure is None:
                raise
        # Freed here, not in the except block, whose traceback still holds the batch's tensors.
        release_device_memory(self.device)
        return failure
