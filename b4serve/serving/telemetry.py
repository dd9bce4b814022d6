"""The handler's own metrics, as data: what each one counts and the values one batch adds.

TorchServe exports a backend metric in Prometheus format only when the server's metrics config
declares it, so ``metrics.yaml`` lists exactly :data:`METRICS` (a test keeps the two equal) and
the handler registers the same specs with ``context.metrics``. Nothing here imports TorchServe.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "METRICS", "BatchStats", "MetricSpec", "Observation", "Sample", "batch_observations",
    "parse_prometheus", "request_counts", "runtime_labels",
]  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    """One metric: Prometheus type, unit and dimension names (TorchServe appends Hostname)."""

    name: str
    kind: str  # counter | gauge | histogram
    unit: str
    dimensions: tuple[str, ...]
    help: str


REQUESTS = MetricSpec(
    "b4_requests", "counter", "count", ("ModelName", "Outcome", "ErrorType"),
    "requests answered, by outcome (ok or error) and error type (none for ok)",
)  # fmt: skip
IMAGES_PER_FORWARD = MetricSpec(
    "b4_images_per_forward", "histogram", "count", ("ModelName",),
    "images in one forward pass (each also runs flipped, in the same pass)",
)  # fmt: skip
DECODE_SECONDS = MetricSpec(
    "b4_decode_seconds", "histogram", "s", ("ModelName",),
    "time to decode, validate and preprocess one request body",
)  # fmt: skip
FORWARD_SECONDS = MetricSpec(
    "b4_forward_seconds", "histogram", "s", ("ModelName",),
    "time of one forward pass with TTA, including the copy to and from the device",
)  # fmt: skip
RUNTIME = MetricSpec(
    "b4_runtime", "gauge", "count", ("ModelName", "Runtime", "Recorded", "Fallback"),
    "1, per batch, for what ran it: Runtime serves, Recorded is the archive's choice, Fallback "
    "why the worker could not run that one (none when it does)",
)  # fmt: skip
METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, IMAGES_PER_FORWARD, DECODE_SECONDS, FORWARD_SECONDS, RUNTIME,
)  # fmt: skip


@dataclass
class BatchStats:
    """What one server batch did: per-body decode times and errors, and each forward pass."""

    decode_seconds: list[float] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)  # error type per body, None if ok
    forwards: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds)

    @property
    def failed(self) -> int:
        return sum(error is not None for error in self.errors)

    @property
    def model_seconds(self) -> float:
        return sum(seconds for _, seconds in self.forwards)


@dataclass(frozen=True)
class Observation:
    """One value to add to (counter) or observe in (histogram) a metric, with its dimensions."""

    metric: MetricSpec
    value: float
    dimensions: tuple[str, ...]


def runtime_labels(runtime: str, recorded: str, fallback: str | None) -> tuple[str, str, str]:
    """:data:`RUNTIME`'s labels after the model name: ``fallback`` is the reason's short code."""
    return runtime, recorded, fallback or "none"


def batch_observations(
    model_name: str, stats: BatchStats, runtime: tuple[str, str, str] | None = None
) -> list[Observation]:
    """The metric updates for one batch; requests are counted per (outcome, error type), and
    with ``runtime`` (:func:`runtime_labels`) the runtime that served it."""
    counts = sorted(Counter(stats.errors).items(), key=lambda item: str(item[0]))
    observations = [
        Observation(REQUESTS, float(count), _request_dimensions(model_name, error))
        for error, count in counts
    ]
    observations += [Observation(DECODE_SECONDS, s, (model_name,)) for s in stats.decode_seconds]
    for images, seconds in stats.forwards:
        observations.append(Observation(IMAGES_PER_FORWARD, float(images), (model_name,)))
        observations.append(Observation(FORWARD_SECONDS, seconds, (model_name,)))
    if runtime is not None:
        observations.append(Observation(RUNTIME, 1.0, (model_name, *runtime)))
    return observations


def _request_dimensions(model_name: str, error: str | None) -> tuple[str, str, str]:
    return (model_name, "ok", "none") if error is None else (model_name, "error", error)


def declared_model_metrics(specs: Sequence[MetricSpec] = METRICS) -> dict[str, list[dict]]:
    """The ``model_metrics`` section of a TorchServe metrics config declaring ``specs``."""
    section: dict[str, list[dict]] = {}
    for spec in specs:
        entry = {"name": spec.name, "unit": spec.unit, "dimensions": list(spec.dimensions)}
        section.setdefault(spec.kind, []).append(entry)
    return section


@dataclass(frozen=True)
class Sample:
    """One line of a Prometheus text exposition: metric name, labels, value."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text-format page (comments and malformed lines skipped)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append(Sample(name, dict(_LABEL.findall(labels or "")), number))
    return samples


def request_counts(samples: Sequence[Sample], model_name: str) -> dict[str, float]:
    """Requests answered by ``model_name`` since the server started: ``ok`` or the error type."""
    counts: dict[str, float] = {}
    for sample in samples:
        # TorchServe 0.12's Prometheus client exposes counters without the "_total" suffix
        if sample.name not in (REQUESTS.name, f"{REQUESTS.name}_total"):
            continue
        if sample.labels.get("ModelName") == model_name:
            key = "ok" if sample.labels.get("Outcome") == "ok" else sample.labels.get("ErrorType")
            counts[str(key)] = counts.get(str(key), 0.0) + sample.value
    return counts
