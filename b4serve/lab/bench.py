"""Side-by-side benchmark: in-process ceiling, end to end through TorchServe, seed baseline, memory.

    python -m b4serve.lab.bench --output docs/PERFORMANCE.md --json bench.json

Everything runs in one process on one machine, against throwaway servers (b4serve.lab.sandbox) on
free loopback ports, with the DEMO model and 380x380 uint8 inputs. Throughput counts each image
once although TTA runs it twice. The machine is shared and noisy: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import requests
import torch

from b4serve.lab.demo import ensure_demo_checkpoint
from b4serve.lab.sandbox import DEMO_CACHE, Server, exit_on_sigterm, server_env
from b4serve.ops.client import predict_many
from b4serve.ops.manage import Registration
from b4serve.serving.allocator import freeze_long_lived_objects, keep_freed_memory
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import WARM_UP_CALLS, Classifier
from b4serve.serving.preprocess import Preprocessor, stack_channels_last
from b4serve.serving.runtime import Model, OnnxRuntimeModel, load_torchscript
from b4serve.serving.tta import tta_probabilities

__all__ = ["ServedConfig", "main"]

SIZE = 380
# Every row is measured in this many rounds by default, interleaved with all the others
# (see measure_in_rounds); the report gives each ratio per round too, to show its spread.
ROUNDS = 3
# Each in-process row's length, over all rounds. The ceiling is the best of several rows, and
# the best of short, noisy rows is biased up by whichever got a lucky spell: 8 s rows put the
# ONNX Runtime ceiling 7% above its other micro-batches in one run.
SECONDS = 24.0

# The targets on a 2-core CPU, one home for the ratios and the tables of what the machine allows.
SERVED_SHARE = 0.9  # end to end / in-process best of the same runtime, at least
TORCHSCRIPT_X_SEED = 3.0  # TorchScript end to end / the seed's, at least
FASTEST_X_SEED = 6.0  # the fastest runtime's end to end / the seed's, at least
IMAGES_PER_MINUTE = 1000  # TTA images end to end with the fastest runtime, at least
LONE_P99_X_MEDIAN = 1.5  # one client's p99 / the in-process median of the same work, at most


@dataclass(frozen=True)
class ServedConfig:
    """One way of serving the model: the archive's runtime switches and the registration."""

    name: str
    optimize: bool
    micro_batch: int
    batch_size: int
    max_batch_delay_ms: int
    workers: int = 1
    runtime: str = "torchscript"
    threads: int = 0  # per worker; 0: one per core
    malloc_keep_mb: int = ModelConfig.malloc_keep_mb  # 0: glibc's defaults
    onednn_fusion: bool = True

    def deploy_env(self) -> dict[str, str]:
        return {
            "B4_THREADS": str(self.threads),
            "B4_MALLOC_KEEP_MB": str(self.malloc_keep_mb),
            "B4_ONEDNN_FUSION": "1" if self.onednn_fusion else "0",
            "B4_RUNTIME": self.runtime,
            "B4_OPTIMIZE": "1" if self.optimize else "0",
            "B4_MICRO_BATCH": str(self.micro_batch),
            "B4_BATCH_SIZE": str(self.batch_size),
            "B4_MAX_BATCH_DELAY": str(self.max_batch_delay_ms),
            "B4_INITIAL_WORKERS": str(self.workers),
        }


# The seed: plain scripted model, whole server batch in one forward, 4 / 1000 ms, one worker,
# glibc's malloc as it comes.
SEED = ServedConfig("seed baseline", False, 4, 4, 1000, malloc_keep_mb=0, onednn_fusion=False)
# Ours, with the defaults scripts/deploy.sh registers.
DEFAULT = ServedConfig(
    "ours (deploy defaults)",
    True,
    0,
    Registration.batch_size,
    Registration.max_batch_delay_ms,
    Registration.initial_workers,
)
# Workers versus threads on the CPU: two workers of one thread each instead of one of two.
TWO_WORKERS = ServedConfig(
    "ours, 2 workers x 1 thread",
    True,
    0,
    Registration.batch_size,
    Registration.max_batch_delay_ms,
    workers=2,
    threads=1,
)
# The optional runtime, same registration.
ONNX = ServedConfig(
    "ours, onnxruntime (deploy defaults)",
    True,
    0,
    Registration.batch_size,
    Registration.max_batch_delay_ms,
    Registration.initial_workers,
    runtime="onnxruntime",
)


