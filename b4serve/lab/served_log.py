"""What a server says it answered: the handler's per-batch lines of client request ids.

The model log is written asynchronously (worker stdout -> frontend -> log4j), so a reader waits
for the ids it expects before it counts; see :mod:`b4serve.serving.request_ids`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection

from b4serve.ops.manage import LogWatch
from b4serve.serving.request_ids import Handled, handled_requests

__all__ = ["handled_batches", "handled_counts"]


def handled_batches(
    watch: LogWatch, waiting_for: Collection[str] = (), within_s: float = 30.0
) -> list[list[Handled]]:
    """The batches the handler logged since ``watch``'s mark, once every id in ``waiting_for``
    is among them or ``within_s`` has passed (the caller then finds the missing ones)."""
    deadline = time.monotonic() + within_s
    while True:
        batches = handled_requests(watch.lines())
        seen = {handled.request_id for batch in batches for handled in batch}
        if all(request_id in seen for request_id in waiting_for) or time.monotonic() > deadline:
            return batches
        time.sleep(0.2)


def handled_counts(batches: list[list[Handled]]) -> Counter[str]:
    """How often the handler answered each request id (requests without an id left out)."""
    return Counter(h.request_id for batch in batches for h in batch if h.request_id is not None)
