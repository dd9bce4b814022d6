"""Metric specs, per-batch observations, the shipped metrics.yaml and Prometheus parsing."""

from pathlib import Path

import yaml

from b4serve.serving.telemetry import (
    IMAGES_PER_FORWARD,
    METRICS,
    REQUESTS,
    RUNTIME,
    BatchStats,
    batch_observations,
    declared_model_metrics,
    parse_prometheus,
    request_counts,
    runtime_labels,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_batch_counts_requests_by_outcome_and_error_type() -> None:
    stats = BatchStats(
        decode_seconds=[0.001, 0.002, 0.003, 0.004],
        errors=[None, "InvalidInput", None, "InvalidInput"],
        forwards=[(1, 0.1), (1, 0.12)],
    )
    observations = batch_observations("b4", stats)
    requests = {o.dimensions: o.value for o in observations if o.metric is REQUESTS}
    assert requests == {("b4", "ok", "none"): 2.0, ("b4", "error", "InvalidInput"): 2.0}
    assert [o.value for o in observations if o.metric is IMAGES_PER_FORWARD] == [1.0, 1.0]
    assert stats.failed == 2 and abs(stats.model_seconds - 0.22) < 1e-12


def test_an_all_bad_batch_observes_no_forward() -> None:
    stats = BatchStats(decode_seconds=[0.001], errors=["PayloadTooLarge"])
    kinds = [o.metric.name for o in batch_observations("b4", stats)]
    assert kinds == ["b4_requests", "b4_decode_seconds"]


# TorchServe's own model metrics, which metrics.yaml keeps beside ours (its default file has them).
TORCHSERVE_MODEL_METRICS = {"HandlerTime", "PredictionTime"}


def test_metrics_yaml_declares_exactly_our_metrics() -> None:
    shipped = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    ours = {spec.name for spec in METRICS}
    names = [entry["name"] for entries in shipped.values() for entry in entries]
    # both ways: each of ours declared once as specified, and nothing else declared but
    # TorchServe's own (a metric renamed or dropped here would linger there, exported empty)
    assert sorted(names) == sorted(ours | TORCHSERVE_MODEL_METRICS)
    declared = {
        kind: [entry for entry in entries if entry["name"] in ours]
        for kind, entries in shipped.items()
    }
    assert {k: v for k, v in declared.items() if v} == declared_model_metrics()


def test_metrics_config_is_named_in_config_properties() -> None:
    properties = (ROOT / "config.properties").read_text().splitlines()
    assert "metrics_mode=prometheus" in properties
    assert "metrics_config=metrics.yaml" in properties


def test_prometheus_text_is_parsed_and_requests_summed_by_outcome() -> None:
    text = (
        "# HELP b4_requests Torchserve prometheus counter metric with unit: count\n"
        "# TYPE b4_requests counter\n"
        'b4_requests{ModelName="b4",Outcome="ok",ErrorType="none",Hostname="h",} 7.0\n'
        'b4_requests{ModelName="b4",Outcome="error",ErrorType="InvalidInput",Hostname="h",} 2.0\n'
        'b4_requests{ModelName="other",Outcome="ok",ErrorType="none",Hostname="h",} 5.0\n'
        'b4_requests_created{ModelName="b4",Outcome="ok",ErrorType="none",Hostname="h",} 1.7e9\n'
        "b4_decode_seconds_count 9.0\n"
        "garbage line\n"
    )
    samples = parse_prometheus(text)
    assert samples[0].labels["ErrorType"] == "none" and samples[0].value == 7.0
    assert request_counts(samples, "b4") == {"ok": 7.0, "InvalidInput": 2.0}


def test_a_batch_says_which_runtime_served_it_and_whether_it_fell_back() -> None:
    stats = BatchStats(decode_seconds=[0.001], errors=[None], forwards=[(1, 0.1)])
    labels = runtime_labels("torchscript", "openvino", "openvino-missing")
    (observation,) = [o for o in batch_observations("b4", stats, labels) if o.metric is RUNTIME]
    assert observation.value == 1.0
    assert observation.dimensions == ("b4", "torchscript", "openvino", "openvino-missing")
    assert runtime_labels("openvino", "openvino", None)[-1] == "none"
    assert RUNTIME not in {o.metric for o in batch_observations("b4", stats)}  # none given
