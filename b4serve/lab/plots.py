"""Pictures of the bench's and the soak's JSON records, so any record can be drawn again.

    python -m b4serve.lab.plots bench docs/performance.json docs/performance.png
    python -m b4serve.lab.plots soak docs/soak.json docs/soak.png

The bench's: served and in-process TTA images/s per runtime, and latency against the number of
clients. The soak's: the worker's and the frontend's memory over the run. Each title names the
host's CPU and the date of the run. Matplotlib's object API only: no pyplot, no global backend.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = [
    "Latencies",
    "Throughput",
    "bench_figure",
    "latencies",
    "save",
    "soak_figure",
    "throughputs",
]

DPI = 100  # with the sizes below: PNGs of about 60-100 KB, small enough for git
TITLE_CHARS = 110  # a line of a title, at its font size and the figures' widths
_CLIENTS = re.compile(r"^(\d+) clients?$")


@dataclass(frozen=True)
class Throughput:
    """One runtime's bars: served end to end (NaN: no server ran it) and in-process."""

    label: str
    served: float
    in_process: float


@dataclass(frozen=True)
class Latencies:
    """One served configuration's latency (ms) at each number of clients it was measured at."""

    config: str
    clients: list[int]
    p50_ms: list[float]
    p99_ms: list[float]


def throughputs(rows: Sequence[Mapping[str, Any]]) -> list[Throughput]:
    """Per served configuration, its best end-to-end rate over the client counts and the best
    in-process rate of the runtime measured as its ceiling; then runtimes no server ran."""
    served = [r for r in rows if r["section"] == "end to end" and _CLIENTS.match(r["setting"])]
    found = []
    for config in dict.fromkeys(r["config"] for r in served):
        ceiling = [r for r in rows if r["section"] == "in-process" and r["ceiling_of"] == config]
        label = config if not ceiling else f"{config}\n(in-process: {ceiling[0]['config']})"
        found.append(Throughput(label, _best(served, config), _best(ceiling)))
    context = [r for r in rows if r["section"] == "in-process" and not r["ceiling_of"]]
    for config in dict.fromkeys(r["config"] for r in context):
        label = f"{config}\n(in-process only)"
        found.append(Throughput(label, float("nan"), _best(context, config)))
    return found


def _best(rows: Sequence[Mapping[str, Any]], config: str | None = None) -> float:
    rates = [r["images_per_s"] for r in rows if config is None or r["config"] == config]
    return max(rates, default=float("nan"))


def latencies(rows: Sequence[Mapping[str, Any]]) -> list[Latencies]:
    """Each served configuration's p50 and p99 latency against its number of clients."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        match = _CLIENTS.match(row["setting"])
        if row["section"] == "end to end" and match and row["p50_ms"] is not None:
            points.setdefault(row["config"], []).append(
                (int(match.group(1)), row["p50_ms"], row["p99_ms"])
            )
    found = []
    for config, measured in points.items():
        clients, p50, p99 = zip(*sorted(measured), strict=True)
        found.append(Latencies(config, list(clients), list(p50), list(p99)))
    return found


def bench_figure(record: Mapping[str, Any]) -> Figure:
    """The bench record's (``docs/performance.json``) throughput bars and latency lines."""
    info = record["info"]
    bars = throughputs(record["rows"])
    figure = Figure(figsize=(12, 0.55 * len(bars) + 2.8), layout="constrained")
    rates, lines = figure.subplots(1, 2, width_ratios=(1.35, 1))
    positions = range(len(bars))
    height = 0.4
    for offset, values, label in (
        (-height / 2, [b.served for b in bars], "served: end to end, best over client counts"),
        (height / 2, [b.in_process for b in bars], "in-process: same runtime, best micro-batch"),
    ):
        drawn = rates.barh([p + offset for p in positions], values, height, label=label)
        rates.bar_label(drawn, fmt="%.1f", padding=2, fontsize=7)
    rates.set_yticks(list(positions), [b.label for b in bars], fontsize=7)
    rates.invert_yaxis()
    rates.margins(x=0.1)  # room for the value at the end of the longest bar
    rates.set_xlabel("throughput (TTA images/s; an image and its mirror count once)")
    rates.set_title("Throughput per runtime", fontsize=10)
    rates.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
    rates.grid(axis="x", alpha=0.3)
    measured = latencies(record["rows"])
    for number, series in enumerate(measured):
        color = f"C{number}"
        lines.plot(series.clients, series.p50_ms, "o-", color=color, label=series.config)
        lines.plot(series.clients, series.p99_ms, "x--", color=color, alpha=0.6)
    lines.set_xscale("log", base=2)
    counts = sorted({count for series in measured for count in series.clients})
    lines.set_xticks(counts, [str(count) for count in counts])
    lines.set_yscale("log")
    lines.set_xlabel("concurrent clients (closed loop)")
    lines.set_ylabel("latency per request (ms, log scale)")
    lines.set_title("Latency against clients (p50 solid, p99 dashed)", fontsize=10)
    lines.legend(fontsize=6, loc="upper left")
    lines.grid(alpha=0.3, which="both")
    figure.suptitle(
        f"b4serve bench of {info['date']}: {info['machine']}\n"
        + _wrapped(f"{info.get('host', '')} ({info['command']})"),
        fontsize=10,
    )
    return figure


