"""The frontend's worst-case memory, from config.properties and the registration settings.

TorchServe 0.12 holds every request body whole. While a body arrives, Netty gathers it in direct
memory, up to twice its size while it consolidates the pieces. Once whole, it is copied into a
heap array that stays while the request waits in its version's job queue and while it sits in a
worker's batch; the batch is encoded for the worker into a heap buffer that grows by
reallocation (up to twice the batch) and is copied to direct memory to be written to the
worker's socket. The worst case is every queue slot and every batch slot holding a largest body
during a rollout (two versions registered), each Netty thread copying one more, and ``uploads``
largest bodies arriving at once. The heap part must fit in ``-Xmx``, the rest in
``-XX:MaxDirectMemorySize``. Beyond ``uploads`` bodies at once, the excess is answered 507 and
the frontend goes on (a direct-memory failure is not fatal; a heap one would be).

``python -m b4serve.ops.budget`` prints the arithmetic and exits 1 if the config does not fit.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from b4serve.ops.manage import Registration
from b4serve.serving.config import MAX_BODY_BYTES

__all__ = ["UPLOADS", "Budget", "jvm_memory", "read_properties"]

MiB = 1 << 20
# Largest bodies arriving at once that the frontend must answer without a 507: 4x the 16 bodies
# of 134 MB (the old limit) that the old 2 GiB heap could hold (issue 17's test sends this many).
UPLOADS = 64
# Heap for everything but bodies (measured: 14 MiB live when idle) and G1's room to work.
HEAP_RESERVE = 256 * MiB
# Netty reads sockets 4 KiB at a time (TorchServe's FixedRecvByteBufAllocator) and consolidates
# the pieces into one buffer: the old pieces and the new buffer exist together for a moment.
_CONSOLIDATION = 2
# The encoder's buffer grows by reallocation while the jobs' own arrays are still held.
_ENCODING = 3
_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_UNITS = {"": 1, "k": 1 << 10, "m": MiB, "g": 1 << 30}


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a TorchServe config file (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def jvm_memory(vmargs: str) -> tuple[int, int]:
    """``-Xmx`` and ``-XX:MaxDirectMemorySize`` in bytes; ``ValueError`` if either is missing
    (the JVM's defaults grow with the host's RAM, which no budget can be checked against)."""
    found: dict[str, int] = {}
    for flag in vmargs.split():
        for name, prefix in (("heap", "-Xmx"), ("direct", "-XX:MaxDirectMemorySize=")):
            if flag.startswith(prefix):
                match = _SIZE.match(flag[len(prefix) :])
                if match is None:
                    raise ValueError(f"cannot read the size in {flag!r}")
                found[name] = int(match.group(1)) * _UNITS[match.group(2).lower()]
    missing = [name for name in ("-Xmx", "-XX:MaxDirectMemorySize") if name not in vmargs]
    if missing:
        raise ValueError(f"vmargs must set {' and '.join(missing)}: {vmargs!r}")
    return found["heap"], found["direct"]


@dataclass(frozen=True)
class Budget:
    """The worst case of one TorchServe frontend, in bytes."""

    heap: int  # -Xmx
    direct: int  # -XX:MaxDirectMemorySize
    body: int = MAX_BODY_BYTES  # max_request_size
    queue: int = 100  # job_queue_size (TorchServe's default)
    netty_threads: int = 0  # number_of_netty_threads; 0: Netty's default, 2 per core
    versions: int = 2  # registered at once: 2 during a rollout
    workers: int = Registration.initial_workers
    batch_size: int = Registration.batch_size
    uploads: int = UPLOADS

    @classmethod
    def from_properties(cls, properties: Mapping[str, str], **settings: int) -> Budget:
        """The budget of a config file's keys; ``settings`` are the other fields, by name."""
        if "vmargs" not in properties:
            raise ValueError("the config sets no vmargs: the JVM would size its heap from RAM")
        heap, direct = jvm_memory(properties["vmargs"])
        values = {
            "heap": heap,
            "direct": direct,
            "body": int(properties.get("max_request_size", 6553500)),
            "queue": int(properties.get("job_queue_size", 100)),
            "netty_threads": int(properties.get("number_of_netty_threads", 0)),
        }
        return cls(**{**values, **settings})

    @property
    def threads(self) -> int:
        return self.netty_threads or 2 * (os.cpu_count() or 1)

    @property
    def g1_region(self) -> int:
        """G1's region size for this heap: a power of two near heap / 2048, 1 to 32 MiB."""
        return min(32 * MiB, max(MiB, 1 << (self.heap // 2048).bit_length() - 1))

    @property
    def body_on_heap(self) -> int:
        """A body array's footprint: G1 gives arrays of half a region or more whole regions."""
        return math.ceil(self.body / self.g1_region) * self.g1_region

    @property
    def heap_needed(self) -> int:
        in_batches = self.workers * self.batch_size * _ENCODING
        bodies = self.versions * (self.queue + in_batches) + self.threads
        return HEAP_RESERVE + bodies * self.body_on_heap

    @property
    def direct_needed(self) -> int:
        to_workers = self.versions * self.workers * self.batch_size * self.body
        return self.uploads * (_CONSOLIDATION * self.body + 8192) + to_workers

    @property
    def uploads_held(self) -> int:
        """Largest bodies arriving at once that direct memory holds, at worst."""
        to_workers = self.versions * self.workers * self.batch_size * self.body
        return max(0, (self.direct - to_workers) // (_CONSOLIDATION * self.body + 8192))

    def problems(self) -> list[str]:
        """What does not fit, one sentence each; empty when the budget holds."""
        found = []
        if self.heap_needed > self.heap:
            found.append(
                f"the heap (-Xmx{self.heap // MiB}m) cannot hold the worst case of "
                f"{self.heap_needed // MiB} MiB: raise -Xmx or lower job_queue_size, "
                "max_request_size or number_of_netty_threads"
            )
        if self.direct_needed > self.direct:
            found.append(
                f"direct memory (-XX:MaxDirectMemorySize={self.direct // MiB}m) holds "
                f"{self.uploads_held} largest bodies arriving at once, not {self.uploads}: raise "
                f"it to {math.ceil(self.direct_needed / MiB)}m"
            )
        return found

    def lines(self) -> list[str]:
        """The arithmetic, for a person."""
        body, heap_body = self.body / MiB, self.body_on_heap / MiB
        in_batches = self.workers * self.batch_size * _ENCODING
        return [
            f"largest body (max_request_size): {self.body} bytes = {body:.2f} MiB "
            f"({heap_body:.0f} MiB on the heap: whole {self.g1_region // MiB} MiB G1 regions)",
            f"heap: {self.versions} versions x ({self.queue} queued + {self.workers} worker(s) "
            f"x {self.batch_size} in a batch x {_ENCODING} with the encoder's buffer) + "
            f"{self.threads} Netty threads copying one each = "
            f"{self.versions * (self.queue + in_batches) + self.threads} bodies x "
            f"{heap_body:.0f} MiB + {HEAP_RESERVE // MiB} MiB reserve = "
            f"{self.heap_needed / MiB:.0f} MiB of -Xmx{self.heap // MiB}m",
            f"direct: {self.uploads} bodies arriving at once x {_CONSOLIDATION} "
            f"(consolidation) + {self.versions} x {self.workers} x {self.batch_size} bodies "
            f"being written to workers = {self.direct_needed / MiB:.0f} MiB of "
            f"-XX:MaxDirectMemorySize={self.direct // MiB}m "
            f"(holds {self.uploads_held} arriving at once)",
            f"frontend at worst: {(self.heap + self.direct) / MiB:.0f} MiB plus the JVM's own "
            "(about 200 MiB)",
        ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.ops.budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(
            os.environ.get(
                "B4_TS_CONFIG", Path(__file__).resolve().parents[2] / "config.properties"
            )
        ),
        help="TorchServe config file (default: $B4_TS_CONFIG, else config.properties)",
    )
    parser.add_argument("--workers", type=int, default=Registration.initial_workers)
    parser.add_argument("--batch-size", type=int, default=Registration.batch_size)
    parser.add_argument("--versions", type=int, default=2, help="registered at once (2: rollout)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        budget = Budget.from_properties(
            read_properties(args.config),
            workers=args.workers,
            batch_size=args.batch_size,
            versions=args.versions,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(budget.lines()))
    for problem in budget.problems():
        print(f"error: {args.config}: {problem}", file=sys.stderr)
    return 1 if budget.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
