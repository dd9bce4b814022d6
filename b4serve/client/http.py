"""Concurrent client for the served model: ordered results, retries, key renewal, progress.

``predict_batch`` is the one-call API; ``iter_results`` and ``predict_many`` give one ``Result``
per input, in input order, and never let one failed input abort the others.

Retries after connection errors, timeouts and the statuses of a busy or restarting server
(a full queue's 503 among them) are urllib3's ``Retry``, with exponential backoff and jitter.
Two cases are this module's own: a rejected key, renewed and sent again, and an answer that
says the worker died with the batch (or was cut short), sent again within the same budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import secrets
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from b4serve.ops.endpoints import Endpoints
from b4serve.ops.keys import KeyFile, KeyFileError, bearer, is_invalid_key_response
from b4serve.serving.config import MAX_BODY_BYTES
from b4serve.serving.request_ids import REQUEST_ID_HEADER, is_request_id

__all__ = [
    "ImageInput",
    "PredictionError",
    "Result",
    "RetryPolicy",
    "StaticCredential",
    "input_name",
    "iter_results",
    "main",
    "npy_bytes",
    "predict_batch",
    "predict_many",
]

ImageInput = np.ndarray | str | os.PathLike

# Without an explicit type TorchServe parses the body as form data and the handler gets no bytes.
_CONTENT_TYPE = {"Content-Type": "application/octet-stream"}
# What requests raises once urllib3's retries are spent (or an answer was cut short after it
# began): the request may not have reached a worker, or its answer was lost. Sending a
# prediction again is safe.
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry an input that failed for a passing reason.

    ``retries`` bounds the retries after connection errors, timeouts, ``retry_statuses`` and
    dead workers, all together (urllib3 waits ``backoff_s * 2**(n-1)`` before retry n > 1, plus
    up to ``backoff_s`` of jitter, at most ``max_backoff_s``). The default rides out a frontend
    that restarts (about 25 s of waits). ``key_renewals`` separately bounds how often a rejected
    key is renewed and the request sent again.
    """

    retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    key_renewals: int = 2
    # 503: queue full, or the worker busy or restarting; 507: the server out of memory;
    # 502/504: a proxy in between.
    retry_statuses: frozenset[int] = frozenset({502, 503, 504, 507})

    def __post_init__(self) -> None:
        if self.retries < 0 or self.key_renewals < 0:
            raise ValueError("retries and key_renewals must be >= 0")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def delay_s(self, retry: int) -> float:
        """Seconds before our own retry number ``retry`` (1-based), as urllib3 would wait."""
        if retry <= 1:
            return 0.0
        jitter = random.uniform(0, self.backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1) + jitter)

    def urllib3_retry(
        self,
        total: int,
        abandoned: threading.Event,
        key_is_fresh: Callable[[], bool] | None = None,
    ) -> Retry:
        """urllib3's Retry for one request with ``total`` retries left; POSTs are retried too
        (a prediction can be sent again), and the last answer is returned, never raised.
        ``key_is_fresh()``: whether the request's key may still be sent, asked before each
        retry (urllib3 resends the first try's headers)."""
        retry = _AbandonableRetry(
            total=total,
            allowed_methods=None,
            status_forcelist=self.retry_statuses,
            backoff_factor=self.backoff_s,
            backoff_jitter=self.backoff_s,
            backoff_max=self.max_backoff_s,
            raise_on_status=False,
            redirect=False,
        )
        retry.abandoned, retry.key_is_fresh = abandoned, key_is_fresh
        return retry


class _Abandoned(Exception):
    """The job was abandoned while a request waited to be retried."""


