"""Load and soak: many clients for minutes; nothing lost, duplicated or wrong, memory flat.

    python -m b4serve.lab.soak --duration 300 --clients 16    # throwaway server, 1-minute keys
    python -m b4serve.lab.soak --use-running --duration 60    # the server scripts/deploy.sh runs

The load goes through the bundled client (retries, key renewal) in rounds of ``clients x 4``
requests: the demo's example images, whose answers must equal the server's own first answer for
each (and name the true class), plus one malformed body in every ``bad_every`` requests, which
must come back as its own 400.

What the server did is counted on the server's side: every input carries its own request id
(``X-Client-Request-Id``, the same on each retry) and the handler logs the id of every request it
answered, so an input is lost when its id never appears in the model log and duplicated when it
appears more than once (a retry of a request the server had run). Key turnover is a renewal the
server's access log recorded (``/token``) or an inference key that changed during the run, read
without renewing it.

Memory is read after every round, with nothing in flight: the worker's retained memory as it
logs it before each batch (resident less what malloc keeps free for reuse,
:mod:`b4serve.serving.allocator`), and the frontend's (the JVM's) retained memory and live heap
after a full collection (:mod:`b4serve.lab.jvm`): resident memory follows what each process's
allocator keeps, more than what it holds on to.
Each is compared between the end of the warm-up and the end of the run, as the medians of the
first and last quarter of the readings (:func:`quarters`). The warm-up lasts ``warmup_s`` and
``WARMUP_REQUESTS`` requests at least, then until the readings stop rising (:func:`settled`),
for at most ``MAX_EXTRA_WARMUP_S`` more: a JVM's footprint climbs for its first minute or so of
requests as its JIT compiles. A leak never settles, and what it adds after the warm-up shows as
growth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from b4serve.client import Result, predict_many
from b4serve.lab.demo import EXAMPLES_SEED, generate_images
from b4serve.lab.host import cpu_name
from b4serve.lab.jvm import JvmMemory, find_jcmd, read_memory
from b4serve.lab.served_log import handled_batches, handled_counts
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.health import _default_log_dir, worker_rss_mb
from b4serve.ops.keys import KeyFile
from b4serve.ops.manage import LogWatch, ManagementAPI
from b4serve.serving.allocator import retained_by_worker

__all__ = [
    "MemoryReading",
    "SoakReport",
    "WarmUp",
    "key_renewals",
    "quarters",
    "run_soak",
    "settled",
    "tally",
    "warm_up",
]

# Probabilities of the same image may differ by float noise between batch compositions.
TOLERANCE = 1e-4
MAX_GROWTH = 0.05  # worker and frontend memory may grow by 5% from the end of warm-up to the end
# Requests before the warm-up may end. Measured here: after 64 the frontend still grew 5.1% over
# the next 128; after 128 it grew 0.9% over the next 256 (docs/SOAK.md).
WARMUP_REQUESTS = 128
# Settled: the median of the last SETTLE_READINGS readings (one per round) is within SETTLE_RISE
# of the median of the SETTLE_READINGS before. The frontend's retained memory rose 102 -> 121
# MiB over its first 20 rounds here, its JIT compiling, more slowly towards the end, then held
# (tests/lab/test_soak.py replays it; with a 1% rise it settled at 117 and grew 5% after).
SETTLE_READINGS = 4
SETTLE_RISE = 0.005
MAX_EXTRA_WARMUP_S = 120.0  # a process that never settles is measured anyway: the growth tells
# How TorchServe's access log records a renewal of the inference key (our log4j pattern).
_RENEWAL = '"GET /token?type=inference HTTP/1.1" 200 '


@dataclass(frozen=True)
class MemoryReading:
    """One reading after a round (MiB), for the record and its plot (b4serve/lab/plots.py)."""

    t_s: float  # since the warm-up began
    measured: bool  # False: a warm-up reading
    worker_mb: float  # retained as the workers logged it, else resident
    worker_rss_mb: float
    frontend_retained_mb: float
    frontend_heap_mb: float | None  # None: not collected (no jcmd)
    frontend_rss_before_mb: float  # resident before the collection: under load


@dataclass
class SoakReport:
    """The figures of one soak run; ``problems()`` lists what broke the promises."""

    duration_s: float
    clients: int
    sent: int = 0  # inputs sent (each with its own request id)
    handled: int = 0  # answers the handler logged for those ids, repeats included
    lost: int = 0  # ids sent that the handler never answered
    duplicated: int = 0  # answers beyond the first for one id
    wrong: int = 0
    refused_as_expected: int = 0
    unexpected_errors: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    worker_restarts: int = 0
    # start and end: the medians of the first and last quarter of the readings (quarters())
    # retained (resident less malloc's free memory, b4serve/serving/allocator.py) as the workers
    # logged it when worker_logged, else resident
    worker_retained_start_mb: float = 0.0
    worker_retained_end_mb: float = 0.0
    worker_rss_peak_mb: float = 0.0  # the highest resident reading
    worker_logged: bool = False  # the workers logged what they retain in every reading
    # retained (resident less the free heap, b4serve/lab/jvm.py) after a full collection when
    # frontend_collected, else resident
    frontend_retained_start_mb: float = 0.0
    frontend_retained_end_mb: float = 0.0
    frontend_rss_peak_mb: float = 0.0  # the highest reading before a collection: under load
    frontend_heap_start_mb: float = 0.0  # live heap after a full collection (0: not read)
    frontend_heap_end_mb: float = 0.0
    frontend_collected: bool = False  # jcmd collected the frontend's garbage before each reading
    warmup_s: float = 0.0  # how long the warm-up ran
    settled: bool = False  # whether memory had settled when it ended (else it hit its bound)
    key_renewals: int = 0  # inference-key renewals in the server's access log during the run
    key_changed: bool = False  # the key file's inference key differed at the end
    healthy_after: bool = False
    images_per_s: float = 0.0
    readings: list[MemoryReading] = field(default_factory=list)  # every round's, in order

    @property
    def worker_growth(self) -> float:
        return _growth(self.worker_retained_start_mb, self.worker_retained_end_mb)

    @property
    def frontend_growth(self) -> float:
        return _growth(self.frontend_retained_start_mb, self.frontend_retained_end_mb)

    @property
    def frontend_heap_growth(self) -> float:
        return _growth(self.frontend_heap_start_mb, self.frontend_heap_end_mb)

    @property
    def keys_turned_over(self) -> bool:
        return self.key_renewals > 0 or self.key_changed

    def problems(self, require_key_renewal: bool = False) -> list[str]:
        found = [
            f"{name}: {value}"
            for name, value in (("lost", self.lost), ("duplicated", self.duplicated),
                                ("wrong", self.wrong), ("worker restarts", self.worker_restarts))
            if value
        ]  # fmt: skip
        if self.unexpected_errors:
            found.append(f"unexpected errors: {self.unexpected_errors}")
        measures = [
            ("worker retained memory", self.worker_retained_start_mb,
             self.worker_retained_end_mb),
            ("frontend retained memory", self.frontend_retained_start_mb,
             self.frontend_retained_end_mb),
        ]  # fmt: skip
        if self.frontend_collected:
            measures.append(
                ("frontend live heap", self.frontend_heap_start_mb, self.frontend_heap_end_mb)
            )
        for name, start, end in measures:
            if not start or not end:
                found.append(f"{name} could not be read")
            elif _growth(start, end) >= MAX_GROWTH:
                found.append(
                    f"{name} grew {_growth(start, end):.1%} ({start:.1f} -> {end:.1f} MiB)"
                )
        if not self.healthy_after:
            found.append("server not healthy after the run")
        if require_key_renewal and not self.keys_turned_over:
            found.append("keys never turned over during the run")
        return found

    def table(self) -> str:
        collected = "retained after a full GC" if self.frontend_collected else "no jcmd: resident"
        logged = "retained, as logged" if self.worker_logged else "resident: retained not logged"
        heap = "not read: jcmd (a JDK's tool) not found"
        if self.frontend_collected:
            start, end = self.frontend_heap_start_mb, self.frontend_heap_end_mb
            heap = f"{start:.1f} -> {end:.1f} MiB ({_growth(start, end):+.1%})"
        rows = [
            ("warm-up", f"{self.warmup_s:.0f} s, memory "
                        f"{'settled' if self.settled else 'still moving at its bound'}"),
            ("duration", f"{self.duration_s:.0f} s"), ("clients", str(self.clients)),
            ("requests sent", str(self.sent)),
            ("answers the server logged", str(self.handled)),
            ("lost (sent, never answered by the server)", str(self.lost)),
            ("duplicated (answered more than once)", str(self.duplicated)),
            ("wrong", str(self.wrong)),
            ("bad bodies refused with 400", str(self.refused_as_expected)),
            ("unexpected errors", json.dumps(self.unexpected_errors)),
            ("requests retried by the client", str(self.retried)),
            ("worker restarts", str(self.worker_restarts)),
            (f"worker memory ({logged}; peak: resident)",
             _memory(self.worker_retained_start_mb, self.worker_retained_end_mb,
                     self.worker_rss_peak_mb)),
            (f"frontend memory ({collected}; peak: resident under load)",
             _memory(self.frontend_retained_start_mb, self.frontend_retained_end_mb,
                     self.frontend_rss_peak_mb)),
            ("frontend live heap (after a full GC)", heap),
            ("key renewals the server recorded", str(self.key_renewals)),
            ("inference key changed", "yes" if self.key_changed else "no"),
            ("healthy after", "yes" if self.healthy_after else "no"),
            ("throughput", f"{self.images_per_s:.2f} images/s"),
        ]  # fmt: skip
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def quarters(readings: Sequence[float]) -> tuple[float, float]:
    """The medians of the first and of the last quarter of ``readings`` (at least one each).

    A leak moves the whole of the last quarter; one reading does not show it: the frontend's
    retained memory read 121, 121, 116, 121 MiB in a row with nothing leaking (its heap
    committed, not yet touched), and uncollected its resident memory read 176, 185, 176,
    187 MiB within 30 s."""
    if not readings:
        return 0.0, 0.0
    quarter = max(1, len(readings) // 4)
    return statistics.median(readings[:quarter]), statistics.median(readings[-quarter:])


def settled(readings: Sequence[float]) -> bool:
    """Whether the median of the last ``SETTLE_READINGS`` readings is within ``SETTLE_RISE`` of
    the median of the ``SETTLE_READINGS`` before: memory stopped climbing. A leak of more than
    SETTLE_RISE every SETTLE_READINGS rounds never settles; one odd reading does not count."""
    if len(readings) < 2 * SETTLE_READINGS:
        return False
    before = statistics.median(readings[-2 * SETTLE_READINGS : -SETTLE_READINGS])
    last = statistics.median(readings[-SETTLE_READINGS:])
    return before > 0 and last <= before * (1 + SETTLE_RISE)


def _growth(start: float, end: float) -> float:
    return (end - start) / start if start else 0.0


def _memory(start: float, end: float, peak: float) -> str:
    return f"{start:.0f} -> {end:.0f} MiB ({_growth(start, end):+.1%}; peak {peak:.0f})"


@dataclass
class _Load:
    """The repeating mix of inputs and what each must get back (None: refused with 400)."""

    images: list[np.ndarray]
    answers: list[list[float]]
    bad_every: int
    bad: np.ndarray = field(default_factory=lambda: np.full((32, 32, 3), np.nan, np.float32))

    @classmethod
    def build(cls, endpoints: Endpoints, bad_every: int) -> _Load:
        """The demo examples and the server's own answer for each, checked against its label."""
        images, labels = generate_images(per_class=2, seed=EXAMPLES_SEED)
        reference = predict_many(list(images), endpoints=endpoints, concurrency=1)
        for result, label in zip(reference, labels, strict=True):
            if result.probabilities is None or int(np.argmax(result.probabilities)) != label:
                raise RuntimeError(f"reference answer is wrong for class {label}: {result}")
        return cls(list(images), [r.probabilities or [] for r in reference], bad_every)

    def item(self, position: int) -> tuple[np.ndarray, list[float] | None]:
        if self.bad_every and position % self.bad_every == self.bad_every - 1:
            return self.bad, None  # NaN pixels: InvalidInput
        index = position % len(self.images)
        return self.images[index], self.answers[index]

    def round(self, size: int, start: int) -> tuple[list[np.ndarray], list[list[float] | None]]:
        items = [self.item(start + i) for i in range(size)]
        return [image for image, _ in items], [answer for _, answer in items]