def soak_figure(record: Mapping[str, Any]) -> Figure:
    """The soak record's memory readings over time: the worker above, the frontend below."""
    readings = record["readings"]
    times = [r["t_s"] for r in readings]
    figure = Figure(figsize=(11, 6.5), layout="constrained")
    worker, frontend = figure.subplots(2, 1, sharex=True)
    worker_label = "retained (as it logs)" if record["worker_logged"] else "resident (not logged)"
    worker.plot(times, [r["worker_mb"] for r in readings], ".-", label=f"worker {worker_label}")
    worker.plot(times, [r["worker_rss_mb"] for r in readings], ".-", alpha=0.6,
                label="worker resident")  # fmt: skip
    frontend_label = "retained after a full GC" if record["frontend_collected"] else "resident"
    frontend.plot(times, [r["frontend_retained_mb"] for r in readings], ".-",
                  label=f"frontend {frontend_label}")  # fmt: skip
    heaps = [r["frontend_heap_mb"] for r in readings]
    if any(heap is not None for heap in heaps):
        frontend.plot(times, [float("nan") if h is None else h for h in heaps], ".-",
                      label="frontend live heap (after a full GC)")  # fmt: skip
    frontend.plot(times, [r["frontend_rss_before_mb"] for r in readings], ".-", alpha=0.6,
                  label="frontend resident under load")  # fmt: skip
    # the warm-up's last reading is the measured stretch's first (b4serve/lab/soak.py)
    measured_from = min((r["t_s"] for r in readings if r["measured"]), default=times[-1])
    for axes in (worker, frontend):
        if not readings[0]["measured"]:
            axes.axvspan(0, measured_from, color="grey", alpha=0.15, label="warm-up")
        axes.set_ylabel("memory (MiB)")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    worker.set_title(
        f"worker: {record['worker_retained_start_mb']:.0f} -> "
        f"{record['worker_retained_end_mb']:.0f} MiB ({record['worker_growth']:+.1%})",
        fontsize=9,
    )
    frontend.set_title(
        f"frontend: {record['frontend_retained_start_mb']:.0f} -> "
        f"{record['frontend_retained_end_mb']:.0f} MiB ({record['frontend_growth']:+.1%})",
        fontsize=9,
    )
    frontend.set_xlabel("time since the warm-up began (s)")
    figure.suptitle(
        f"b4serve soak of {record['date']}: {record['clients']} clients, "
        f"{record['sent']} requests measured\n"
        + _wrapped(f"{record['machine']} ({record['command']})"),
        fontsize=10,
    )
    return figure


def _wrapped(text: str) -> str:
    """``text`` broken into lines that fit a title's width."""
    return "\n".join(textwrap.wrap(text, TITLE_CHARS, break_on_hyphens=False))


def save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.lab.plots", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("kind", choices=("bench", "soak"), help="what wrote the record")
    parser.add_argument("record", type=Path, help="its JSON record")
    parser.add_argument("png", type=Path, help="where to write the picture")
    args = parser.parse_args(argv)
    draw = bench_figure if args.kind == "bench" else soak_figure
    print(save(draw(json.loads(args.record.read_text())), args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