@dataclass
class Row:
    """One measured configuration: what ran, how many images, how fast, how long each took."""

    section: str
    config: str
    setting: str
    images: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list, repr=False)
    # in-process rows: the served configuration whose ceiling this row measures
    ceiling_of: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        """What the row measured: rows with the same key are rounds of one measurement."""
        return self.section, self.config, self.setting

    def add(self, other: Row) -> None:
        """Count ``other``'s images, time and latencies in this row (another round of it)."""
        self.images += other.images
        self.seconds += other.seconds
        self.latencies_s += other.latencies_s

    def percentile(self, q: float) -> float:
        """The ``q``-th latency percentile in seconds; NaN for a row without latencies."""
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(self.latencies_s, q))

    def summary(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data["images_per_s"] = round(self.images_per_s, 3)
        for q in (50, 95, 99):
            value = self.percentile(q)
            data[f"p{q}_ms"] = None if math.isnan(value) else round(value * 1e3, 1)  # JSON null
        return data


def demo_images(count: int, seed: int = 11) -> list[np.ndarray]:
    """Distinct 380x380 uint8 inputs (noise: content does not change the cost)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def timed(run: Callable[[], int], min_seconds: float, min_runs: int = 3) -> tuple[int, float]:
    """Call ``run`` (returns images done) until ``min_seconds`` and ``min_runs`` have passed."""
    images, runs, started = 0, 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - started < min_seconds:
        images += run()
        runs += 1
    return images, time.perf_counter() - started


@dataclass
class InProcess:
    """One runtime forwarding in this process: the ceiling of the served configuration it is
    measured beside, per micro-batch size."""

    name: str
    beside: ServedConfig
    model: Model
    images: list[torch.Tensor]
    nchw: bool = False  # the seed fed plain NCHW tensors
    warm: set[int] = field(default_factory=set)  # micro-batch sizes compiled already

    def measure(self, size: int, seconds: float) -> Row:
        """TTA forwards of ``size`` images for at least ``seconds``."""
        batch = stack_channels_last((self.images * size)[:size])
        if self.nchw:
            batch = batch.contiguous()

        def forward() -> int:
            tta_probabilities(self.model, batch)
            return size

        with torch.inference_mode():
            if size not in self.warm:  # the JIT profiles and compiles each new shape
                for _ in range(WARM_UP_CALLS):
                    forward()
                self.warm.add(size)
            done, took = timed(forward, seconds)
        print(f"  {self.name} micro-batch {size}: {done / took:.2f} img/s", file=sys.stderr)
        return Row(
            "in-process", self.name, f"micro-batch {size}", done, took, ceiling_of=self.beside.name
        )


def in_process_runtimes(build: Path, config: ModelConfig) -> list[InProcess]:
    """The seed's plain model and each of our runtimes, from one build holding both model.pt
    and model.onnx, each paired with the served configuration that runs it."""
    preprocess = Preprocessor(config)
    images = [preprocess(image) for image in demo_images(8)]
    cpu = torch.device("cpu")
    model_pt = build / "model.pt"
    return [
        InProcess("seed: plain scripted", SEED, load_torchscript(model_pt, cpu, optimize=False),
                  images, nchw=True),
        InProcess("ours: frozen, channels_last, oneDNN fusion", DEFAULT,
                  load_torchscript(model_pt, cpu, fuse=True), images),
        InProcess("ours: frozen, channels_last, no fusion", DEFAULT,
                  load_torchscript(model_pt, cpu, fuse=False), images),
        InProcess("ours: onnxruntime fp32", ONNX, OnnxRuntimeModel(build / "model.onnx"), images),
    ]  # fmt: skip


def served_classifier(server: Server, served: ServedConfig) -> Classifier:
    """The served version's own build, loaded and warmed up in this process as its worker does."""
    classifier = server.classifier(version_of(served))
    classifier.warm_up()
    freeze_long_lived_objects()  # as the handler does
    return classifier


def bench_lone_requests(
    server: Server, bodies: list[bytes], classifier: Classifier, count: int
) -> tuple[Row, Row]:
    """One client's latency next to the in-process latency of the same work, side by side.

    Each request is followed by the same body classified in this process (decode to JSON, the
    handler's path), so the two see the same moments of a noisy machine, and never compete: the
    worker is idle while this process computes, and this process waits while the worker does.
    """
    url, keys = server.endpoints.predictions_url, server.keys
    session = requests.Session()
    served: list[float] = []
    in_process: list[float] = []
    for index in range(count):
        body = bodies[index % len(bodies)]
        headers = {"Content-Type": "application/octet-stream", **keys.auth_headers("inference")}
        started = time.perf_counter()
        response = session.post(url, data=body, headers=headers)
        served.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"lone request failed: {response.status_code} {response.text}")
        started = time.perf_counter()
        classifier.classify([body])[0].answer()
        in_process.append(time.perf_counter() - started)
    return (
        Row("side by side", "served", "1 client", count, sum(served), served),
        Row("side by side", "in-process", "1 image", count, sum(in_process), in_process),
    )