class _StaleKey(Exception):
    """After its wait, urllib3's next retry would carry a stale key (it resends the first
    try's headers): renewed meanwhile, or about to expire. We send that retry ourselves, with
    the file's key. ``sent``: requests sent so far."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"the key went stale before retry {sent}")
        self.sent = sent


class _AbandonableRetry(Retry):
    """urllib3's Retry whose waits end at once when the job is abandoned (Ctrl-C, a break),
    and that hands a retry back to us when the key it would send is stale by then."""

    abandoned: threading.Event | None = None
    key_is_fresh: Callable[[], bool] | None = None  # may the request's key still be sent?

    def new(self, **kw: Any) -> _AbandonableRetry:
        retry = super().new(**kw)
        retry.abandoned, retry.key_is_fresh = self.abandoned, self.key_is_fresh
        return retry

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        delay = None
        if response is not None and self.respect_retry_after_header:
            delay = self.get_retry_after(response)
        if delay is None:
            delay = self.get_backoff_time()
        abandoned = self.abandoned or threading.Event()  # never set: a plain wait
        if abandoned.wait(delay):
            raise _Abandoned("the job was abandoned before this input could be sent again")
        if self.key_is_fresh is not None and not self.key_is_fresh():
            raise _StaleKey(len(self.history))


@dataclass(frozen=True)
class Result:
    """The outcome for one input: ``probabilities``, or ``error`` with status, type and message."""

    index: int
    input: str
    probabilities: list[float] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    request_id: str | None = None  # X-Client-Request-Id of every attempt: the server logs it

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines record: input, index, attempts, request id and probabilities or error."""
        record: dict[str, Any] = {"input": self.input, "index": self.index}
        if self.ok:
            record["probabilities"] = self.probabilities
        else:
            record["error"] = self.error
        record["attempts"] = self.attempts
        if self.request_id is not None:
            record["request_id"] = self.request_id
        return record

    def describe_error(self) -> str:
        """``[3] a.npy: 400 InvalidInput: ...`` for messages listing failures."""
        error = self.error or {}
        status = error.get("status") or "-"
        return f"[{self.index}] {self.input}: {status} {error.get('type')}: {error.get('message')}"


class PredictionError(RuntimeError):
    """Some inputs of a batch failed; ``failures`` holds their results, ``results`` all of them."""

    def __init__(self, results: list[Result]) -> None:
        self.results = results
        self.failures = [r for r in results if not r.ok]
        shown = "; ".join(r.describe_error() for r in self.failures[:10])
        more = f"; and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
        indices = ", ".join(str(r.index) for r in self.failures)
        super().__init__(
            f"{len(self.failures)} of {len(results)} inputs failed (indices {indices}): "
            f"{shown}{more}"
        )


def input_name(index: int, item: ImageInput) -> str:
    """How an input is named in results: its path, or ``array[i]`` for an in-memory array."""
    return f"array[{index}]" if isinstance(item, np.ndarray) else os.fspath(item)


def npy_bytes(item: ImageInput) -> bytes:
    """The request body: ``np.save`` bytes of an array, or a ``.npy`` file's bytes as they are."""
    if isinstance(item, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, item, allow_pickle=False)
        return buffer.getvalue()
    return Path(item).read_bytes()


def _error(status: int | None, kind: str, message: str) -> dict[str, Any]:
    return {"status": status, "type": kind, "message": message}


def _response_error(response: requests.Response, sent_bytes: int) -> dict[str, Any]:
    """The ``{"code", "type", "message"}`` body TorchServe and our handler send, else the text.

    TorchServe's HTTP layer refuses a body over its ``max_request_size`` with an empty 413
    before reading it: that one is explained here."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        return _error(response.status_code, str(body.get("type", "HTTPError")), body["message"])
    text = response.text.strip()[:500]
    if response.status_code == 413 and not text:
        message = (
            f"the server refused the {sent_bytes}-byte body unread: it is over its "
            f"max_request_size ({MAX_BODY_BYTES} bytes by default, a 2048x2048 RGBA uint8 "
            "image); send uint8 pixels, or a smaller image"
        )
        return _error(413, "PayloadTooLarge", message)
    return _error(response.status_code, "HTTPError", text or response.reason)


def _probabilities(response: requests.Response) -> list[float]:
    """The JSON list of class probabilities in a 200 answer; ``ValueError`` for anything else."""
    body = response.json()
    if not isinstance(body, list) or not body:
        raise ValueError(f"expected a non-empty JSON list of probabilities, got {body!r:.200}")
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in body):
        raise ValueError(f"expected numbers, got {body!r:.200}")
    return [float(p) for p in body]


class _Sessions:
    """One ``requests.Session`` per thread (sessions are not thread-safe), all closed at the end.

    Each has one adapter, for every URL; its ``max_retries`` is set before each request (the
    retries an input has left), which is safe because only its own thread uses it.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[requests.Session, HTTPAdapter]:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            self._local.adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1)
            for prefix in ("http://", "https://"):
                session.mount(prefix, self._local.adapter)
            with self._lock:
                self._all.append(session)
        return session, self._local.adapter

    def close(self) -> None:
        with self._lock:
            for session in self._all:
                session.close()
            self._all.clear()


