"""b4serve.lab.capacity: replicas for a rate, from a benchmark's per-replica throughput."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from b4serve.lab.capacity import main, per_replica, replicas_needed

ROWS = [
    {"section": "end to end", "config": "ours", "setting": "1 clients", "images_per_s": 2.0},
    {"section": "end to end", "config": "ours", "setting": "32 clients", "images_per_s": 2.5},
    {"section": "in-process", "config": "ours: raw", "setting": "micro-batch 4", "images_per_s": 9},
    {"section": "end to end", "config": "seed", "setting": "8 clients", "images_per_s": 0.5},
    {"section": "end to end", "config": "broken", "setting": "8 clients", "images_per_s": None},
]


def test_each_configuration_counts_its_best_end_to_end_row_only() -> None:
    found = per_replica(ROWS)
    assert [(r.config, r.images_per_s, r.setting) for r in found] == [
        ("ours", 2.5, "32 clients"),
        ("seed", 0.5, "8 clients"),
    ]
    assert found[0].images_per_min == 150


@pytest.mark.parametrize(
    ("rate", "utilisation", "spare", "replicas"),
    [
        (105, 0.7, 1, 2),  # exactly one replica at 70%: 105 = 150 x 0.7
        (106, 0.7, 1, 3),  # a little more needs a second
        (1000, 0.7, 1, 11),  # 1000 / 105 = 9.5 -> 10, + 1 spare
        (150, 1.0, 0, 1),
        (0, 0.7, 0, 1),  # a service keeps one replica
    ],
)
def test_replicas_cover_the_rate_at_the_utilisation_plus_the_spare(
    rate: float, utilisation: float, spare: int, replicas: int
) -> None:
    assert replicas_needed(rate, 2.5, utilisation, spare) == replicas


def test_impossible_inputs_are_refused() -> None:
    for args in ((100, 0.0), (100, 2.5, 0.0), (100, 2.5, 1.5), (-1, 2.5), (100, 2.5, 0.7, -1)):
        with pytest.raises(ValueError, match="per-replica throughput > 0"):
            replicas_needed(*args)


def test_cli_prints_a_table_from_a_results_file(tmp_path: Path, capsys) -> None:
    results = tmp_path / "performance.json"
    results.write_text(json.dumps({"info": {"date": "D", "machine": "M", "command": "C"},
                                   "rows": ROWS}))  # fmt: skip
    assert main(["--rate", "1000", "--rate", "106", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "Benchmark D on M (C); utilisation 0.7, spare 1." in out
    assert "| ours | 150 | 32 clients | 11 | 3 |" in out
    assert main(["--rate", "1", "--results", str(tmp_path / "none.json")]) == 1