def bench_http(server: Server, bodies: list[bytes], concurrency: int, requests_total: int) -> Row:
    """Closed loop: ``concurrency`` clients POST until ``requests_total`` answers came back."""
    url = server.endpoints.predictions_url
    keys = server.keys
    counter = iter(range(requests_total))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[int] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            headers = {"Content-Type": "application/octet-stream", **keys.auth_headers("inference")}
            started = time.perf_counter()
            response = session.post(url, data=bodies[index % len(bodies)], headers=headers)
            took = time.perf_counter() - started
            with lock:
                (latencies if response.status_code == 200 else failures).append(
                    took if response.status_code == 200 else response.status_code
                )

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    took = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return Row("end to end", "", f"{concurrency} clients", len(latencies), took, latencies)


def bench_client_job(server: Server, count: int) -> Row:
    """The bundled client on ``count`` in-memory images, 8 in flight, as a user would run it."""
    images = demo_images(count, seed=13)
    started = time.perf_counter()
    results = predict_many(images, endpoints=server.endpoints, concurrency=8)
    took = time.perf_counter() - started
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"client job: {len(failed)} inputs failed, first {failed[0]}")
    return Row("end to end", "", f"client, {count} images", count, took)


def server_memory_mb(server: Server) -> dict[str, float]:
    """Resident memory of the frontend (Java) and of each Python worker."""
    pid = int((Path(server.env["B4_TMPDIR"]) / ".model_server.pid").read_text())
    frontend = psutil.Process(pid)
    memory = {"frontend": frontend.memory_info().rss / 2**20}
    workers = [p for p in frontend.children(recursive=True) if "python" in p.name().lower()]
    for number, worker in enumerate(workers):
        memory[f"worker {number}"] = worker.memory_info().rss / 2**20
    return memory


