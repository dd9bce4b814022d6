"""The soak's bookkeeping: lost, duplicated, wrong and refused answers are counted right."""

from b4serve.lab.soak import SoakReport, _check
from b4serve.ops.client import Result


def _ok(index: int, probabilities: list[float], attempts: int = 1) -> Result:
    return Result(index, f"array[{index}]", probabilities=probabilities, attempts=attempts)


def _refused(index: int, status: int = 400, kind: str = "InvalidInput") -> Result:
    return Result(index, f"array[{index}]", error={"status": status, "type": kind}, attempts=1)


def test_every_kind_of_answer_is_counted() -> None:
    report = SoakReport(duration_s=1, clients=1)
    expected = [[0.9, 0.1], [0.2, 0.8], None, [0.5, 0.5], [0.3, 0.7], None]
    results = [
        _ok(0, [0.9, 0.1], attempts=3),  # right, after retries
        _ok(1, [0.8, 0.2]),  # wrong
        _refused(2),  # bad body refused: as expected
        _refused(3, 503, "ServiceUnavailable"),  # a good image failed
        _ok(3, [0.5, 0.5]),  # answered twice
        _ok(5, [0.5, 0.5]),  # a bad body answered 200: wrong
    ]  # index 4 never answered: lost
    _check(report, results, expected)
    assert (report.answered, report.lost, report.duplicated) == (6, 1, 1)
    assert (report.wrong, report.refused_as_expected, report.retried) == (2, 1, 1)
    assert report.unexpected_errors == {"503 ServiceUnavailable": 1}
    assert any(problem.startswith("lost") for problem in report.problems())


def test_memory_growth_and_key_turnover_are_judged() -> None:
    report = SoakReport(duration_s=300, clients=16, rss_start_mb=1000, rss_end_mb=1049,
                        healthy_after=True)  # fmt: skip
    assert report.problems() == []
    assert report.problems(require_key_renewal=True) == ["keys never turned over during the run"]
    report.rss_end_mb = 1051
    assert report.problems()[0].startswith("worker memory grew 5.1%")
