"""The benchmark's report from rows: ratios, the ceilings that bound each target, what it serves
on each kind of host, and memory peaks measured in fresh processes."""

from __future__ import annotations

import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from small_models import AVX2_ONLY, AVX512_BF16, ConvNet

from b4serve.lab.bench import (
    DEFAULT,
    DEMO_BF16_TOLERANCE,
    HISTORY_MARKER,
    SEED,
    TORCHSCRIPT,
    Row,
    add_row,
    ceilings,
    compute_ratios,
    expected_key,
    fresh_process_peak_mb,
    kept_history,
    latency_floor,
    layout_ratios,
    markdown,
    merge_rounds,
    next_configs,
    pinned,
    serves_the_same,
)

ONNX = pinned("onnxruntime")


def in_process(config: str, setting: str, images: int, ceiling_of: str) -> Row:
    return Row("in-process", config, setting, images, 10.0, ceiling_of=ceiling_of)


def rows() -> list[Row]:
    return [
        in_process("seed: plain scripted, two-pass TTA", "micro-batch 1", 10, SEED.name),
        in_process("openvino bf16", "micro-batch 1", 200, DEFAULT.name),  # auto chose it
        in_process("openvino bf16", "micro-batch 4", 150, DEFAULT.name),
        in_process("torchscript fp32, oneDNN fusion", "micro-batch 1", 60, TORCHSCRIPT.name),
        in_process("torchscript fp32, no oneDNN fusion", "micro-batch 1", 50, ""),  # context
        in_process("onnxruntime fp32", "micro-batch 1", 70, ONNX.name),
        Row("end to end", SEED.name, "8 clients", 10, 10.0),
        Row("end to end", DEFAULT.name, "1 clients", 150, 10.0, [0.1] * 150),
        Row("end to end", DEFAULT.name, "8 clients", 190, 10.0),
        Row("end to end", TORCHSCRIPT.name, "8 clients", 55, 10.0),
        Row("end to end", ONNX.name, "8 clients", 63, 10.0),
        Row("side by side", f"{DEFAULT.name}: served", "1 client", 10, 5.0, [0.5] * 9 + [0.9]),
        Row("side by side", f"{DEFAULT.name}: in-process", "1 image", 10, 4.0, [0.4] * 9 + [0.8]),
    ]


def test_ratios_compare_like_with_like() -> None:
    ratios = {name: value for name, (value, _) in compute_ratios(rows()).items()}
    # auto's runtime against its own in-process best, and against fp32 TorchScript served
    assert ratios["auto: end to end / in-process best"] == 19.0 / 20.0
    assert ratios["auto end to end, TTA images/s"] == 19.0
    assert ratios["auto end to end / fp32 TorchScript end to end"] == 19.0 / 5.5
    assert ratios["auto end to end / seed end to end"] == 19.0
    assert ratios[f"{ONNX.name}: end to end / fp32 TorchScript end to end"] == 6.3 / 5.5
    assert ratios[f"{ONNX.name}: end to end / in-process best"] == 6.3 / 7.0
    assert ratios["torchscript in-process best: oneDNN fusion / no fusion"] == 6.0 / 5.0
    p99_served = float(np.percentile([0.5] * 9 + [0.9], 99))
    assert ratios["auto 1-client p99 / in-process single-image median, side by side"] == (
        p99_served / 0.4
    )


def test_targets_follow_the_hosts_bf16() -> None:
    with_bf16 = compute_ratios(rows(), bf16=True)
    assert with_bf16["auto end to end / fp32 TorchScript end to end"][1] == ">= 1.5"
    assert with_bf16["auto end to end, TTA images/s"][1] == ">= 10 (2 cores with bf16)"
    avx2 = compute_ratios(rows(), bf16=False)
    assert avx2["auto end to end / fp32 TorchScript end to end"][1] == ">= 1.15"
    assert avx2["auto end to end, TTA images/s"][1] == "(context)"


def test_where_auto_chose_torchscript_it_is_its_own_fp32_reference() -> None:
    found = [r for r in rows() if r.config != TORCHSCRIPT.name]  # no pinned server for it
    ratios = compute_ratios(found)
    assert ratios["auto end to end / fp32 TorchScript end to end"][0] == 1.0