def plain_script_memory_mb(model_path: Path) -> float:
    """Peak RSS of a bare script that loads the model and classifies a few images."""
    code = (
        "import resource, torch\n"
        f"m = torch.jit.freeze(torch.jit.load({str(model_path)!r}).eval())\n"
        f"x = torch.rand(2, 3, {SIZE}, {SIZE})\n"
        "with torch.inference_mode():\n"
        "    [m(x) for _ in range(3)]\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return int(output.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def version_of(served: ServedConfig) -> str:
    """A model version name for ``served`` (letters, digits, dashes)."""
    return "bench-" + "".join(ch if ch.isalnum() else "-" for ch in served.name)[:40]


def deploy_served(
    server: Server, served: ServedConfig, checkpoint: Path, bodies: list[bytes]
) -> None:
    """Deploy ``served`` as its own version on its own server, and send it a few of ``bodies``
    (warm-up: connections open, and the worker has seen real inputs)."""
    server.deploy(
        "--checkpoint", str(checkpoint), "--trust-checkpoint", "--version", version_of(served),
        **served.deploy_env(),
    )  # fmt: skip
    bench_http(server, bodies, 2, 8)


def measure_in_rounds(
    servers: dict[str, Server],
    served: Sequence[tuple[ServedConfig, dict[str, int]]],
    bodies: list[bytes],
    runtimes: Sequence[InProcess],
    micro_batches: Sequence[int],
    seconds: float,
    rounds: int = ROUNDS,
) -> list[list[Row]]:
    """Every served and in-process row, measured in ``rounds`` interleaved rounds; the rows of
    each round (:func:`merge_rounds` adds them up).

    Each round serves every configuration at 1, 8 and 32 clients, then forwards the runtimes
    paired with it in this process (the other servers idle), so slow and fast spells of a shared
    machine fall on all rows alike.
    """
    measured: list[list[Row]] = []
    for number in range(rounds):
        print(f"round {number + 1} of {rounds}", file=sys.stderr)
        rows: list[Row] = []
        for config_served, requests_plan in served:
            server = servers[config_served.name]
            for concurrency in (1, 8, 32):
                row = bench_http(server, bodies, concurrency, requests_plan[f"c{concurrency}"])
                row.config = config_served.name
                print(
                    f"  {row.config} {row.setting}: {row.images_per_s:.2f} img/s", file=sys.stderr
                )
                rows.append(row)
            for runtime in runtimes:
                if runtime.beside is config_served:
                    rows += [runtime.measure(size, seconds) for size in micro_batches]
        measured.append(rows)
    return measured


def merge_rounds(rounds: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per measurement, adding up its rounds; the rounds' own rows stay as they were."""
    merged: list[Row] = []
    for rows in rounds:
        for row in rows:
            add_row(merged, replace(row, latencies_s=list(row.latencies_s)))
    return merged


def add_row(rows: list[Row], row: Row) -> None:
    """Add ``row`` to the row of the same section, configuration and setting, or append it."""
    found = next((r for r in rows if r.key == row.key), None)
    if found is None:
        rows.append(row)
    else:
        found.add(row)


def machine() -> str:
    """What this ran on, for the table's heading."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"Python {platform.python_version()}"
    )


def markdown(
    rows: list[Row],
    memory: dict[str, dict[str, float]],
    ratios: dict[str, tuple[float, str]],
    info: dict,
    ratios_per_round: Sequence[dict[str, tuple[float, str]]] = (),
) -> str:
    rounds = info.get("rounds", ROUNDS)
    lines = [
        "# Performance",
        "",
        f"Measured {info['date']} on: {info['machine']}.",
        f"Command: `{info['command']}` ({info['minutes']:.1f} minutes).",
        "Demo EfficientNet-B4, 380x380 uint8 inputs, horizontal-flip TTA (each image counted once",
        "though it runs twice). Shared, noisy machine: compare ratios within this run only.",
        "Side by side: every configuration's server runs for the whole benchmark, and the rows",
        f"are measured in {rounds} rounds; each round serves every configuration at 1, 8 and 32",
        "clients and right after each forwards the same runtime in-process (the other servers",
        "idle), so slow and fast spells of the machine fall on all rows alike. Each row adds up",
        "its rounds, and each ratio is given per round too, for its spread. The lone-request",
        "rows alternate each request with the same body classified in-process. In-process rows",
        "run with the workers' allocator setting (b4serve.serving.allocator); the seed's server",
        "keeps glibc's defaults, as the seed did.",
        "",
        "| section | configuration | setting | images | img/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.summary()
        cells = [s["section"], s["config"], s["setting"], s["images"], f"{row.images_per_s:.2f}"]
        cells += ["" if s[f"p{q}_ms"] is None else s[f"p{q}_ms"] for q in (50, 95, 99)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "## Resident memory (MiB)",
        "",
        "| configuration | process | RSS |",
        "|---|---|---|",
    ]
    for config, processes in memory.items():
        for process, mb in processes.items():
            lines.append(f"| {config} | {process} | {mb:.0f} |")
    lines += [
        "",
        "## Ratios",
        "",
        "| ratio | value | per round | target |",
        "|---|---|---|---|",
    ]
    for name, (value, target) in ratios.items():
        spread = [r[name][0] for r in ratios_per_round if name in r]
        per_round = ", ".join(f"{v:.2f}" for v in spread)
        lines.append(f"| {name} | {value:.2f} | {per_round} | {target} |")
    lines += ["", "## What this hardware allows", "", *ceilings(rows), "", *latency_floor(rows)]
    return "\n".join(lines) + "\n"


def ceilings(rows: list[Row]) -> list[str]:
    """The best any serving setup could reach here: a served model cannot beat its own
    in-process forward speed, so each throughput target is compared with that ceiling, and with
    the share of it the served path reached in this run."""
    seed_e2e = best_served(rows, SEED)
    runtimes = {"torchscript": DEFAULT, "onnxruntime": ONNX}
    fastest = max(runtimes, key=lambda name: best_ceiling(rows, runtimes[name]))
    lines = [
        "Upper bounds from this run's in-process ceilings (end to end can only be slower): the",
        "share of its runtime's ceiling each target needs served, next to the share served here.",
        "Each ceiling is one process using every core, as the default worker does; under load,",
        "two workers of one thread each can pass it (the 2-workers ratio above).",
        "",
        "| target | needs (TTA img/s) | in-process ceiling (TTA img/s) | needs / ceiling "
        "| served / ceiling | reachable here |",
        "|---|---|---|---|---|---|",
    ]
    for name, runtime, needs in (
        (
            f"torchscript >= {TORCHSCRIPT_X_SEED:g}x seed end to end",
            "torchscript",
            TORCHSCRIPT_X_SEED * seed_e2e,
        ),
        (
            f"fastest runtime ({fastest}) >= {FASTEST_X_SEED:g}x seed end to end",
            fastest,
            FASTEST_X_SEED * seed_e2e,
        ),
        (
            f">= {IMAGES_PER_MINUTE:,} TTA images/minute ({fastest})",
            fastest,
            IMAGES_PER_MINUTE / 60,
        ),
    ):
        served = runtimes[runtime]
        ceiling = best_ceiling(rows, served)
        share_needed = needs / ceiling
        share_served = best_served(rows, served) / ceiling
        if share_needed > 1:
            reachable = "no: above the ceiling"
        elif share_needed > share_served:
            reachable = "at the limit: needs more of the ceiling than was served"
        else:
            reachable = "yes"
        lines.append(
            f"| {name} | {needs:.2f} | {ceiling:.2f} | {share_needed:.2f} | {share_served:.2f} "
            f"| {reachable} |"
        )
    return lines


def latency_floor(rows: Sequence[Row]) -> list[str]:
    """The lone-request target against the machine's own tail: the in-process p99 of the same
    work, measured alternately with the served requests, is a floor no serving setup gets under."""
    served, single = lone_request_rows(rows)
    if not (served and single):
        return []
    median, floor, p99 = single.percentile(50), single.percentile(99), served.percentile(99)
    needs = LONE_P99_X_MEDIAN * median
    if floor > needs:
        reachable = "no: the machine's own tail is above it"
    elif p99 > needs:
        reachable = "at the limit: the machine's own tail and what serving adds cross it"
    else:
        reachable = "yes"
    return [
        "The lone-request target against the machine's own tail: the in-process p99 of the same",
        "work, classified alternately with the served requests, is a floor for the served p99.",
        "",
        "| target | needs p99 (ms) | in-process p99 (ms) | in-process p99 / median "
        "| served p99 / in-process p99 | reachable here |",
        "|---|---|---|---|---|---|",
        f"| 1-client p99 <= {LONE_P99_X_MEDIAN:g}x in-process median | {needs * 1e3:.0f} "
        f"| {floor * 1e3:.0f} "
        f"| {floor / median:.2f} | {p99 / floor:.2f} | {reachable} |",
    ]


def lone_request_rows(rows: Sequence[Row]) -> tuple[Row | None, Row | None]:
    """The lone-request pair: served, and the same bodies classified in-process alternately."""

    def find(config: str, setting: str) -> Row | None:
        key = ("side by side", f"{DEFAULT.name}: {config}", setting)
        return next((r for r in rows if r.key == key), None)

    return find("served", "1 client"), find("in-process", "1 image")


def best_served(rows: Sequence[Row], served: ServedConfig) -> float:
    """The highest end-to-end throughput of ``served``, at any number of clients."""
    rates = [r.images_per_s for r in rows if r.section == "end to end" and r.config == served.name]
    return max(rates, default=float("nan"))


def best_ceiling(rows: Sequence[Row], served: ServedConfig) -> float:
    """The highest in-process throughput of the runtimes measured as ``served``'s ceiling."""
    rates = [
        r.images_per_s for r in rows if r.section == "in-process" and r.ceiling_of == served.name
    ]
    return max(rates, default=float("nan"))


def compute_ratios(rows: Sequence[Row]) -> dict[str, tuple[float, str]]:
    def rate(config: str, setting: str) -> float:
        return next(
            (r.images_per_s for r in rows if r.config == config and r.setting == setting),
            float("nan"),
        )

    ours_e2e, onnx_e2e = best_served(rows, DEFAULT), best_served(rows, ONNX)
    seed_e2e, two_workers_e2e = best_served(rows, SEED), best_served(rows, TWO_WORKERS)
    ours_inproc, onnx_inproc = best_ceiling(rows, DEFAULT), best_ceiling(rows, ONNX)
    at_least_share = f">= {SERVED_SHARE:g}"
    ratios = {
        "torchscript: end to end / in-process best": (ours_e2e / ours_inproc, at_least_share),
        "onnxruntime: end to end / in-process best": (onnx_e2e / onnx_inproc, at_least_share),
        "torchscript end to end / seed end to end": (
            ours_e2e / seed_e2e,
            f">= {TORCHSCRIPT_X_SEED:g}",
        ),
        "onnxruntime end to end / seed end to end": (onnx_e2e / seed_e2e, f">= {FASTEST_X_SEED:g}"),
        "torchscript, 2 workers x 1 thread, end to end / seed end to end": (
            two_workers_e2e / seed_e2e,
            "(context: the same runtime laid out for load)",
        ),
        "torchscript in-process best / seed in-process best": (
            ours_inproc / best_ceiling(rows, SEED),
            "(context)",
        ),
        "fastest end to end, TTA images per minute": (
            max(ours_e2e, onnx_e2e) * 60,
            f">= {IMAGES_PER_MINUTE}",
        ),
        "2 workers x 1 thread / 1 worker x 2 threads, end to end best": (
            two_workers_e2e / ours_e2e,
            "(context: > 1 favours workers)",
        ),
        "ours 1-client throughput / 32-client": (
            rate(DEFAULT.name, "1 clients") / rate(DEFAULT.name, "32 clients"),
            "(context)",
        ),
    }
    lone, single = lone_request_rows(rows)
    if lone and single:
        for label, q, target in (
            ("p99 / in-process single-image median", 50, f"<= {LONE_P99_X_MEDIAN:g}"),
            ("p99 / in-process single-image p99", 99, "(context: the machine's own tail)"),
        ):
            ratios[f"ours 1-client {label}, side by side"] = (
                lone.percentile(99) / single.percentile(q),
                target,
            )
        ratios["ours 1-client p50 / in-process single-image p50, side by side"] = (
            lone.percentile(50) / single.percentile(50),
            "(context: what serving adds)",
        )
    return ratios


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b4serve.lab.bench", description=__doc__)
    parser.add_argument("--output", type=Path, help="markdown table (e.g. docs/PERFORMANCE.md)")
    parser.add_argument("--json", type=Path, help="all rows as JSON")
    parser.add_argument(
        "--seconds", type=float, default=SECONDS, help="per in-process measurement, all rounds"
    )
    parser.add_argument("--quick", action="store_true", help="a few requests each (smoke test)")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="rounds the requests and seconds are split into"
    )
    parser.add_argument(
        "--client-images", type=int, default=1000, help="images in the bundled-client job"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    began = time.monotonic()
    quick = args.quick
    scale = 0.1 if quick else 1.0
    rounds = max(1, args.rounds)

    def plan(c1: int, c8: int, c32: int, client: int = 0, lone: int = 0) -> dict[str, int]:
        """Requests per round at each concurrency (totals given), and in the one-off jobs."""
        totals = {"c1": c1, "c8": c8, "c32": c32}
        per_round = {key: max(1, int(n * scale) // rounds) for key, n in totals.items()}
        once = {"client": client, "lone": lone}
        return per_round | {key: max(2, int(n * scale)) if n else 0 for key, n in once.items()}

    # Bounded by request counts, 8 and 32 clients' rows with 32 requests per round (of 3).
    # The 1,000-image client job runs on the fastest runtime; 200 lone requests on ours, so
    # p99 is not just the slowest one.
    served = [
        (SEED, plan(10, 24, 96)),
        (DEFAULT, plan(30, 96, 96, lone=200)),
        (TWO_WORKERS, plan(30, 96, 96)),
        (ONNX, plan(30, 96, 96, client=args.client_images)),
    ]
    micro = (1, 2) if quick else (1, 2, 4, 8)
    seconds = (1.0 if quick else args.seconds) / rounds
    # this process's in-process runs use the allocator setting the workers use
    keep_freed_memory(ModelConfig.malloc_keep_mb)
    checkpoint = ensure_demo_checkpoint(DEMO_CACHE)
    bodies = [encode_npy(image) for image in demo_images(16)]
    rows: list[Row] = []
    memory: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="b4bench-") as scratch:
        servers: dict[str, Server] = {}
        try:
            for config_served, _ in served:
                print(f"deploying: {config_served.name}", file=sys.stderr)
                root = Path(scratch) / version_of(config_served)
                root.mkdir()
                servers[config_served.name] = Server(env=server_env(root), root=root)
                deploy_served(servers[config_served.name], config_served, checkpoint, bodies[:2])
            # the ONNX build holds both model.pt and model.onnx of the same weights
            onnx_server = servers[ONNX.name]
            build = Path(onnx_server.env["B4_CACHE_DIR"]) / "build" / version_of(ONNX)
            runtimes = in_process_runtimes(build, ModelConfig.load(build / "extra"))
            freeze_long_lived_objects()  # as the workers do
            measured = measure_in_rounds(servers, served, bodies, runtimes, micro, seconds, rounds)
            rows += merge_rounds(measured)
            del runtimes
            for config_served, requests_plan in served:
                server = servers[config_served.name]
                memory[config_served.name] = server_memory_mb(server)  # at steady state
                if requests_plan["client"]:
                    row = bench_client_job(server, requests_plan["client"])
                    row.config = config_served.name
                    rows.append(row)
                if requests_plan["lone"]:
                    classifier = served_classifier(server, config_served)
                    for row in bench_lone_requests(
                        server, bodies, classifier, requests_plan["lone"]
                    ):
                        row.config = f"{config_served.name}: {row.config}"
                        rows.append(row)
                    del classifier
        finally:
            for server in servers.values():
                server.stop()
        memory["plain in-process script"] = {"python": plain_script_memory_mb(build / "model.pt")}
    ratios = compute_ratios(rows)
    ratios_per_round = [compute_ratios(round_rows) for round_rows in measured]
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "command": "scripts/bench.sh"
        + (" --quick" if quick else "")
        + (f" --rounds {rounds}" if rounds != ROUNDS else "")
        + (f" --seconds {args.seconds:g}" if args.seconds != SECONDS else ""),
        "minutes": (time.monotonic() - began) / 60,
        "rounds": rounds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    table = markdown(rows, memory, ratios, info, ratios_per_round)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    if args.json:
        payload = {
            "info": info,
            "rows": [r.summary() for r in rows],
            "memory_mb": memory,
            "ratios": {k: v[0] for k, v in ratios.items()},
            "ratios_per_round": [{k: v[0] for k, v in r.items()} for r in ratios_per_round],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
