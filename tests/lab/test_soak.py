"""The soak's bookkeeping, fed what the real path produces: the client's results (one per input,
in order, each with its request id) and the lines the handler and TorchServe write to their logs.
"""

from collections import Counter

from b4serve.client import Result
from b4serve.lab.soak import SoakReport, key_renewals, quarters, settled, tally, warm_up
from b4serve.serving.request_ids import Handled, handled_line, handled_requests

PREFIX = "2026-12-01T21:40:02.114+0000 [INFO ] W-9000-b4_4a29451e8549-stdout MODEL_LOG -"


def _ok(index: int, probabilities: list[float], attempts: int = 1) -> Result:
    return Result(index, f"array[{index}]", probabilities=probabilities, attempts=attempts,
                  request_id=f"soak-1-{index}")  # fmt: skip


def _failed(index: int, status: int | None, kind: str, attempts: int = 1) -> Result:
    error = {"status": status, "type": kind, "message": "..."}
    return Result(index, f"array[{index}]", error=error, attempts=attempts,
                  request_id=f"soak-1-{index}")  # fmt: skip


def _model_log(*batches: list[tuple[int, int]]) -> Counter[str]:
    """What the handler logged for batches of (input index, status), read back as the soak does."""
    lines = [
        f"{PREFIX} {handled_line([Handled(f'soak-1-{i}', status) for i, status in batch])}"
        for batch in batches
    ]
    lines.insert(1, f"{PREFIX} batch of 4 images: 1 failed ['InvalidInput'], decode 2.0 ms")
    return Counter(h.request_id for b in handled_requests(lines) for h in b if h.request_id)


def test_lost_and_duplicated_are_what_the_server_logged_not_what_the_client_saw() -> None:
    report = SoakReport(duration_s=1, clients=4)
    expected = [[0.9, 0.1], [0.2, 0.8], None, [0.5, 0.5], [0.3, 0.7], [0.6, 0.4]]
    results = [
        _ok(0, [0.9, 0.1]),
        _ok(1, [0.8, 0.2]),  # answered, wrongly
        _failed(2, 400, "InvalidInput"),  # the bad body, refused as it must be
        _ok(3, [0.5, 0.5], attempts=2),  # the server ran it, the answer was lost, run again
        _failed(4, None, "ConnectionError", attempts=5),  # never reached the handler
        _ok(5, [0.6, 0.4], attempts=2),  # key refused by the frontend, then answered once
    ]
    handled = _model_log([(0, 200), (1, 200), (2, 400), (3, 200)], [(3, 200), (5, 200)])

    tally(report, results, expected, handled)

    assert (report.sent, report.handled, report.lost, report.duplicated) == (6, 6, 1, 1)
    assert (report.wrong, report.refused_as_expected, report.retried) == (1, 1, 3)
    assert report.unexpected_errors == {"None ConnectionError": 1}
    assert {"lost: 1", "duplicated: 1", "wrong: 1"} <= set(report.problems())


def test_a_client_that_saw_every_answer_still_loses_what_the_server_never_logged() -> None:
    # a 200 the handler never logged: answered by something else, or its line was lost
    report = SoakReport(duration_s=1, clients=1)
    tally(report, [_ok(0, [1.0, 0.0])], [[1.0, 0.0]], _model_log([]))
    assert (report.lost, report.wrong, report.handled) == (1, 0, 0)


def test_key_turnover_is_a_renewal_the_access_log_recorded() -> None:
    access = [
        "2026-12-01T21:40:01.002+0000 [INFO ] epollEventLoopGroup-3-2 ACCESS_LOG - /127.0.0.1:4"
        '1234 "POST /predictions/b4 HTTP/1.1" 200 1490',
        "2026-12-01T21:40:01.501+0000 [INFO ] epollEventLoopGroup-3-4 ACCESS_LOG - /127.0.0.1:4"
        '1236 "GET /token?type=inference HTTP/1.1" 200 3',
        "2026-12-01T21:40:01.601+0000 [INFO ] epollEventLoopGroup-3-4 ACCESS_LOG - /127.0.0.1:4"
        '1236 "GET /token?type=management HTTP/1.1" 200 2',
        "2026-12-01T21:40:01.701+0000 [INFO ] epollEventLoopGroup-3-4 ACCESS_LOG - /127.0.0.1:4"
        '1236 "GET /token?type=inference HTTP/1.1" 400 5',
    ]
    assert key_renewals(access) == 1
    healthy = {"healthy_after": True, "worker_retained_start_mb": 900,
               "worker_retained_end_mb": 900, "frontend_retained_start_mb": 300,
               "frontend_retained_end_mb": 300}  # fmt: skip
    quiet = SoakReport(duration_s=300, clients=16, **healthy)
    assert quiet.problems(require_key_renewal=True) == ["keys never turned over during the run"]
    renewed = SoakReport(duration_s=300, clients=16, key_renewals=key_renewals(access), **healthy)
    assert renewed.problems(require_key_renewal=True) == []
    changed = SoakReport(duration_s=300, clients=16, key_changed=True, **healthy)
    assert changed.problems(require_key_renewal=True) == []


