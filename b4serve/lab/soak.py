"""Load and soak: many clients for minutes; nothing lost, duplicated or wrong, memory flat.

    python -m b4serve.lab.soak --duration 300 --clients 16    # throwaway server, 1-minute keys
    python -m b4serve.lab.soak --use-running --duration 60    # the server scripts/deploy.sh runs

The load goes through the bundled client (retries, key renewal) in rounds of ``clients x 8``
requests: the demo's example images, whose answers must equal the server's own first answer for
each (and name the true class), plus one malformed body in every ``bad_every`` requests, which
must come back as its own 400. Worker memory is compared between the end of the warm-up and the
end of the run; TorchServe's keys must have turned over at least once during a long run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from b4serve.lab.demo import EXAMPLES_SEED, generate_images
from b4serve.ops.client import Result, predict_many
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.health import worker_rss_mb
from b4serve.ops.keys import KeyFile
from b4serve.ops.manage import ManagementAPI

__all__ = ["SoakReport", "run_soak"]

# Probabilities of the same image may differ by float noise between batch compositions.
TOLERANCE = 1e-4
MAX_GROWTH = 0.05  # worker memory may grow by 5% from the end of warm-up to the end


@dataclass
class SoakReport:
    """The figures of one soak run; ``problems()`` lists what broke the promises."""

    duration_s: float
    clients: int
    sent: int = 0
    answered: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    refused_as_expected: int = 0
    unexpected_errors: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    worker_restarts: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    keys_renewed: bool = False
    healthy_after: bool = False
    images_per_s: float = 0.0

    @property
    def memory_growth(self) -> float:
        return (
            (self.rss_end_mb - self.rss_start_mb) / self.rss_start_mb if self.rss_start_mb else 0.0
        )

    def problems(self, require_key_renewal: bool = False) -> list[str]:
        found = [
            f"{name}: {value}"
            for name, value in (("lost", self.lost), ("duplicated", self.duplicated),
                                ("wrong", self.wrong), ("worker restarts", self.worker_restarts))
            if value
        ]  # fmt: skip
        if self.unexpected_errors:
            found.append(f"unexpected errors: {self.unexpected_errors}")
        if self.memory_growth >= MAX_GROWTH:
            found.append(
                f"worker memory grew {self.memory_growth:.1%} "
                f"({self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MiB)"
            )
        if not self.healthy_after:
            found.append("server not healthy after the run")
        if require_key_renewal and not self.keys_renewed:
            found.append("keys never turned over during the run")
        return found

    def table(self) -> str:
        rows = [
            ("duration", f"{self.duration_s:.0f} s"), ("clients", str(self.clients)),
            ("requests sent", str(self.sent)), ("answered", str(self.answered)),
            ("lost", str(self.lost)), ("duplicated", str(self.duplicated)),
            ("wrong", str(self.wrong)),
            ("bad bodies refused with 400", str(self.refused_as_expected)),
            ("unexpected errors", json.dumps(self.unexpected_errors)),
            ("requests retried by the client", str(self.retried)),
            ("worker restarts", str(self.worker_restarts)),
            ("worker memory", f"{self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MiB "
                              f"({self.memory_growth:+.1%})"),
            ("keys turned over", "yes" if self.keys_renewed else "no"),
            ("healthy after", "yes" if self.healthy_after else "no"),
            ("throughput", f"{self.images_per_s:.2f} images/s"),
        ]  # fmt: skip
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


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


def _check(report: SoakReport, results: list[Result], expected: list[list[float] | None]) -> None:
    seen = Counter(result.index for result in results)
    report.answered += len(results)
    report.lost += sum(1 for i in range(len(expected)) if seen[i] == 0)
    report.duplicated += sum(count - 1 for count in seen.values() if count > 1)
    for result in results:
        want = expected[result.index]
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
    *,
    duration_s: float,
    clients: int,
    warmup_s: float = 20.0,
    bad_every: int = 16,
    say: Callable[[str], None] = lambda _: None,
) -> SoakReport:
    """Load the served model for ``duration_s`` after ``warmup_s``; see the module doc."""
    keys = KeyFile.from_endpoints(endpoints)
    api = ManagementAPI(endpoints, keys)
    load = _Load.build(endpoints, bad_every)
    report = SoakReport(duration_s=duration_s, clients=clients)
    size = clients * 8
    position = 0

    def one_round(check: bool) -> None:
        nonlocal position
        inputs, expected = load.round(size, position)
        position += size
        results = predict_many(inputs, endpoints=endpoints, concurrency=clients, progress=False)
        if check:
            report.sent += len(inputs)
            _check(report, results, expected)

    warm_until = time.monotonic() + warmup_s
    while time.monotonic() < warm_until:
        one_round(check=False)
    workers = _workers(api, endpoints.model_name)
    report.rss_start_mb = _resident_mb(workers)
    key_at_start = keys.key("inference")
    say(
        f"warm: {len(workers)} worker(s) {report.rss_start_mb:.0f} MiB; measuring {duration_s:.0f}s"
    )
    started = time.monotonic()
    while time.monotonic() - started < duration_s:
        one_round(check=True)
        say(f"{time.monotonic() - started:.0f} s: {report.sent} sent, {report.wrong} wrong, "
            f"{report.lost} lost")  # fmt: skip
    elapsed = time.monotonic() - started
    report.duration_s = elapsed
    report.images_per_s = report.sent / elapsed
    after = _workers(api, endpoints.model_name)
    report.rss_end_mb = _resident_mb(after)
    report.worker_restarts = len(set(workers) - set(after))
    report.keys_renewed = keys.key("inference") != key_at_start
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
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from b4serve.lab.sandbox import Server, exit_on_sigterm, server_env  # only for the throwaway

    args = _parse_args(argv)

    def say(message: str) -> None:
        print(f"[soak] {message}", file=sys.stderr, flush=True)

    def soak(endpoints: Endpoints) -> SoakReport:
        return run_soak(
            endpoints, duration_s=args.duration, clients=args.clients, warmup_s=args.warmup,
            bad_every=args.bad_every, say=say,
        )  # fmt: skip

    if args.use_running:
        report = soak(Endpoints.from_env())
    else:
        exit_on_sigterm()
        with tempfile.TemporaryDirectory(prefix="b4soak-") as root:
            server = Server(server_env(Path(root), args.token_expiration_min), Path(root))
            try:
                say("deploying a throwaway server (demo model)")
                server.deploy()
                report = soak(server.endpoints)
            finally:
                server.stop()
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "growth": report.memory_growth}) + "\n")
    problems = report.problems(require_key_renewal=not args.use_running and args.duration > 90)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
