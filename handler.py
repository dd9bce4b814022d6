"""TorchServe adapter: context and request list in, one response per request out.

All logic lives in ``b4serve`` (shipped in the archive with ``--extra-files``); this file only
maps TorchServe's contract (initialize, preprocess, inference, postprocess) onto it and gives each
failed request its own HTTP status with ``context.set_response_status``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes

from b4serve.serving.allocator import (
    HeldMemory,
    freeze_long_lived_objects,
    held_memory,
    keep_freed_memory,
)
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier, Outcome, Reply, replies
from b4serve.serving.protocol import (
    OUTPUT_NAME,
    ParsedRequest,
    Protocol,
    RequestLimits,
    detect_protocol,
    parse_requests,
)
from b4serve.serving.request_ids import Handled, handled_line, request_id_of
from b4serve.serving.runtime import OneDnnFused, load_model, select_device
from b4serve.serving.telemetry import METRICS, batch_observations, runtime_labels

log = logging.getLogger(__name__)


class B4Handler:
    """Batch-aware handler: a malformed request fails alone, the rest of its batch is served."""

    def __init__(self) -> None:
        self.classifier: Classifier | None = None
        self.model_name = "b4"
        self.model_version = ""
        self.runtime: tuple[str, str, str] = ("", "", "")  # b4_runtime's labels
        self.metrics: dict[
            str, Any
        ] = {}  # b4serve.serving.telemetry spec name -> TorchServe metric
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load config and model (in its recorded runtime, or the fallback) from the unpacked
        archive, then warm up."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        config = ModelConfig.load(model_dir)
        device = select_device(properties.get("gpu_id"))
        if config.threads:  # several workers on one CPU: split the cores between them
            torch.set_num_threads(config.threads)
        reusing = keep_freed_memory(config.malloc_keep_mb)  # before the model's first forward
        loaded = load_model(model_dir, config, device)
        if loaded.fallback is not None:  # e.g. an archive copied to a node type without bf16
            log.error(
                "RUNTIME FALLBACK: the archive records runtime %s, which this worker cannot run "
                "(%s); serving %s instead", loaded.recorded, loaded.fallback.reason,
                loaded.runs_on(),
            )  # fmt: skip
        if loaded.other_host is not None:  # chosen on another CPU: its timings may not hold
            log.warning("RUNTIME HOST: %s", loaded.other_host)
        fallback = loaded.fallback.code if loaded.fallback else None
        self.runtime = runtime_labels(loaded.runtime, loaded.recorded, fallback)
        self.classifier = Classifier(loaded.model, config, device)
        self.classifier.warm_up()
        frozen = freeze_long_lived_objects()  # all loaded: full GC passes skip it from now on
        self.model_name = context.model_name
        self.model_version = str(context.manifest["model"].get("modelVersion", ""))
        self.metrics = register_metrics(context)
        label = "DEMO model (synthetic classes, not a real classifier)" if config.demo else "model"
        log.info(
            "b4 %s ready: %s, %d classes, %s, %d threads, oneDNN fusion %s, "
            "malloc keeps %s, %d objects exempt from GC",
            label, config.arch, config.num_classes, loaded.runs_on(), torch.get_num_threads(),
            "on" if isinstance(loaded.model, OneDnnFused) else "off",
            f"{config.malloc_keep_mb} MiB" if reusing else "glibc's default", frozen,
        )  # fmt: skip
        self.initialized = True

    def preprocess(self, data: list[Any], context: Any) -> list[ParsedRequest]:
        """The requests of this batch with their images (b4serve.serving.protocol); a request
        the parser cannot take, or over the per-request limits, is its own error."""
        limits = RequestLimits.of(self.classifier.config) if self.classifier else None
        return parse_requests(data, context.get_all_request_header, limits)

    def inference(self, payloads: list[object]) -> list[Outcome]:
        """Decode, validate and classify every image; bad ones come back as errors."""
        assert self.classifier is not None, "initialize() was not called"
        return self.classifier.classify(payloads)

    def postprocess(self, replies: list[Reply], context: Any, protocol: Protocol) -> list[Any]:
        """Each request's JSON answer and status (its first failed image's); under a KServe
        envelope, the one request's per-image answers, which the envelope wraps."""
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():  # the v2 binary-data header length
                context.set_response_header(index, name, value)
            for image, error in reply.failures:
                where = f"image {image}: " if reply.images > 1 else ""
                log.warning(
                    "request %d of %d failed: %d %s: %s%.300s", index, len(replies),
                    error.status, error.type, where, error.message,
                )  # fmt: skip
            if reply.error is not None:
                # The standard phrase, never the message: TorchServe 0.12 frames the phrase by
                # its length in characters, so one non-ASCII character in it corrupts the reply
                # stream and kills the worker. The message travels in the JSON body.
                context.set_response_status(reply.error.status, reply.error.phrase, index)
        if protocol != "raw":  # one request, whose per-image answers the envelope wraps
            if protocol == "v2":  # kservev2 names each output after context.input_names
                context.input_names = [OUTPUT_NAME] * len(replies[0].body)
            return replies[0].body
        return [reply.body for reply in replies]

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """TorchServe's entry point for one server batch (or one enveloped KServe request)."""
        held = held_memory()  # between batches: the last one's buffers are freed, none taken yet
        protocol = detect_protocol(data)
        requests = self.preprocess(data, context)
        outcomes = self.inference([payload for r in requests for payload in r.payloads])
        if self.classifier is not None:
            self.report(len(outcomes), held)
        found = replies(requests, outcomes, protocol, self.model_name, self.model_version)
        answers = self.postprocess(found, context, protocol)
        log.info("%s", handled_line(handled(found, context)))  # what the server answered, by id
        return answers

    def report(self, images: int, held: HeldMemory) -> None:
        """Log the latest batch, and the memory held before it, in a line and add the batch to
        the Prometheus metrics."""
        assert self.classifier is not None
        stats = self.classifier.last
        log.info(
            "batch of %d images: %d failed %s, decode %.1f ms, model %.1f ms; %s",
            images, stats.failed, [e for e in stats.errors if e],
            sum(stats.decode_seconds) * 1e3, stats.model_seconds * 1e3, held.describe(),
        )  # fmt: skip
        for observation in batch_observations(self.model_name, stats, self.runtime):
            metric = self.metrics.get(observation.metric.name)
            if metric is not None:
                metric.add_or_update(observation.value, list(observation.dimensions))


def handled(found: list[Reply], context: Any) -> list[Handled]:
    """Each answered request's client id (``X-Client-Request-Id``) and status, in batch order.

    Under a KServe envelope the batch is one request, whose headers are the first request's.
    """
    return [
        Handled(request_id_of(context.get_all_request_header(index)),
                reply.error.status if reply.error else 200)
        for index, reply in enumerate(found)
    ]  # fmt: skip


def register_metrics(context: Any) -> dict[str, Any]:
    """Our metrics (b4serve.serving.telemetry) in TorchServe's metrics cache; none without one."""
    cache = getattr(context, "metrics", None)
    if cache is None:
        return {}
    return {
        spec.name: cache.add_metric_to_cache(
            spec.name, spec.unit, list(spec.dimensions), MetricTypes[spec.kind.upper()]
        )
        for spec in METRICS
    }