def _workers(api: ManagementAPI, model: str) -> dict[int, float | None]:
    """pid -> resident MiB of the serving version's workers."""
    version = api.default_version(model)
    described = api.describe(model, version) if version else None
    pids = [int(w["pid"]) for w in (described or {}).get("workers", []) if w.get("pid")]
    return {pid: worker_rss_mb(pid) for pid in pids}


def _resident_mb(workers: dict[int, float | None]) -> float:
    return sum(rss or 0.0 for rss in workers.values())


def _frontend_pid(workers: dict[int, float | None]) -> int | None:
    """The frontend's pid: the JVM that started the workers; None if it cannot be found."""
    for pid in workers:
        try:
            parent = psutil.Process(pid).parent()
            if parent is not None and "java" in parent.name():
                return parent.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@dataclass
class _Memory:
    """The worker's and the frontend's memory, read after each round (nothing in flight)."""

    api: ManagementAPI
    model: str
    jcmd: str | None  # None: the frontend is read uncollected
    model_log: LogWatch  # where the workers log what they retain, batch by batch
    workers: dict[int, float | None] = field(default_factory=dict)  # as the last reading found
    worker: list[float] = field(default_factory=list)  # retained, or resident where not logged
    worker_logged: list[bool] = field(default_factory=list)
    worker_rss: list[float] = field(default_factory=list)
    frontend: list[JvmMemory] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # of each reading, since started
    seconds: float = 0.0  # spent reading (collecting, parsing), not serving
    started: float = field(default_factory=time.monotonic)
    _lines_read: int = 0

    def read(self) -> tuple[float, float]:
        """Read both; return the worker's and the frontend's retained MiB (0 if unreadable)."""
        started = time.monotonic()
        self.workers = _workers(self.api, self.model)
        pid = _frontend_pid(self.workers)
        try:
            frontend = read_memory(pid, self.jcmd) if pid else JvmMemory(0.0, 0.0)
        except psutil.Error:
            frontend = JvmMemory(0.0, 0.0)
        self.frontend.append(frontend)
        # the workers' last word in this round (the log lags the answers by a moment: the
        # collection above gives it time); resident memory if they logged none
        lines = self.model_log.lines()
        logged = retained_by_worker(lines[self._lines_read :])
        self._lines_read = len(lines)
        resident = _resident_mb(self.workers)
        self.worker.append(sum(logged.values()) if logged else resident)
        self.worker_logged.append(bool(logged))
        self.worker_rss.append(resident)
        self.times.append(started - self.started)
        self.seconds += time.monotonic() - started
        return self.worker[-1], frontend.retained_mb

    def describe(self) -> str:
        worker = f"worker retained {self.worker[-1]:.1f} MiB (resident {self.worker_rss[-1]:.0f})"
        if not self.worker_logged[-1]:
            worker = f"worker resident {self.worker_rss[-1]:.0f} MiB (retained not logged)"
        frontend = self.frontend[-1]
        if frontend.heap_mb is None:
            return f"{worker}, frontend resident {frontend.rss_mb:.0f} MiB"
        return (f"{worker}, frontend retained {frontend.retained_mb:.1f} MiB (heap "
                f"{frontend.heap_mb:.1f}, JIT code {frontend.code_resident_mb:.1f}, resident "
                f"{frontend.rss_mb:.0f})")  # fmt: skip

    def report(self, report: SoakReport, first: int) -> None:
        """Fill ``report``'s memory figures from the readings from index ``first`` on, and
        its record of every reading."""
        report.readings = [
            MemoryReading(round(t, 2), index >= first, worker, rss, jvm.retained_mb, jvm.heap_mb,
                          jvm.rss_before_mb)
            for index, (t, worker, rss, jvm) in enumerate(
                zip(self.times, self.worker, self.worker_rss, self.frontend, strict=True))
        ]  # fmt: skip
        worker, frontend = self.worker[first:], self.frontend[first:]
        report.worker_logged = all(self.worker_logged[first:])
        report.worker_retained_start_mb, report.worker_retained_end_mb = quarters(worker)
        report.worker_rss_peak_mb = max(self.worker_rss[first:])
        report.frontend_retained_start_mb, report.frontend_retained_end_mb = quarters(
            [f.retained_mb for f in frontend]
        )
        report.frontend_rss_peak_mb = max(f.rss_before_mb for f in frontend)
        heaps = [f.heap_mb for f in frontend]
        report.frontend_collected = all(heap is not None for heap in heaps)
        if report.frontend_collected:
            report.frontend_heap_start_mb, report.frontend_heap_end_mb = quarters(
                [heap or 0.0 for heap in heaps]
            )