class _Attempt(NamedTuple):
    """What one request gave (after urllib3's retries: ``sent`` requests in all), and what to
    do next: ``done``, ``retry`` (a worker died with the batch, or urllib3's next retry
    needs the file's key: at once) or ``renew`` the key."""

    probabilities: list[float] | None
    error: dict[str, Any] | None
    then: Literal["done", "retry", "renew"]
    sent: int = 1
    wait_s: float | None = None  # None: our own backoff


class StaticCredential:
    """A credential the edge issued (``scripts/edge.sh --issue NAME``), sent as the Bearer key.

    The edge keeps TorchServe's own keys on the server host; a client on another machine only
    ever sends this. If the edge renewed TorchServe's key while a request was on its way, the
    request is refused with InvalidKeyException before any worker saw it: "renewing" here
    sends the same credential again.
    """

    def __init__(self, credential: str) -> None:
        if not credential.strip():
            raise ValueError("the credential is empty")
        self._credential = credential.strip()

    def key(self, kind: str) -> str:
        """The credential, whatever ``kind`` of key the caller asks for."""
        return self._credential

    def renew(self, kind: str, stale_key: str) -> str:
        """The same credential: the edge forwards with TorchServe's current key."""
        return self._credential


@dataclass
class _Predictor:
    """Sends one input until it succeeds, fails for good, or runs out of retries."""

    url: str
    keys: KeyFile | StaticCredential | None
    retry: RetryPolicy
    timeout_s: float
    progress: tqdm | None = None
    sessions: _Sessions = field(default_factory=_Sessions)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _failed: int = 0

    def __call__(self, index: int, item: ImageInput, request_id: str | None = None) -> Result:
        result = self._predict(index, item, request_id)
        if self.progress is not None:
            with self._lock:
                self._failed += not result.ok
                if self._failed:
                    self.progress.set_postfix_str(f"{self._failed} failed", refresh=False)
                self.progress.update()
        return result

    def _predict(self, index: int, item: ImageInput, request_id: str | None) -> Result:
        name = input_name(index, item)
        attempts = retried = renewals = 0
        try:
            body = npy_bytes(item)
            while True:
                key = self.keys.key("inference") if self.keys else None
                attempt = self._send(body, key, request_id, self.retry.retries - retried)
                attempts += attempt.sent
                retried += attempt.sent - 1
                if attempt.then == "renew" and self.keys and renewals < self.retry.key_renewals:
                    renewals += 1  # a budget of its own: a renewed key is not a struggling server
                    self.keys.renew("inference", stale_key=key or "")
                    continue
                if attempt.then != "retry" or retried >= self.retry.retries:
                    break
                retried += 1
                wait_s = attempt.wait_s
                if self.stop.wait(self.retry.delay_s(retried) if wait_s is None else wait_s):
                    break  # the job was abandoned: report the last error, do not retry
        except (OSError, ValueError, KeyFileError) as exc:
            # Unreadable file, unsavable array, key file gone: this input fails, the others go on.
            error = _error(None, type(exc).__name__, str(exc))
            return Result(index, name, error=error, attempts=attempts, request_id=request_id)
        return Result(index, name, attempt.probabilities, attempt.error, attempts, request_id)

    def _send(
        self, body: bytes, key: str | None, request_id: str | None, retries_left: int
    ) -> _Attempt:
        headers = {**_CONTENT_TYPE, **(bearer(key) if key else {})}
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        session, adapter = self.sessions.get()
        fresh = _key_is_fresh(self.keys, key) if key and isinstance(self.keys, KeyFile) else None
        adapter.max_retries = self.retry.urllib3_retry(retries_left, self.stop, fresh)
        try:
            response = session.post(self.url, data=body, headers=headers, timeout=self.timeout_s)
        except _Abandoned as exc:
            return _Attempt(None, _error(None, "Abandoned", str(exc)), "done")
        except _StaleKey as exc:  # the wait is over: send it again now, with the file's key
            error = _error(None, "StaleKey", str(exc))
            return _Attempt(None, error, "retry", exc.sent, wait_s=0.0)
        except _TRANSIENT_ERRORS as exc:
            # urllib3 retries connection errors and timeouts until the budget is spent; an
            # answer cut short after it began is ours to send again.
            cut_short = isinstance(exc, requests.exceptions.ChunkedEncodingError)
            sent = 1 if cut_short else retries_left + 1
            then = "retry" if cut_short else "done"
            return _Attempt(None, _error(None, type(exc).__name__, str(exc)), then, sent)
        sent = _requests_sent(response)
        if response.status_code == 200:
            try:
                return _Attempt(_probabilities(response), None, "done", sent)
            except ValueError as exc:
                return _Attempt(None, _error(200, "UnexpectedResponse", str(exc)), "done", sent)
        error = _response_error(response, len(body))
        if key and is_invalid_key_response(response):
            return _Attempt(None, error, "renew", sent)
        return _Attempt(None, error, "retry" if _worker_died(error) else "done", sent)


