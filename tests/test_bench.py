"""The benchmark's report from rows: ratios, and the ceilings that bound each target."""

from b4serve.bench import DEFAULT, ONNX, SEED, TWO_WORKERS, Row, compute_ratios, markdown


def rows() -> list[Row]:
    return [
        Row("in-process", "ours: one request", "1 image", 10, 4.0, [0.4] * 10),
        Row("in-process", "seed: plain scripted", "micro-batch 1", 10, 10.0),
        Row("in-process", "ours: frozen, channels_last", "micro-batch 1", 20, 10.0),
        Row("in-process", "ours: onnxruntime fp32", "micro-batch 1", 30, 10.0),
        Row("end to end", SEED.name, "8 clients", 10, 10.0),
        Row("end to end", DEFAULT.name, "1 clients", 18, 10.0, [0.5] * 18),
        Row("end to end", DEFAULT.name, "32 clients", 19, 10.0),
        Row("end to end", TWO_WORKERS.name, "8 clients", 20, 10.0),
        Row("end to end", ONNX.name, "8 clients", 28, 10.0),
    ]


def test_ratios_compare_like_with_like() -> None:
    ratios = {name: value for name, (value, _) in compute_ratios(rows()).items()}
    assert ratios["torchscript: end to end / in-process best"] == 1.9 / 2.0
    assert ratios["onnxruntime end to end / seed end to end"] == 2.8
    assert ratios["2 workers x 1 thread / 1 worker x 2 threads, end to end best"] == 2.0 / 1.9
    assert ratios["ours 1-client p99 / in-process single-image median"] == 0.5 / 0.4


def test_report_says_which_targets_this_hardware_can_reach() -> None:
    info = {"date": "d", "machine": "m", "command": "c", "minutes": 1.0}
    report = markdown(rows(), {"x": {"worker 0": 400.0}}, compute_ratios(rows()), info)
    assert "| torchscript >= 3x seed end to end | 3.00 | 2.00 | no |" in report
    assert "| fastest runtime >= 6x seed end to end | 6.00 | 3.00 | no |" in report
    assert "| >= 1,000 TTA images/minute | 16.67 | 3.00 | no |" in report