def key_renewals(access_log_lines: Sequence[str]) -> int:
    """How many inference-key renewals (``GET /token?type=inference``, 200) the lines record."""
    return sum(_RENEWAL in line for line in access_log_lines)


def tally(
    report: SoakReport,
    results: Sequence[Result],
    expected: Sequence[list[float] | None],
    handled: Counter[str],
) -> None:
    """Add one round to ``report``: the client's ``results`` (one per input, in order) checked
    against ``expected``, and the handler's logged answers per request id (``handled``)."""
    report.sent += len(results)
    for result, want in zip(results, expected, strict=True):
        answers = handled[result.request_id] if result.request_id else 0
        report.handled += answers
        report.lost += answers == 0
        report.duplicated += max(0, answers - 1)
        report.retried += int(result.attempts > 1)
        if want is None:
            status = (result.error or {}).get("status")
            if status == 400 and (result.error or {}).get("type") == "InvalidInput":
                report.refused_as_expected += 1
            else:
                report.wrong += 1
        elif not result.ok:
            kind = f"{(result.error or {}).get('status')} {(result.error or {}).get('type')}"
            report.unexpected_errors[kind] = report.unexpected_errors.get(kind, 0) + 1
        elif np.abs(np.asarray(result.probabilities) - np.asarray(want)).max() > TOLERANCE:
            report.wrong += 1


