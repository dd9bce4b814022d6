"""Client request ids: one per input, kept across retries, logged for each request answered.

A client names each input with ``X-Client-Request-Id`` and sends the same id every time it
retries that input. The handler writes one line per server batch listing the id and status of
every request it answered (:func:`handled_line`), so the server's own log says which inputs it
answered and how often: an id never logged was lost, an id logged twice was run twice. The soak
and the integration tests read these lines back with :func:`handled_requests`.

The id is a client's name, not TorchServe's request id (a UUID per HTTP request, new on every
retry, which the frontend returns as ``x-request-id``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "HANDLED",
    "REQUEST_ID_HEADER",
    "Handled",
    "handled_line",
    "handled_requests",
    "is_request_id",
    "request_id_of",
]

REQUEST_ID_HEADER = "X-Client-Request-Id"
# Ids go into log lines: plain tokens only, so a header cannot forge or split a line.
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HANDLED = "handled requests:"
NO_ID = "-"  # a request that carried no (usable) id
_ENTRY = re.compile(r"(\S+)=(\d{3})")


@dataclass(frozen=True)
class Handled:
    """One request the handler answered: the client's id (None if it sent none) and status."""

    request_id: str | None
    status: int


def is_request_id(value: str) -> bool:
    """Whether ``value`` can be a request id: 1 to 128 of ``A-Z a-z 0-9 . _ : -``."""
    return _ID.fullmatch(value) is not None


def request_id_of(headers: Mapping[str, object]) -> str | None:
    """The request's ``X-Client-Request-Id``, if it sent one that is a plain token."""
    for name, value in headers.items():
        if name.lower() == REQUEST_ID_HEADER.lower() and isinstance(value, str):
            return value if is_request_id(value) else None
    return None


def handled_line(requests: Sequence[Handled]) -> str:
    """``handled requests: a1=200 a2=400 -=200``: one server batch, in request order."""
    entries = " ".join(f"{r.request_id or NO_ID}={r.status}" for r in requests)
    return f"{HANDLED} {entries}"


def handled_requests(lines: Iterable[str]) -> list[list[Handled]]:
    """The batches :func:`handled_line` wrote in ``lines`` (a model log), each in request order."""
    batches = []
    for line in lines:
        _, marker, entries = line.partition(HANDLED)
        if not marker:
            continue
        batch = [
            Handled(None if name == NO_ID else name, int(status))
            for name, status in _ENTRY.findall(entries)
        ]
        batches.append(batch)
    return batches
