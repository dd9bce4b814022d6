"""TorchServe adapter: context and request list in, one response per request out.

All logic lives in ``b4serve`` (shipped in the archive with ``--extra-files``); this file only
maps TorchServe's contract onto it: ``initialize`` loads the model, ``handle`` hands the batch to
:meth:`b4serve.serving.pipeline.Classifier.answer` once and gives each request its own HTTP
status with ``context.set_response_status``; memory and metrics are reported per batch.
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
from b4serve.serving.pipeline import Classifier
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

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """TorchServe's entry point for one server batch (or one enveloped KServe request):
        the core answers it (b4serve.serving.pipeline); each reply's status, content type and
        headers go onto the context."""
        assert self.classifier is not None, "initialize() was not called"
        held = held_memory()  # between batches: the last one's buffers are freed, none taken yet
        batch = self.classifier.answer(
            data, context.get_all_request_header, self.model_name, self.model_version
        )
        self.report(batch.images, held)
        for index, reply in enumerate(batch.replies):
            context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():  # the v2 binary-data header length
                context.set_response_header(index, name, value)
            if reply.error is not None:
                # The standard phrase, never the message: TorchServe 0.12 frames the phrase by
                # its length in characters, so one non-ASCII character in it corrupts the reply
                # stream and kills the worker. The message travels in the JSON body.
                context.set_response_status(reply.error.status, reply.error.phrase, index)
        if batch.output_names is not None:  # kservev2 names each output after input_names
            context.input_names = batch.output_names
        return batch.bodies

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