@dataclass
class WarmUp:
    """How a warm-up went: its length, and whether memory had settled when it ended."""

    seconds: float
    settled: bool


def warm_up(
    one_round: Callable[[], tuple[float, float]],
    *,
    min_s: float,
    min_rounds: int,
    max_extra_s: float = MAX_EXTRA_WARMUP_S,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = lambda _: None,
) -> WarmUp:
    """Run ``one_round`` (load, then read worker and frontend MiB) for ``min_s`` and
    ``min_rounds`` at least, then until both readings have settled or ``max_extra_s`` more
    have passed."""
    started = clock()
    worker: list[float] = []
    frontend: list[float] = []
    for rounds in itertools.count(1):
        worker_mb, frontend_mb = one_round()
        worker.append(worker_mb)
        frontend.append(frontend_mb)
        calm = settled(worker) and settled(frontend)
        elapsed = clock() - started
        say(f"warm-up {elapsed:.0f} s: worker {worker_mb:.0f} MiB, frontend {frontend_mb:.0f} "
            f"MiB{', settled' if calm else ''}")  # fmt: skip
        if rounds >= min_rounds and elapsed >= min_s and (calm or elapsed >= min_s + max_extra_s):
            return WarmUp(elapsed, calm)
    raise AssertionError("unreachable")  # itertools.count never ends