def test_report_says_which_targets_this_hardware_can_reach() -> None:
    info = {"date": "d", "machine": "m", "command": "c", "minutes": 1.0, "bf16": True,
            "host": "CPU has AVX2, BF16", "choice": "runtime: openvino (auto)"}  # fmt: skip
    report = markdown(rows(), {"x": {"worker 0": 400.0}}, compute_ratios(rows()), info)
    # auto's ceiling 20, served 19 (0.95 of it); fp32 TorchScript served 5.5
    assert "| auto >= 10 TTA images/s end to end | 10.00 | 20.00 | 0.50 | 0.95 | yes |" in report
    assert "| auto >= 1.5x fp32 TorchScript end to end | 8.25 | 20.00 | 0.41 | 0.95 | yes |" in (
        report
    )
    assert "CPU has AVX2, BF16." in report and "runtime: openvino (auto)" in report
    avx2 = ceilings(rows(), bf16=False)
    assert [line.split(" | ")[0] for line in avx2[-1:]] == [
        "| auto >= 1.15x fp32 TorchScript end to end"
    ]


def test_a_target_under_the_ceiling_is_reachable_only_as_far_as_serving_reaches() -> None:
    def verdict(auto_images: int) -> str:
        found = [r for r in rows() if not (r.config == DEFAULT.name and r.section == "end to end")]
        found.append(Row("end to end", DEFAULT.name, "8 clients", auto_images, 10.0))
        line = next(line for line in ceilings(found) if line.startswith("| auto >= 10"))
        return line.split(" | ")[-1].rstrip(" |")

    assert verdict(150) == "yes"  # 15 served of a 20 ceiling
    assert verdict(90) == "at the limit: needs more of the ceiling than was served"
    slow = [replace(r, images=r.images // 4) if r.ceiling_of == DEFAULT.name else r for r in rows()]
    line = next(line for line in ceilings(slow) if line.startswith("| auto >= 10"))
    assert line.endswith("| no: above the ceiling |")  # ceiling 5


def test_rounds_of_a_row_add_up_and_other_rows_stay_apart() -> None:
    found: list[Row] = []
    add_row(found, Row("end to end", DEFAULT.name, "8 clients", 16, 8.0, [1.0] * 16))
    add_row(found, Row("end to end", SEED.name, "8 clients", 8, 8.0))
    add_row(found, Row("end to end", DEFAULT.name, "8 clients", 16, 4.0, [0.5] * 16))
    add_row(found, Row("in-process", DEFAULT.name, "8 clients", 8, 2.0))
    assert [(r.section, r.config, r.images, r.seconds) for r in found] == [
        ("end to end", DEFAULT.name, 32, 12.0),
        ("end to end", SEED.name, 8, 8.0),
        ("in-process", DEFAULT.name, 8, 2.0),
    ]
    assert sorted(found[0].latencies_s) == [0.5] * 16 + [1.0] * 16


def test_each_ratio_is_reported_per_round_beside_the_whole_run() -> None:
    slow = [r for r in rows() if r.section != "side by side"]
    fast = [replace(r, seconds=r.seconds / 2) for r in slow]
    fast[1] = replace(fast[1], seconds=20.0)  # auto's in-process mb 1 slower in round 2: 10/s
    merged = merge_rounds([slow, fast])
    per_round = [compute_ratios(slow), compute_ratios(fast)]
    info = {"date": "d", "machine": "m", "command": "c", "minutes": 1.0, "rounds": 2}
    report = markdown(merged, {}, compute_ratios(merged), info, per_round)
    # round 1: 19 / 20; round 2: 38 / 30 (micro-batch 4); whole run: 570 / 450 images
    assert "| auto: end to end / in-process best | 1.27 | 0.95, 1.27 | >= 0.9 |" in report
    assert "measured in 2 rounds" in report and "Side by side" in report
    alone = markdown(merged, {}, {}, {**info, "sequential": True, "layout": True})
    assert "One server at a time" in alone and "Side by side" not in alone
    assert alone.startswith("# Layouts") and "What this hardware allows" not in alone


def test_lone_request_target_is_judged_against_the_machines_own_tail() -> None:
    def verdict(served: list[float], in_process: list[float]) -> str:
        found = [
            Row("side by side", f"{DEFAULT.name}: served", "1 client", 100, 1.0, served),
            Row("side by side", f"{DEFAULT.name}: in-process", "1 image", 100, 1.0, in_process),
        ]
        return latency_floor(found)[-1].split(" | ")[-1].rstrip(" |")

    steady = [0.3] * 100
    assert verdict([0.31] * 100, steady) == "yes"
    assert verdict([0.31] * 95 + [0.6] * 5, steady) == (
        "at the limit: the machine's own tail and what serving adds cross it"
    )
    assert verdict([0.31] * 100, [0.3] * 95 + [0.6] * 5) == "no: the machine's own tail is above it"
    assert latency_floor(rows()[:-2]) == []  # no lone requests measured: nothing to judge


def test_rows_without_latencies_have_no_percentiles_in_json_or_table() -> None:
    throughput_only = in_process("fused", "micro-batch 1", 20, DEFAULT.name)
    timed = Row("end to end", DEFAULT.name, "1 clients", 2, 1.0, [0.25, 0.75])
    assert throughput_only.summary()["p50_ms"] is None  # null in the JSON, never NaN
    assert timed.summary()["p50_ms"] == 500.0
    table = markdown(
        [throughput_only], {}, {}, {"date": "d", "machine": "m", "command": "c", "minutes": 1.0}
    )
    assert "| in-process | fused | micro-batch 1 | 20 | 2.00 |  |  |  |" in table


def test_what_is_served_beside_ours_depends_on_the_host() -> None:
    chosen = ("onnxruntime", "fp32")
    avx2 = [c.name for c in next_configs(AVX2_ONLY, chosen, layout=False)]
    assert avx2 == [TORCHSCRIPT.name, ONNX.name, pinned("openvino").name, SEED.name]
    bf16 = next_configs(AVX512_BF16, chosen, layout=False)
    relaxed = [c for c in bf16 if c.reduced_tolerance]
    assert [c.runtime for c in relaxed] == ["torchscript-bf16", "openvino"]
    assert all(f"bf16 tolerance {DEMO_BF16_TOLERANCE:g}" in c.name for c in relaxed)
    assert relaxed[0].deploy_env()["B4_REDUCED_TOLERANCE"] == str(DEMO_BF16_TOLERANCE)
    assert SEED.deploy_env()["B4_HANDLER"].endswith("b4serve/lab/seed_handler.py")
    assert expected_key(relaxed[1]) == ("openvino", "bf16")
    assert expected_key(pinned("openvino")) is None  # bf16 or fp32: its check decides
    auto_openvino = {("openvino", "fp32"), ("seed", "fp32")}
    assert serves_the_same(pinned("openvino"), ("openvino", "fp32"), auto_openvino)
    assert not serves_the_same(relaxed[1], ("openvino", "fp32"), auto_openvino)
    assert serves_the_same(TORCHSCRIPT, ("torchscript", "fp32"), {("torchscript", "fp32")})
    layout = next_configs(AVX512_BF16, ("openvino", "bf16"), layout=True)
    assert [(c.workers, c.threads, c.micro_batch, c.openvino_hint) for c in layout] == [
        (2, 1, 0, ""), (1, 0, 4, ""), (1, 0, 0, "THROUGHPUT"),
    ]  # fmt: skip


def test_layout_ratios_compare_each_layout_with_the_defaults() -> None:
    found = [
        Row("end to end", DEFAULT.name, "8 clients", 100, 10.0),
        Row("end to end", "openvino, 2 workers x 1 thread", "8 clients", 110, 10.0),
        in_process("openvino bf16", "micro-batch 1", 200, DEFAULT.name),
        in_process("openvino bf16", "micro-batch 4", 180, DEFAULT.name),
    ]
    ratios = {name: value for name, (value, _) in layout_ratios(found).items()}
    assert ratios == {
        "openvino, 2 workers x 1 thread / deploy defaults, end to end best": 1.1,
        "openvino bf16: micro-batch 4 / micro-batch 1": 0.9,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_fresh_process_reports_its_own_peak_not_this_processs(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    torch.jit.script(ConvNet().eval()).save(str(model))
    ballast = np.ones(2**27)  # 1 GiB, touched: this process's high-water mark rises past it
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inherited = subprocess.run(
        [sys.executable, "-c",
         "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    own = fresh_process_peak_mb(model, "plain")
    del ballast
    assert parent_peak > 1024
    # a child's ru_maxrss starts from its parent's high-water mark (why the bench no longer uses
    # it); VmHWM is the child's own
    assert int(inherited.stdout) / 1024 >= parent_peak * 0.99
    assert 50 < own < parent_peak - 700


def test_a_rewritten_report_keeps_the_history_below_its_marker(tmp_path: Path) -> None:
    report = tmp_path / "PERFORMANCE.md"
    assert kept_history(report) == ""  # no file yet
    report.write_text(f"# old run\n\n{HISTORY_MARKER}\n## run A\nfigures\n")
    kept = kept_history(report)
    assert kept == f"\n{HISTORY_MARKER}\n## run A\nfigures\n"
    report.write_text("# old run, no history\n")
    assert kept_history(report) == ""


def test_the_bench_report_shows_its_picture_under_the_heading() -> None:
    info = {"date": "d", "machine": "m", "command": "c", "minutes": 1.0, "layout": True}
    rows = [Row("end to end", "ours", "1 clients", 10, 1.0, [0.1] * 10)]
    report = markdown(rows, {}, {}, info, picture="performance.png")
    heading, _, rest = report.partition("![")
    assert "Command: `c`" in heading and rest.split("\n")[0].endswith("](performance.png)")
    assert "![" not in markdown(rows, {}, {}, info)
