"""How many replicas a rate needs, from a benchmark run's per-replica throughput.

    python -m b4serve.lab.capacity --rate 1000 --rate 5000      # images per minute

Per replica: the best end-to-end throughput ``scripts/bench.sh`` measured for each served
configuration (one server, as one replica runs, on the benchmark host's cores; read from
docs/performance.json). Replicas: ``ceil(rate / (per replica x utilisation)) + spare``. The
utilisation target keeps each replica's queue short (near 100% the queue, and the latency, grow
without bound); the spare is the replica a rolling update or a lost node takes away.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PerReplica", "per_replica", "replicas_needed", "table"]

DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "performance.json"


@dataclass(frozen=True)
class PerReplica:
    """A configuration's best end-to-end throughput in one benchmark run."""

    config: str
    images_per_s: float
    setting: str  # the load it was measured at, e.g. "32 clients"

    @property
    def images_per_min(self) -> float:
        return self.images_per_s * 60


def per_replica(rows: Sequence[dict[str, Any]]) -> list[PerReplica]:
    """The best ``end to end`` row of each configuration, fastest first."""
    best: dict[str, PerReplica] = {}
    for row in rows:
        if row.get("section") != "end to end" or not row.get("images_per_s"):
            continue
        found = PerReplica(row["config"], float(row["images_per_s"]), row["setting"])
        if found.config not in best or found.images_per_s > best[found.config].images_per_s:
            best[found.config] = found
    return sorted(best.values(), key=lambda r: r.images_per_s, reverse=True)


def replicas_needed(
    images_per_min: float, per_replica_per_s: float, utilisation: float = 0.7, spare: int = 1
) -> int:
    """Replicas serving ``images_per_min``, each at most ``utilisation`` busy, plus ``spare``."""
    if images_per_min < 0 or per_replica_per_s <= 0 or not 0 < utilisation <= 1 or spare < 0:
        raise ValueError(
            "need a rate >= 0, a per-replica throughput > 0, 0 < utilisation <= 1 and spare >= 0"
        )
    busy = images_per_min / 60 / (per_replica_per_s * utilisation)
    return max(1, math.ceil(round(busy, 9))) + spare  # (rounding: 2.0000000001 is 2)


def table(
    replicas: Sequence[PerReplica], rates: Sequence[float], utilisation: float, spare: int
) -> str:
    """A markdown table: each configuration's throughput and the replicas each rate needs."""
    head = ["configuration", "per replica (img/min)", "measured at"]
    head += [f"{rate:g}/min" for rate in rates]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for replica in replicas:
        cells = [replica.config, f"{replica.images_per_min:.0f}", replica.setting]
        cells += [str(replicas_needed(r, replica.images_per_s, utilisation, spare)) for r in rates]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b4serve.lab.capacity", description=__doc__)
    parser.add_argument("--rate", type=float, action="append", required=True,
                        help="images per minute to serve (repeat for several)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="a benchmark's results (default: docs/performance.json)")  # fmt: skip
    parser.add_argument("--utilisation", type=float, default=0.7)
    parser.add_argument("--spare", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        rows, info = results["rows"], results.get("info", {})
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {args.results} holds no benchmark rows: {error}", file=sys.stderr)
        return 1
    replicas = per_replica(rows)
    if not replicas:
        print(f"error: {args.results} has no end-to-end rows", file=sys.stderr)
        return 1
    print(f"Benchmark {info.get('date', '?')} on {info.get('machine', '?')} "
          f"({info.get('command', '?')}); utilisation {args.utilisation:g}, "
          f"spare {args.spare}.\n")  # fmt: skip
    print(table(replicas, args.rate, args.utilisation, args.spare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
