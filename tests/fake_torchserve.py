"""A loopback stand-in for the parts of TorchServe 0.12 the client and key file rely on.

Token auth with a ``key_file.json`` rewritten in place, ``/token``, and ``/predictions/b4``
answering a JSON list computed from the posted array, so that each answer can be traced to its
input. Shared by ``test_client.py`` and ``test_keys.py``.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from b4serve.ops.endpoints import Endpoints

INVALID_KEY = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": "Token Authorization failed. Token either incorrect, expired, or not provided "
    "correctly",
}


def image(ident: int) -> np.ndarray:
    """A small array whose mean is ``ident``: the fake server answers from the mean."""
    return np.full((4, 4, 3), ident, dtype=np.float32)


def expected_probabilities(ident: int) -> list[float]:
    """What the fake server answers for ``image(ident)``: six values summing to 1."""
    weights = [ident + k + 1.0 for k in range(6)]
    return [w / sum(weights) for w in weights]


def java_instant(moment: datetime) -> str:
    """``Instant.toString()`` as TorchServe writes it."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeTorchServe:
    """Token auth, ``/token`` and ``/predictions/b4`` as TorchServe 0.12 does them, on loopback.

    Failure plans are keyed by image id (the posted array's mean): ``fail_503[i] = n`` answers
    503 to the first n requests for image i, ``worker_died`` TorchServe's 500 for a batch whose
    worker died, ``drop`` closes the connection without answering,
    ``stall`` answers after ``stall_s``, ``reject[i] = (status, body)`` always fails image i.
    """

    def __init__(self, workdir: Path, *, auth: bool = True) -> None:
        self.key_file = workdir / "key_file.json"
        self.auth = auth
        self.api_key = "api-key-0"
        self.keys: dict[str, tuple[str, datetime]] = {}
        self.revoked: set[str] = set()
        self.token_calls: Counter[str] = Counter()
        self.token_delay_s = 0.05  # a slow /token widens the window in which a storm would show
        self.rejected_keys: list[str | None] = []
        self.answered: list[int] = []
        self.content_types: set[str | None] = set()
        self.auth_headers: set[str | None] = set()
        self.fail_503: dict[int, int] = {}
        self.worker_died: dict[int, int] = {}
        self.drop: dict[int, int] = {}
        self.stall: dict[int, int] = {}
        self.stall_s = 0.6
        self.reject: dict[int, tuple[int, bytes]] = {}
        self.delay_s: dict[int, float] = {}
        self.rotate_before_prediction: int | None = None
        self.predictions = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self._serial = 0
        if auth:
            for kind in ("inference", "management"):
                self.keys[kind] = self._new_key(kind)
            self.write_key_file()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(self.url, self.url, self.url, self.key_file, "b4")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- keys ---------------------------------------------------------------------------------

    def _new_key(self, kind: str, expires_in_s: float = 3600) -> tuple[str, datetime]:
        self._serial += 1
        return f"{kind[:3]}-{self._serial}", datetime.now(timezone.utc) + timedelta(
            seconds=expires_in_s
        )

    def write_key_file(self) -> None:
        """Rewrite the file in place in two halves, as non-atomically as TorchServe does."""
        document = {
            kind: {"key": k, "expiration time": java_instant(t)}
            for kind, (k, t) in self.keys.items()
        }
        document["API"] = {"key": self.api_key}
        text = json.dumps(document, indent=2)
        with open(self.key_file, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            time.sleep(0.005)
            f.write(text[len(text) // 2 :])
        os.chmod(self.key_file, 0o600)

    def key(self, kind: str) -> str:
        return self.keys[kind][0]

    def rotate(self, kind: str) -> str:
        """A new key of ``kind``, as ``/token`` makes (called with the lock held)."""
        self.keys[kind] = self._new_key(kind)
        self.write_key_file()
        return self.keys[kind][0]

    def expire(self, kind: str) -> None:
        """Make the current key of ``kind`` expired, in the file and on the server."""
        key, _ = self.keys[kind]
        self.keys[kind] = key, datetime.now(timezone.utc) - timedelta(minutes=1)
        self.write_key_file()

    def revoke(self, kind: str) -> None:
        """The server stops accepting the current key while the file still shows it as valid."""
        self.revoked.add(self.keys[kind][0])

    def accepts(self, kind: str, authorization: str | None) -> bool:
        if not self.auth:
            return True
        key, expires = self.keys[kind]
        given = (authorization or "").removeprefix("Bearer ")
        valid = given == key and datetime.now(timezone.utc) < expires
        return valid and given not in self.revoked

    # --- requests -----------------------------------------------------------------------------

    def handle_token(self, request: _Handler) -> None:
        kind = parse_qs(urlsplit(request.path).query).get("type", [""])[0]
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            request.send_json(400, INVALID_KEY)
            return
        if kind not in ("inference", "management"):
            request.send_json(400, {"code": 400, "type": "BadRequest", "message": kind})
            return
        time.sleep(self.token_delay_s)
        with self.lock:
            self.token_calls[kind] += 1
            self.rotate(kind)
        request.send_body(200, b"", "text/plain")

    def handle_prediction(self, request: _Handler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length", 0)))
        authorization = request.headers.get("Authorization")
        with self.lock:
            self.predictions += 1
            self.content_types.add(request.headers.get("Content-Type"))
            self.auth_headers.add(authorization)
            if self.predictions == self.rotate_before_prediction:
                self.rotate("inference")  # another client renewed the key just now
            if not self.accepts("inference", authorization):  # checked before the body, as TS does
                self.rejected_keys.append(authorization)
                request.send_json(400, INVALID_KEY)
                return
            ident = round(float(np.load(io.BytesIO(body), allow_pickle=False).mean()))
            plan = self._take_failure(ident)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._answer(request, ident, plan)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _take_failure(self, ident: int) -> str | None:
        for name in ("fail_503", "worker_died", "drop", "stall"):
            plan: dict[int, int] = getattr(self, name)
            if plan.get(ident, 0) > 0:
                plan[ident] -= 1
                return name
        return "reject" if ident in self.reject else None

    def _answer(self, request: _Handler, ident: int, plan: str | None) -> None:
        time.sleep(self.delay_s.get(ident, 0.0))
        if plan == "fail_503":
            request.send_json(
                503,
                {
                    "code": 503,
                    "type": "ServiceUnavailableException",
                    "message": 'Model "b4" has no worker to serve inference request.',
                },
            )
        elif plan == "worker_died":  # what TorchServe answers for a batch whose worker died
            request.send_json(
                500, {"code": 500, "type": "InternalServerException", "message": "Worker died."}
            )
        elif plan == "drop":
            request.close_connection = True  # no answer at all: the client sees a reset
        elif plan == "reject":
            status, body = self.reject[ident]
            request.send_body(status, body, "application/json")
        else:
            if plan == "stall":
                time.sleep(self.stall_s)
            with self.lock:
                self.answered.append(ident)
            request.send_json(200, expected_probabilities(ident))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like TorchServe: pooled connections get reused

    @property
    def fake(self) -> FakeTorchServe:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/token":
            self.fake.handle_token(self)
        else:
            self.send_json(404, {"code": 404, "type": "NotFound", "message": self.path})

    def do_POST(self) -> None:
        if self.path == "/predictions/b4":
            self.fake.handle_prediction(self)
        else:
            self.send_json(404, {"code": 404, "type": "ModelNotFoundException", "message": "?"})

    def send_json(self, status: int, body: object) -> None:
        self.send_body(status, json.dumps(body).encode(), "application/json")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