def test_worker_and_frontend_memory_must_each_stay_flat_and_be_read() -> None:
    report = SoakReport(duration_s=300, clients=16, healthy_after=True,
                        worker_retained_start_mb=1000, worker_retained_end_mb=1049,
                        frontend_retained_start_mb=400,
                        frontend_retained_end_mb=419, frontend_collected=True,
                        frontend_heap_start_mb=16.0, frontend_heap_end_mb=16.7)  # fmt: skip
    assert report.problems() == []
    report.frontend_retained_end_mb = 421
    assert report.problems() == ["frontend retained memory grew 5.2% (400.0 -> 421.0 MiB)"]
    report.frontend_retained_end_mb, report.worker_retained_end_mb = 400, 1051
    assert report.problems() == ["worker retained memory grew 5.1% (1000.0 -> 1051.0 MiB)"]
    report.worker_retained_end_mb, report.frontend_heap_end_mb = 1000, 16.8
    assert report.problems() == ["frontend live heap grew 5.0% (16.0 -> 16.8 MiB)"]
    report.frontend_heap_end_mb, report.frontend_retained_start_mb = 16.0, 0.0
    assert report.problems() == ["frontend retained memory could not be read"]
    # without jcmd the heap is not read, and not judged; the table says so
    report.frontend_retained_start_mb, report.frontend_collected = 400, False
    report.frontend_heap_end_mb = 30.0
    assert report.problems() == []
    assert "| frontend live heap (after a full GC) | not read: jcmd" in report.table()


# The frontend's retained memory (resident less the free heap, after a full GC) of a throwaway
# server under the soak's load, rounds of 32 at 8 clients (2026-12-02, 400 s): a climb while
# its JIT compiles, then 121-123 MiB with readings below it where G1 had just committed heap
# it had not touched yet; the live heap stayed at 16.0-16.1 MiB throughout (docs/SOAK.md).
RETAINED = [101.8, 107.8, 110.8, 112.4, 116.6, 117.0, 117.3, 117.6, 111.9, 117.9, 119.7, 120.0,
            120.2, 114.5, 120.4, 120.9, 121.0, 121.0, 115.6, 121.3, 121.5, 121.6, 115.9, 127.2,
            127.5, 120.8, 120.9, 132.6, 121.1, 121.2, 118.8, 120.9, 121.1, 121.3, 121.4, 121.3,
            117.7, 121.5, 115.8, 121.6, 121.6, 121.6, 116.4, 122.1, 122.4, 122.5, 122.5, 122.4,
            116.7, 122.4, 122.5, 122.5, 122.6, 122.5, 122.6, 122.8, 119.1, 122.9, 122.8, 122.9,
            122.9, 118.1, 123.0, 123.0, 123.1, 123.1, 123.1, 123.0, 117.4, 123.2]  # fmt: skip


def test_memory_is_compared_quarter_to_quarter_so_a_leak_shows_and_odd_readings_do_not() -> None:
    after_warm_up = RETAINED[20:]
    start, end = quarters(after_warm_up)
    assert (start, end) == (121.15, 123.0)
    assert max(after_warm_up) > 1.09 * start  # one reading alone would have said +9%
    leak = [175 + 0.5 * i for i in range(28)]  # 13.5 MiB gained, one step each round
    start, end = quarters(leak)
    assert (start, end) == (176.5, 187.0)
    report = SoakReport(duration_s=75, clients=8, healthy_after=True, worker_retained_start_mb=600,
                        worker_retained_end_mb=600, frontend_retained_start_mb=start,
                        frontend_retained_end_mb=end)  # fmt: skip
    assert report.problems() == ["frontend retained memory grew 5.9% (176.5 -> 187.0 MiB)"]
    assert quarters([]) == (0.0, 0.0) and quarters([300]) == (300, 300)


class _Replay:
    """A warm-up's rounds, replayed: each returns the next readings and takes 4 s."""

    def __init__(self, frontend: list[float]) -> None:
        self.frontend, self.now, self.rounds = iter(frontend), 0.0, 0

    def round(self) -> tuple[float, float]:
        self.now += 4.0
        self.rounds += 1
        return 922.0, next(self.frontend)

    def clock(self) -> float:
        return self.now


def test_the_warm_up_lasts_until_memory_settles_so_the_climb_is_not_counted_as_growth() -> None:
    assert quarters(RETAINED[:19]) == (109.3, 120.95)  # a 15-s warm-up, then 75 s: +10.7%
    replay = _Replay(RETAINED)
    warm = warm_up(replay.round, min_s=15, min_rounds=4, clock=replay.clock)
    assert warm.settled and replay.rounds == 21 and warm.seconds == 84
    measured = RETAINED[replay.rounds - 1 : replay.rounds + 18]  # the next 75 s
    start, end = quarters(measured)
    assert abs(end - start) / start < 0.02  # 121.55 -> 119.5: the dips, both ways


def test_the_warm_up_keeps_its_minimum_and_a_leak_never_settles_but_hits_the_bound() -> None:
    flat = _Replay([300.0] * 40)
    warm = warm_up(flat.round, min_s=40, min_rounds=3, clock=flat.clock)
    assert warm.settled and flat.rounds == 10  # 40 s of 4-s rounds, though settled at round 8
    leak = _Replay([272 + 1.0 * i for i in range(200)])  # 0.37% a round: 1.5% every 4 rounds
    warm = warm_up(leak.round, min_s=15, min_rounds=4, max_extra_s=60, clock=leak.clock)
    assert not warm.settled and warm.seconds == 76 and leak.rounds == 19
    # and the leak then shows in the measured stretch: the next 19 rounds
    start, end = quarters([272 + 1.0 * i for i in range(18, 37)])
    assert (end - start) / start > 0.05


def test_settled_needs_two_windows_whose_medians_are_within_half_a_percent() -> None:
    assert not settled([300] * 7)  # too few to tell
    assert settled([300, 300, 300, 300, 301.4, 301.4, 301.4, 301.4])  # 0.47%
    assert not settled([300, 300, 300, 300, 301.6, 301.6, 301.6, 301.6])
    assert settled([300, 300, 300, 300, 300, 330, 300, 300])  # one odd reading does not count
    assert not settled([0] * 8)  # memory that could not be read never settles