def _key_is_fresh(keys: KeyFile, key: str) -> Callable[[], bool]:
    """Whether ``key`` is still the file's (nobody renewed it) and not about to expire."""

    def fresh() -> bool:
        entry = keys.read()["inference"]
        return entry.key == key and not entry.expires_within(keys.margin_s)

    return fresh


def _requests_sent(response: requests.Response) -> int:
    """Requests sent for this answer: the last one and urllib3's retries before it."""
    retries = getattr(response.raw, "retries", None)
    return 1 + len(retries.history) if isinstance(retries, Retry) else 1


def _worker_died(error: dict[str, object]) -> bool:
    """TorchServe's 500 for a batch whose worker crashed or was stopped: safe to send again."""
    return error.get("status") == 500 and "Worker died" in str(error.get("message", ""))


def iter_results(
    inputs: Sequence[ImageInput],
    *,
    endpoints: Endpoints | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    timeout_s: float = 60.0,
    token_auth: bool = True,
    progress: bool | None = None,
    request_ids: Sequence[str] | None = None,
    keys: KeyFile | None = None,
    credential: str | None = None,
) -> Iterator[Result]:
    """Send every input to the model with up to ``concurrency`` requests in flight.

    Yields one ``Result`` per input, in input order, as soon as all before it are done.
    Each input's requests carry its id in ``X-Client-Request-Id`` (the same id on every retry),
    which the server logs for each request it answers: ``request_ids``, or ``<job>-<index>``
    with a random job name.
    ``token_auth=False`` sends no key (server started with ``--disable-token-auth``); otherwise
    a missing or unreadable key file raises ``KeyFileError`` before anything is sent. ``keys``
    shares one :class:`KeyFile` between jobs (default: one for ``endpoints``' key file).
    ``credential``: send this edge credential instead of reading a key file (docs/EDGE.md).
    ``progress=None`` shows progress on stderr only when stderr is a terminal.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if request_ids is None:
        job = secrets.token_hex(4)
        request_ids = [f"{job}-{index}" for index in range(len(inputs))]
    elif len(request_ids) != len(inputs):
        raise ValueError(f"{len(request_ids)} request ids for {len(inputs)} inputs")
    elif not all(is_request_id(request_id) for request_id in request_ids):
        raise ValueError(
            "request ids must be 1 to 128 of A-Z a-z 0-9 . _ : - (the server logs them)"
        )
    endpoints = endpoints or Endpoints.from_env()
    if credential is not None:
        keys = StaticCredential(credential)
    else:
        keys = (keys or KeyFile.from_endpoints(endpoints)) if token_auth else None
    if keys is not None:
        keys.key("inference")  # fail fast, once, rather than once per input
    bar = tqdm(
        total=len(inputs),
        unit="img",
        file=sys.stderr,
        disable=None if progress is None else not progress,  # None: on a terminal only
        dynamic_ncols=True,
    )
    predictor = _Predictor(
        url=endpoints.predictions_url,
        keys=keys,
        retry=retry or RetryPolicy(),
        timeout_s=timeout_s,
        progress=bar,
    )
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="b4client")
    try:
        # map() keeps input order; each task reads or encodes its own input, so memory stays flat.
        yield from executor.map(predictor, range(len(inputs)), inputs, request_ids)
    finally:
        # On an early stop (Ctrl-C, caller breaks) drop what has not started, end retry waits.
        predictor.stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        predictor.sessions.close()
        bar.close()


def predict_many(inputs: Sequence[ImageInput], **kwargs: Any) -> list[Result]:
    """All results of ``iter_results`` (same keyword arguments), in input order."""
    return list(iter_results(inputs, **kwargs))


def predict_batch(
    images: Sequence[ImageInput],
    *,
    endpoints: Endpoints | None = None,
    concurrency: int = 8,
    **kwargs: Any,
) -> list[list[float]]:
    """Class probabilities for each image, in input order.

    Raises ``PredictionError`` listing every failed index and why, after all inputs were tried.
    Other keyword arguments are those of ``iter_results``.
    """
    results = predict_many(images, endpoints=endpoints, concurrency=concurrency, **kwargs)
    if not all(r.ok for r in results):
        raise PredictionError(results)
    return [r.probabilities for r in results if r.probabilities is not None]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.client",
        description="Classify .npy files with the served model; one JSON line per input.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.npy")
    parser.add_argument("--output", "-o", type=Path, help="JSON-lines file (default: stdout)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip inputs --output already holds answers for; send the rest (failed ones too)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--retries", type=int, default=RetryPolicy.retries)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--url", help="inference API base URL (default: from $B4_HOST, ports)")
    parser.add_argument("--management-url", help="for key renewal (default: from $B4_*)")
    parser.add_argument("--key-file", type=Path, help="default: $B4_KEY_FILE")
    parser.add_argument("--model-name", help="default: $B4_MODEL_NAME or b4")
    parser.add_argument("--no-auth", action="store_true", help="server runs without token auth")
    parser.add_argument(
        "--credential-file",
        type=Path,
        help="send the edge credential in this file instead of a TorchServe key (docs/EDGE.md)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    return parser


def _cli_endpoints(args: argparse.Namespace) -> Endpoints:
    """``Endpoints.from_env()`` with the command line's overrides."""
    env = Endpoints.from_env()
    return Endpoints(
        inference_url=args.url or env.inference_url,
        management_url=args.management_url or env.management_url,
        metrics_url=env.metrics_url,
        key_file=args.key_file or env.key_file,
        model_name=args.model_name or env.model_name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: POST ``.npy`` files, write one JSON line per input in input order; 1 if any failed."""
    args = _parser().parse_args(argv)
    if args.resume and not args.output:
        print("b4serve.client.http: --resume needs --output", file=sys.stderr)
        return 2
    done = _answered(args.output) if args.resume else {}
    todo = [(index, path) for index, path in enumerate(args.files) if str(path) not in done]
    if args.output:
        # Keep the answers of an earlier run (--resume), rewritten whole before appending: a
        # crash at any point leaves a file that a further --resume continues from.
        tmp = args.output.with_name(args.output.name + ".partial")
        tmp.write_text("".join(done.values()), encoding="utf-8")
        tmp.replace(args.output)
    out = args.output.open("a", encoding="utf-8") if args.output else sys.stdout
    if done:
        print(f"b4serve.client: resuming, {len(done)} inputs already answered", file=sys.stderr)
    failed = 0
    try:
        results = iter_results(
            [path for _, path in todo],
            endpoints=_cli_endpoints(args),
            concurrency=args.concurrency,
            retry=RetryPolicy(retries=args.retries),
            timeout_s=args.timeout,
            token_auth=not args.no_auth,
            progress=args.progress,
            credential=_read_credential(args.credential_file),
        )
        for result in results:
            failed += not result.ok
            result = dataclasses.replace(result, index=todo[result.index][0])  # CLI position
            out.write(json.dumps(result.to_json()) + "\n")
            out.flush()  # a long job's finished lines are visible (and kept) as it goes
    except (KeyFileError, ValueError) as exc:
        print(f"b4serve.client.http: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"b4serve.client.http: {failed} of {len(args.files)} inputs failed", file=sys.stderr)
        return 1
    return 0


def _read_credential(path: Path | None) -> str | None:
    """The credential in ``path`` (a file, so that it stays out of the process list)."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the credential file: {exc}") from exc


def _answered(output: Path) -> dict[str, str]:
    """Input name -> JSON line, for the inputs an earlier run answered with probabilities."""
    if not output.is_file():
        return {}
    answered = {}
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: that input is sent again
        if isinstance(record, dict) and record.get("probabilities") is not None:
            answered[str(record["input"])] = line + "\n"
    return answered


if __name__ == "__main__":
    raise SystemExit(main())
