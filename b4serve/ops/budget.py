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

The v2 listener (plugins/v2) gathers the bodies it is receiving on the heap, at most
``b4_v2_max_buffered_bytes`` at once (beyond, 503); once whole, a body is a queued job like any
other. Its arrays are large: G1 gives them whole regions, so the heap holds up to twice that.

The workers and batch size are those that will be registered: a config's ``model_snapshot``
(KServe's pod registers from it), else what deploy registers by default for the GPUs TorchServe
will use (``Registration.for_gpus``: 2 workers per GPU with batches of 64), unless given.

``python -m b4serve.ops.budget`` prints the arithmetic and exits 1 if the config does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from b4serve.ops.gpus import torchserve_gpus
from b4serve.ops.manage import GPU_WORKERS_PER_GPU, Registration
from b4serve.serving.config import MAX_BODY_BYTES

__all__ = ["UPLOADS", "V2_BUFFERED", "Budget", "jvm_memory", "read_properties", "registered"]

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
# The v2 listener's body budget (its key in config.properties) and G1's whole regions for it.
V2_BUFFERED = "b4_v2_max_buffered_bytes"
_V2_REGIONS = 2
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


def registered(properties: Mapping[str, str]) -> dict[str, int]:
    """Versions, workers and batch size a config's ``model_snapshot`` registers (the largest of
    each model's); empty when it has none."""
    if "model_snapshot" not in properties:
        return {}
    try:
        models = json.loads(properties["model_snapshot"])["models"]
        entries = [entry for versions in models.values() for entry in versions.values()]
        return {
            "versions": max(len(versions) for versions in models.values()),
            "workers": max(max(e["minWorkers"], e["maxWorkers"]) for e in entries),
            "batch_size": max(e["batchSize"] for e in entries),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read model_snapshot's registrations: {exc!r}") from exc


def _v2_buffered(properties: Mapping[str, str], environ: Mapping[str, str]) -> int:
    """b4_v2_max_buffered_bytes as the listener reads it: env wins where the config lets it."""
    value = properties.get(V2_BUFFERED, "0")
    if properties.get("enable_envvars_config", "false").lower() == "true":
        value = environ.get(V2_BUFFERED.upper()) or value
    return int(value)


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
    v2_buffered: int = 0  # b4_v2_max_buffered_bytes (0: no v2 listener)

    @classmethod
    def from_properties(
        cls,
        properties: Mapping[str, str],
        environ: Mapping[str, str] = os.environ,
        **settings: int,
    ) -> Budget:
        """The budget of a config file's keys and of what its model_snapshot registers;
        ``settings`` are the other fields, by name (they win over the snapshot's)."""
        if "vmargs" not in properties:
            raise ValueError("the config sets no vmargs: the JVM would size its heap from RAM")
        heap, direct = jvm_memory(properties["vmargs"])
        values = {
            "heap": heap,
            "direct": direct,
            "body": int(properties.get("max_request_size", 6553500)),
            "queue": int(properties.get("job_queue_size", 100)),
            "netty_threads": int(properties.get("number_of_netty_threads", 0)),
            "v2_buffered": _v2_buffered(properties, environ),
            **registered(properties),
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
        return HEAP_RESERVE + bodies * self.body_on_heap + _V2_REGIONS * self.v2_buffered

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
                f"{self.heap_needed // MiB} MiB with {self.workers} worker(s) x batch size "
                f"{self.batch_size}: raise -Xmx, or lower the batch size"
                f"{self._batch_that_fits()}, job_queue_size, max_request_size, "
                f"number_of_netty_threads or {V2_BUFFERED}"
            )
        if self.direct_needed > self.direct:
            found.append(
                f"direct memory (-XX:MaxDirectMemorySize={self.direct // MiB}m) holds "
                f"{self.uploads_held} largest bodies arriving at once, not {self.uploads}: raise "
                f"it to {math.ceil(self.direct_needed / MiB)}m"
            )
        return found

    def _batch_that_fits(self) -> str:
        for size in range(self.batch_size - 1, 0, -1):
            if dataclasses.replace(self, batch_size=size).heap_needed <= self.heap:
                return f" (to {size} at most)"
        return ""

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
            f"{heap_body:.0f} MiB + {_V2_REGIONS} x {self.v2_buffered / MiB:.0f} MiB of v2 "
            f"bodies arriving ({V2_BUFFERED}) + {HEAP_RESERVE // MiB} MiB reserve = "
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
    # unset: what will be registered (the config's model_snapshot, else deploy's defaults for
    # the GPUs TorchServe will use, as `python -m b4serve.ops.manage rollout` picks them)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--gpus", type=int, help="GPUs the server gives workers (default: counted "
                        "as TorchServe counts them)")  # fmt: skip
    parser.add_argument("--workers-per-gpu", type=int, default=GPU_WORKERS_PER_GPU)
    parser.add_argument("--versions", type=int, help="registered at once (default 2: a rollout)")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, properties: Mapping[str, str]) -> dict[str, int]:
    """The registration to budget for: what is given, the rest what will be registered."""
    if registered(properties):
        defaults = registered(properties)
    else:
        gpus = args.gpus if args.gpus is not None else torchserve_gpus(args.config)
        registration = Registration.for_gpus(gpus, args.workers_per_gpu)
        defaults = {
            "versions": 2,
            "workers": registration.initial_workers,
            "batch_size": registration.batch_size,
        }
    given = {"versions": args.versions, "workers": args.workers, "batch_size": args.batch_size}
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        properties = read_properties(args.config)
        budget = Budget.from_properties(properties, **settings_for(args, properties))
    except (OSError, ValueError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(budget.lines()))
    for problem in budget.problems():
        print(f"error: {args.config}: {problem}", file=sys.stderr)
    return 1 if budget.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
