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
without renewing it. Worker and frontend (JVM) resident memory are compared between the end of
the warm-up (at least ``WARMUP_REQUESTS`` requests, however long they take: the JVM's heap and
Netty's buffer pools grow with the requests served, not with the time) and the end of the run,
each as the floor of its quarter of the readings (:func:`floors`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from b4serve.lab.demo import EXAMPLES_SEED, generate_images
from b4serve.lab.served_log import handled_batches, handled_counts
from b4serve.ops.client import Result, predict_many
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.health import _default_log_dir, worker_rss_mb
from b4serve.ops.keys import KeyFile
from b4serve.ops.manage import LogWatch, ManagementAPI

__all__ = ["SoakReport", "floors", "key_renewals", "run_soak", "tally"]

# Probabilities of the same image may differ by float noise between batch compositions.
TOLERANCE = 1e-4
MAX_GROWTH = 0.05  # worker and frontend memory may grow by 5% from the end of warm-up to the end
# Requests before memory is first read. Measured here: after 64 the frontend still grew 5.1% over
# the next 128; after 128 it grew 0.9% over the next 256 (docs/SOAK.md).
WARMUP_REQUESTS = 128
# How TorchServe's access log records a renewal of the inference key (our log4j pattern).
_RENEWAL = '"GET /token?type=inference HTTP/1.1" 200 '


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
    # start and end: the floors of the first and last quarter of the readings (floors())
    worker_rss_start_mb: float = 0.0
    worker_rss_end_mb: float = 0.0
    worker_rss_peak_mb: float = 0.0  # the highest reading (warm-up end, each round, the end)
    frontend_rss_start_mb: float = 0.0
    frontend_rss_end_mb: float = 0.0
    frontend_rss_peak_mb: float = 0.0
    key_renewals: int = 0  # inference-key renewals in the server's access log during the run
    key_changed: bool = False  # the key file's inference key differed at the end
    healthy_after: bool = False
    images_per_s: float = 0.0

    @property
    def worker_growth(self) -> float:
        return _growth(self.worker_rss_start_mb, self.worker_rss_end_mb)

    @property
    def frontend_growth(self) -> float:
        return _growth(self.frontend_rss_start_mb, self.frontend_rss_end_mb)

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
        for name, start, end in (
            ("worker", self.worker_rss_start_mb, self.worker_rss_end_mb),
            ("frontend", self.frontend_rss_start_mb, self.frontend_rss_end_mb),
        ):
            if not start or not end:
                found.append(f"{name} memory could not be read")
            elif _growth(start, end) >= MAX_GROWTH:
                found.append(
                    f"{name} memory grew {_growth(start, end):.1%} ({start:.0f} -> {end:.0f} MiB)"
                )
        if not self.healthy_after:
            found.append("server not healthy after the run")
        if require_key_renewal and not self.keys_turned_over:
            found.append("keys never turned over during the run")
        return found

    def table(self) -> str:
        rows = [
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
            ("worker memory", _memory(self.worker_rss_start_mb, self.worker_rss_end_mb,
                                      self.worker_rss_peak_mb)),
            ("frontend memory", _memory(self.frontend_rss_start_mb, self.frontend_rss_end_mb,
                                        self.frontend_rss_peak_mb)),
            ("key renewals the server recorded", str(self.key_renewals)),
            ("inference key changed", "yes" if self.key_changed else "no"),
            ("healthy after", "yes" if self.healthy_after else "no"),
            ("throughput", f"{self.images_per_s:.2f} images/s"),
        ]  # fmt: skip
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def floors(readings: Sequence[float]) -> tuple[float, float]:
    """The lowest of the first and of the last quarter of ``readings`` (at least one each).

    A leak raises the floor of what a process holds between requests; a single reading does
    not show it: the frontend's RSS, read after each round with nothing in flight, went
    176, 185, 176, 187 MiB within 30 s (garbage not yet collected, request buffers not yet
    returned), so one end reading against one start reading flagged 6.7% "growth" in a run
    whose floor stayed at 176."""
    if not readings:
        return 0.0, 0.0
    quarter = max(1, len(readings) // 4)
    return min(readings[:quarter]), min(readings[-quarter:])


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


def _frontend_rss_mb(workers: dict[int, float | None]) -> float:
    """Resident MiB of the frontend (the JVM that started the workers); 0 if it cannot be read."""
    for pid in workers:
        try:
            parent = psutil.Process(pid).parent()
            if parent is not None and "java" in parent.name():
                return parent.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return 0.0


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

    warm_until = time.monotonic() + warmup_s
    for warm_round in itertools.count(1):
        one_round(measured=False)
        if warm_round * size >= WARMUP_REQUESTS and time.monotonic() >= warm_until:
            break
    workers = _workers(api, endpoints.model_name)
    worker_readings, frontend_readings = [_resident_mb(workers)], [_frontend_rss_mb(workers)]
    key_at_start = keys.read()["inference"].key  # read, not renewed: we only look
    model_log, access_log = LogWatch(log_dir), LogWatch(log_dir, "access_log.log")
    say(f"warm: {len(workers)} worker(s) {worker_readings[0]:.0f} MiB, frontend "
        f"{frontend_readings[0]:.0f} MiB; measuring {duration_s:.0f} s")  # fmt: skip
    started = time.monotonic()
    while time.monotonic() - started < duration_s:
        one_round(measured=True)
        now = _workers(api, endpoints.model_name)
        worker_mb, frontend_mb = _resident_mb(now), _frontend_rss_mb(now)
        worker_readings.append(worker_mb)
        frontend_readings.append(frontend_mb)
        say(f"{time.monotonic() - started:.0f} s: {sent} sent; worker {worker_mb:.0f} MiB, "
            f"frontend {frontend_mb:.0f} MiB")  # fmt: skip
    elapsed = time.monotonic() - started
    report.duration_s = elapsed
    report.images_per_s = sent / elapsed
    after = _workers(api, endpoints.model_name)
    worker_readings.append(_resident_mb(after))
    frontend_readings.append(_frontend_rss_mb(after))
    report.worker_rss_start_mb, report.worker_rss_end_mb = floors(worker_readings)
    report.frontend_rss_start_mb, report.frontend_rss_end_mb = floors(frontend_readings)
    report.worker_rss_peak_mb, report.frontend_rss_peak_mb = (
        max(worker_readings),
        max(frontend_readings),
    )
    report.worker_restarts = len(set(workers) - set(after))
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
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of unmeasured load")
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
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


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
    if args.json:
        figures = {**asdict(report), "worker_growth": report.worker_growth,
                   "frontend_growth": report.frontend_growth}  # fmt: skip
        args.json.write_text(json.dumps(figures) + "\n")
    problems = report.problems(require_key_renewal=not args.use_running and args.duration > 90)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