def run_soak(
    endpoints: Endpoints,
    log_dir: Path,
    *,
    duration_s: float,
    clients: int,
    warmup_s: float = 20.0,
    bad_every: int = 16,
    say: Callable[[str], None] = lambda _: None,
) -> SoakReport:
    """Load the served model for ``duration_s`` after ``warmup_s``; see the module doc.

    ``log_dir`` is the server's TorchServe log dir: its model log says what the handler answered.
    """
    if not (log_dir / "model_log.log").is_file():
        raise FileNotFoundError(
            f"no model_log.log in {log_dir}: point --log-dir (B4_LOG_DIR) at the server's log "
            "dir, where the handler logs the requests it answered"
        )
    keys = KeyFile.from_endpoints(endpoints)
    api = ManagementAPI(endpoints, keys)
    load = _Load.build(endpoints, bad_every)
    report = SoakReport(duration_s=duration_s, clients=clients)
    run = secrets.token_hex(4)  # this run's request ids: soak-<run>-<n>
    size = clients * 4
    position = sent = 0
    rounds: list[tuple[list[Result], list[list[float] | None]]] = []

    def one_round(measured: bool) -> None:
        nonlocal position, sent
        inputs, expected = load.round(size, position)
        ids = [f"soak-{run}-{'' if measured else 'warm-'}{position + i}" for i in range(size)]
        position += size
        results = predict_many(inputs, endpoints=endpoints, concurrency=clients, progress=False,
                               request_ids=ids)  # fmt: skip
        if measured:
            rounds.append((results, expected))
            sent += len(results)

    memory = _Memory(api, endpoints.model_name, find_jcmd(), LogWatch(log_dir))
    if memory.jcmd is None:
        say("no jcmd (a JDK's tool): the frontend's memory is read uncollected, which is noisy")

    def warm_round() -> tuple[float, float]:
        one_round(measured=False)
        return memory.read()

    warm = warm_up(warm_round, min_s=warmup_s, min_rounds=-(-WARMUP_REQUESTS // size), say=say)
    report.warmup_s, report.settled = warm.seconds, warm.settled
    first = len(memory.worker) - 1  # the warm-up's last reading is the measured stretch's first
    workers_at_start = dict(memory.workers)
    key_at_start = keys.read()["inference"].key  # read, not renewed: we only look
    model_log, access_log = LogWatch(log_dir), LogWatch(log_dir, "access_log.log")
    state = "settled" if report.settled else "NOT settled"
    say(f"warm after {report.warmup_s:.0f} s ({state}): {len(workers_at_start)} worker(s); "
        f"{memory.describe()}; measuring {duration_s:.0f} s")  # fmt: skip
    started, reading_before = time.monotonic(), memory.seconds
    while time.monotonic() - started < duration_s:
        one_round(measured=True)
        memory.read()
        say(f"{time.monotonic() - started:.0f} s: {sent} sent; {memory.describe()}")
    report.duration_s = time.monotonic() - started
    # throughput while serving: without the pauses to collect and read memory
    report.images_per_s = sent / (report.duration_s - (memory.seconds - reading_before))
    memory.report(report, first)
    report.worker_restarts = len(set(workers_at_start) - set(memory.workers))
    report.key_changed = keys.read()["inference"].key != key_at_start
    report.key_renewals = key_renewals(access_log.lines())
    sent_ids = [r.request_id for results, _ in rounds for r in results if r.request_id]
    handled = handled_counts(handled_batches(model_log, waiting_for=sent_ids))
    for results, expected in rounds:
        tally(report, results, expected, handled)
    report.healthy_after = api.ping()
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.lab.soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of measured load")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--warmup", type=float, default=30.0,
        help="seconds of unmeasured load at least; then on until memory settles (at most "
             f"{MAX_EXTRA_WARMUP_S:.0f} s more)",
    )  # fmt: skip
    parser.add_argument("--bad-every", type=int, default=16, help="one bad body per N (0: none)")
    parser.add_argument(
        "--token-expiration-min", type=float, default=1.0,
        help="key lifetime of the throwaway server (minutes), so keys turn over during the run",
    )  # fmt: skip
    parser.add_argument(
        "--use-running", action="store_true",
        help="load the server the B4_* variables point at instead of a throwaway one",
    )  # fmt: skip
    parser.add_argument(
        "--log-dir", type=Path, default=_default_log_dir(),
        help="with --use-running: the server's TorchServe log dir (default: $B4_LOG_DIR)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path,
        help="also write the figures here, with every memory reading (a record to plot)",
    )  # fmt: skip
    parser.add_argument(
        "--plot", type=Path, help="also draw memory over time as a PNG here (needs matplotlib)"
    )
    return parser.parse_args(argv)


def record(report: SoakReport, command: str) -> dict[str, object]:
    """The run's JSON record: its figures, every reading, and when, where and how it ran."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu_name()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": command,
        **asdict(report),
        "worker_growth": report.worker_growth,
        "frontend_growth": report.frontend_growth,
        "frontend_heap_growth": report.frontend_heap_growth,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from b4serve.lab.sandbox import Server, exit_on_sigterm, server_env  # only for the throwaway

    args = _parse_args(argv)

    def say(message: str) -> None:
        print(f"[soak] {message}", file=sys.stderr, flush=True)

    def soak(endpoints: Endpoints, log_dir: Path) -> SoakReport:
        return run_soak(
            endpoints, log_dir, duration_s=args.duration, clients=args.clients,
            warmup_s=args.warmup, bad_every=args.bad_every, say=say,
        )  # fmt: skip

    if args.use_running:
        report = soak(Endpoints.from_env(), args.log_dir)
    else:
        exit_on_sigterm()
        with tempfile.TemporaryDirectory(prefix="b4soak-") as root:
            server = Server(server_env(Path(root), args.token_expiration_min), Path(root))
            try:
                say("deploying a throwaway server (demo model)")
                server.deploy()
                report = soak(server.endpoints, server.log_dir)
            finally:
                server.stop()
    print(report.table())
    given = sys.argv[1:] if argv is None else list(argv)
    figures = record(report, " ".join(["python -m b4serve.lab.soak", *given]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if args.plot:
        from b4serve.lab.plots import save, soak_figure  # matplotlib: only to draw

        say(f"memory over time: {save(soak_figure(figures), args.plot)}")
    problems = report.problems(require_key_renewal=not args.use_running and args.duration > 90)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
