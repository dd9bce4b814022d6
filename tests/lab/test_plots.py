"""The bench's and the soak's pictures, drawn from small records shaped like the ones they write:
what is drawn, axes named with their units, the record's CPU and date in the title, small PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from b4serve.lab.plots import bench_figure, latencies, save, soak_figure, throughputs

CPU = "Intel(R) Xeon(R) Platinum 8480+"  # not this host's: the title must come from the record


def _row(section: str, config: str, setting: str, rate: float, p50: float | None = None,
         p99: float | None = None, ceiling_of: str = "") -> dict:  # fmt: skip
    return {"section": section, "config": config, "setting": setting, "images": 30,
            "seconds": 30 / rate, "ceiling_of": ceiling_of, "images_per_s": rate,
            "p50_ms": p50, "p95_ms": p99, "p99_ms": p99}  # fmt: skip


BENCH_ROWS = [
    _row("end to end", "ours (auto)", "1 clients", 9.8, 96.8, 134.3),
    _row("end to end", "ours (auto)", "8 clients", 11.3, 678.8, 955.5),
    _row("in-process", "torchscript fp32", "micro-batch 1", 12.5, ceiling_of="ours (auto)"),
    _row("in-process", "torchscript fp32", "micro-batch 4", 10.9, ceiling_of="ours (auto)"),
    _row("end to end", "seed baseline", "32 clients", 4.1, 4492.8, 8591.6),
    _row("end to end", "seed baseline", "1 clients", 0.85, 1164.3, 1292.2),
    _row("in-process", "seed: two-pass TTA", "micro-batch 1", 7.9, ceiling_of="seed baseline"),
    _row("in-process", "torchscript, no fusion", "micro-batch 1", 11.2),
    _row("end to end", "ours (auto)", "client, 500 images", 9.4),
]
BENCH = {
    "info": {"date": "2026-12-02 01:14 UTC", "machine": f"{CPU}, 2 cores, 24 GiB, torch 2.13",
             "host": "CPU has AVX2, AVX-512, BF16, AMX", "command": "scripts/bench.sh"},
    "rows": BENCH_ROWS,
}  # fmt: skip


def _reading(t: float, measured: bool, worker: float, heap: float | None = 16.0) -> dict:
    return {"t_s": t, "measured": measured, "worker_mb": worker, "worker_rss_mb": worker * 2,
            "frontend_retained_mb": 100.0, "frontend_heap_mb": heap,
            "frontend_rss_before_mb": 220.0}  # fmt: skip


SOAK = {
    "date": "2026-12-07 10:40 UTC", "machine": f"{CPU}, 2 cores, 24 GiB",
    "command": "python -m b4serve.lab.soak --duration 60", "clients": 16, "sent": 640,
    "worker_logged": True, "frontend_collected": True,
    "worker_retained_start_mb": 446.0, "worker_retained_end_mb": 447.0, "worker_growth": 0.002,
    "frontend_retained_start_mb": 99.0, "frontend_retained_end_mb": 100.0,
    "frontend_growth": 0.01,
    "readings": [_reading(5.0 * i, i >= 4, 440.0 + i) for i in range(10)],
}  # fmt: skip


def _labelled_with_unit(label: str, unit: str) -> bool:
    return bool(label) and f"({unit}" in label


def test_bench_plot_pairs_each_served_runtime_with_its_in_process_ceiling() -> None:
    bars = throughputs(BENCH_ROWS)
    assert [(b.label.split("\n")[0], b.served, b.in_process) for b in bars[:2]] == [
        ("ours (auto)", 11.3, 12.5),  # best over client counts; the client job is not one
        ("seed baseline", 4.1, 7.9),
    ]
    assert "in-process: torchscript fp32" in bars[0].label
    assert bars[2].label.startswith("torchscript, no fusion") and math.isnan(bars[2].served)


def test_bench_latency_runs_over_the_client_counts_in_order() -> None:
    found = {series.config: series for series in latencies(BENCH_ROWS)}
    assert set(found) == {"ours (auto)", "seed baseline"}
    seed = found["seed baseline"]
    assert (seed.clients, seed.p50_ms, seed.p99_ms) == ([1, 32], [1164.3, 4492.8],
                                                        [1292.2, 8591.6])  # fmt: skip


def test_bench_picture_names_its_axes_with_units_and_the_records_cpu_and_date(
    tmp_path: Path,
) -> None:
    figure = bench_figure(BENCH)
    rates, lines = figure.axes
    assert _labelled_with_unit(rates.get_xlabel(), "TTA images/s")
    assert "clients" in lines.get_xlabel()
    assert _labelled_with_unit(lines.get_ylabel(), "ms")
    title = figure.get_suptitle()
    assert CPU in title and "2026-12-02 01:14 UTC" in title and "scripts/bench.sh" in title
    assert len(rates.patches) == 2 * len(throughputs(BENCH_ROWS))
    assert [line.get_label() for line in lines.get_lines()[::2]] == ["ours (auto)", "seed baseline"]
    _assert_small_png(figure, tmp_path / "bench.png")


def test_soak_picture_draws_every_reading_and_shades_the_warm_up(tmp_path: Path) -> None:
    figure = soak_figure(SOAK)
    worker, frontend = figure.axes
    for axes in (worker, frontend):
        assert _labelled_with_unit(axes.get_ylabel(), "MiB")
    assert _labelled_with_unit(frontend.get_xlabel(), "s")
    title = figure.get_suptitle()
    assert CPU in title and "2026-12-07 10:40 UTC" in title and "--duration 60" in title
    retained = worker.get_lines()[0]
    assert list(retained.get_ydata()) == [440.0 + i for i in range(10)]
    assert list(retained.get_xdata()) == [5.0 * i for i in range(10)]
    warm_up = [p for p in worker.patches if p.get_label() == "warm-up"]
    # up to the warm-up's last reading, which is the first measured one
    assert len(warm_up) == 1 and (warm_up[0].get_x(), warm_up[0].get_width()) == (0, 20.0)
    assert len(frontend.get_lines()) == 3  # retained, live heap, resident
    _assert_small_png(figure, tmp_path / "soak.png")


def test_soak_picture_without_jcmd_leaves_the_live_heap_out() -> None:
    readings = [_reading(5.0 * i, True, 440.0, heap=None) for i in range(4)]
    record = {**SOAK, "frontend_collected": False, "readings": readings}
    frontend = soak_figure(record).axes[1]
    assert [line.get_label() for line in frontend.get_lines()] == [
        "frontend resident", "frontend resident under load"]  # fmt: skip


def _assert_small_png(figure: Figure, path: Path) -> None:
    save(figure, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 200_000


@pytest.mark.parametrize("record", ["docs/performance.json", "docs/layout.json"])
def test_the_committed_bench_records_draw(record: str, tmp_path: Path) -> None:
    import json

    root = Path(__file__).resolve().parents[2]
    figure = bench_figure(json.loads((root / record).read_text()))
    assert figure.axes[0].patches  # bars drawn
    _assert_small_png(figure, tmp_path / "record.png")


def test_the_soak_record_is_what_its_picture_reads() -> None:
    import json

    from b4serve.lab.soak import MemoryReading, SoakReport, record

    readings = [MemoryReading(2.0 * i, i > 1, 446.0, 880.0, 99.5, 16.0, 210.0) for i in range(5)]
    report = SoakReport(duration_s=6, clients=4, sent=48, worker_logged=True,
                        frontend_collected=True, worker_retained_start_mb=446.0,
                        worker_retained_end_mb=446.0, frontend_retained_start_mb=99.5,
                        frontend_retained_end_mb=99.5, readings=readings)  # fmt: skip
    written = json.loads(json.dumps(record(report, "python -m b4serve.lab.soak --duration 6")))
    figure = soak_figure(written)
    assert "--duration 6" in figure.get_suptitle() and "48 requests" in figure.get_suptitle()
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [0.0, 2.0, 4.0, 6.0, 8.0]
