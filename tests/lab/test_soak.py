"""The soak's bookkeeping, fed what the real path produces: the client's results (one per input,
in order, each with its request id) and the lines the handler and TorchServe write to their logs.
"""

from collections import Counter

from b4serve.lab.soak import SoakReport, floors, key_renewals, tally
from b4serve.ops.client import Result
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
    healthy = {"healthy_after": True, "worker_rss_start_mb": 900, "worker_rss_end_mb": 900,
               "frontend_rss_start_mb": 300, "frontend_rss_end_mb": 300}  # fmt: skip
    quiet = SoakReport(duration_s=300, clients=16, **healthy)
    assert quiet.problems(require_key_renewal=True) == ["keys never turned over during the run"]
    renewed = SoakReport(duration_s=300, clients=16, key_renewals=key_renewals(access), **healthy)
    assert renewed.problems(require_key_renewal=True) == []
    changed = SoakReport(duration_s=300, clients=16, key_changed=True, **healthy)
    assert changed.problems(require_key_renewal=True) == []


def test_worker_and_frontend_memory_must_each_stay_flat_and_be_read() -> None:
    report = SoakReport(duration_s=300, clients=16, healthy_after=True, worker_rss_start_mb=1000,
                        worker_rss_end_mb=1049, frontend_rss_start_mb=400,
                        frontend_rss_end_mb=419)  # fmt: skip
    assert report.problems() == []
    report.frontend_rss_end_mb = 421
    assert report.problems() == ["frontend memory grew 5.2% (400 -> 421 MiB)"]
    report.frontend_rss_end_mb, report.worker_rss_end_mb = 400, 1051
    assert report.problems() == ["worker memory grew 5.1% (1000 -> 1051 MiB)"]
    report.worker_rss_end_mb, report.frontend_rss_start_mb = 1000, 0.0
    assert report.problems() == ["frontend memory could not be read"]


def test_memory_is_compared_floor_to_floor_so_a_leak_shows_and_a_sawtooth_does_not() -> None:
    # the frontend of a CI run that had nothing leaking: read after each round, then at the end
    sawtooth = [175, 176, 176, 176, 176, 176, 176, 177, 177, 177, 177, 177, 177, 177, 177, 177,
                177, 178, 181, 177, 185, 185, 176, 176, 176, 176, 187, 187]  # fmt: skip
    assert floors(sawtooth) == (175, 176)
    leak = [175 + 0.5 * i for i in range(28)]  # 13.5 MiB gained, one step each round
    start, end = floors(leak)
    assert (start, end) == (175, 175 + 0.5 * 21)
    report = SoakReport(duration_s=75, clients=8, healthy_after=True, worker_rss_start_mb=600,
                        worker_rss_end_mb=600, frontend_rss_start_mb=start,
                        frontend_rss_end_mb=end)  # fmt: skip
    assert report.problems() == ["frontend memory grew 6.0% (175 -> 186 MiB)"]
    assert floors([]) == (0.0, 0.0) and floors([300]) == (300, 300)
