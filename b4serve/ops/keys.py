"""TorchServe token-auth keys: read ``key_file.json`` fresh, renew expiring keys through ``/token``.

TorchServe (0.12, token auth on) writes ``key_file.json`` in the directory it was started from::

    {"management": {"key": "...", "expiration time": "2024-02-16T21:12:24.801167Z"},
     "inference": {"key": "...", "expiration time": "..."},
     "API": {"key": "..."}}

``GET {management_url}/token?type=inference`` with the API key as Bearer token makes a new key of
that type and rewrites the whole file in place.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from os import PathLike
from pathlib import Path
from typing import Literal, cast

import requests

from b4serve.ops.endpoints import Endpoints

__all__ = [
    "KEY_KINDS",
    "KeyEntry",
    "KeyFile",
    "KeyFileError",
    "KeyFileMissingError",
    "KeyKind",
    "KeyRenewalError",
    "bearer",
    "is_invalid_key_response",
    "main",
    "read_key_file",
]

KeyKind = Literal["inference", "management"]
KEY_KINDS: tuple[KeyKind, ...] = ("inference", "management")

_INVALID_KEY_TYPE = "InvalidKeyException"
_INSTANT = re.compile(r"(?P<seconds>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d{1,9}))?Z")


class KeyFileError(RuntimeError):
    """The key file cannot give a usable key (unreadable, malformed, or renewal failed)."""


class KeyFileMissingError(KeyFileError):
    """There is no key file where we looked: wrong directory, or token auth is off."""


class KeyRenewalError(KeyFileError):
    """``/token`` did not hand out a new key."""


@dataclass(frozen=True)
class KeyEntry:
    """One key of the file and when it stops working (``None``: never, as for the API key)."""

    key: str
    expires: datetime | None = None

    def expires_within(self, seconds: float, now: datetime | None = None) -> bool:
        """True if the key is expired or will be within ``seconds``."""
        if self.expires is None:
            return False
        now = now or datetime.now(timezone.utc)
        return self.expires - now <= timedelta(seconds=seconds)


def bearer(key: str) -> dict[str, str]:
    """The ``Authorization`` header TorchServe expects for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def is_invalid_key_response(response: requests.Response) -> bool:
    """True for TorchServe's answer to a missing, wrong or expired key (400 InvalidKeyException)."""
    if response.status_code != 400:
        return False
    try:
        body = response.json()
    except ValueError:
        return _INVALID_KEY_TYPE in response.text
    return isinstance(body, dict) and body.get("type") == _INVALID_KEY_TYPE


def read_key_file(
    path: str | PathLike[str], *, attempts: int = 5, delay_s: float = 0.05
) -> dict[str, KeyEntry]:
    """Parse the key file into ``{"inference": KeyEntry, "management": ..., "API": ...}``.

    TorchServe rewrites the file in place, so a reader can catch it empty or half written: JSON
    errors are retried ``attempts`` times before giving up.
    """
    path = Path(path)
    for attempt in range(1, attempts + 1):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            break
        except FileNotFoundError:
            raise KeyFileMissingError(_missing_message(path)) from None
        except OSError as exc:
            raise KeyFileError(f"cannot read TorchServe key file {path}: {exc}") from exc
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError: a partial write
            if attempt == attempts:
                raise KeyFileError(f"TorchServe key file {path} is not valid JSON: {exc}") from exc
            time.sleep(delay_s * attempt)
    return {name: _entry(path, raw, name) for name in (*KEY_KINDS, "API")}


def _missing_message(path: Path) -> str:
    return (
        f"TorchServe key file not found at {path}. With token auth on, TorchServe writes "
        "key_file.json in the directory it was started from; point B4_KEY_FILE (or B4_RUN_DIR) "
        "there, or turn client auth off if the server runs with --disable-token-auth."
    )


def _entry(path: Path, raw: object, name: str) -> KeyEntry:
    """One section of the parsed file, with its expiration time parsed."""
    section = raw.get(name) if isinstance(raw, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("key"), str):
        raise KeyFileError(f"TorchServe key file {path} has no {name!r} key")
    stamp = section.get("expiration time")
    if stamp is None:
        return KeyEntry(section["key"])
    expires = _parse_instant(str(stamp))
    if expires is None:
        raise KeyFileError(f"TorchServe key file {path}: bad {name!r} expiration time {stamp!r}")
    return KeyEntry(section["key"], expires)


def _parse_instant(stamp: str) -> datetime | None:
    """Java's ``Instant.toString()`` (UTC, "Z", 0 to 9 fraction digits) as an aware datetime."""
    match = _INSTANT.fullmatch(stamp)
    if match is None:
        return None
    # Python 3.10's fromisoformat takes neither "Z" nor nanoseconds: pad or cut to microseconds.
    fraction = (match["fraction"] or "").ljust(6, "0")[:6]
    try:
        return datetime.fromisoformat(f"{match['seconds']}.{fraction}+00:00")
    except ValueError:
        return None


class KeyFile:
    """The keys of one TorchServe instance, read from its key file every time one is needed.

    Nothing is cached: TorchServe or another client may renew a key at any moment, and the file
    is the only shared truth. One instance can be shared by threads; renewals are serialised so
    that many threads seeing the same stale key cause one ``/token`` call, not one each.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        management_url: str,
        *,
        margin_s: float = 10.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.management_url = management_url.rstrip("/")
        self.margin_s = margin_s
        self.timeout_s = timeout_s
        self._renew_lock = threading.Lock()

    @classmethod
    def from_endpoints(cls, endpoints: Endpoints, **kwargs: float) -> KeyFile:
        """The key file and management API named by ``endpoints``."""
        return cls(endpoints.key_file, endpoints.management_url, **kwargs)

    def exists(self) -> bool:
        """Whether TorchServe's key file is there (it is not when token auth is off)."""
        return self.path.is_file()

    def read(self) -> dict[str, KeyEntry]:
        """All entries of the file as it is now."""
        return read_key_file(self.path)

    def key(self, kind: KeyKind) -> str:
        """A key of ``kind`` valid for at least ``margin_s`` more seconds, renewing it if needed."""
        entry = self.read()[_check_kind(kind)]
        if entry.expires_within(self.margin_s):
            return self.renew(kind, entry.key)
        return entry.key

    def renew(self, kind: KeyKind, stale_key: str) -> str:
        """Replace ``stale_key`` by a new key of ``kind`` and return the new one.

        If the file no longer holds ``stale_key`` (another thread or client renewed it already)
        and its key is not about to expire, that key is returned without calling ``/token``.
        """
        _check_kind(kind)
        with self._renew_lock:
            entry = self.read()[kind]
            if entry.key != stale_key and not entry.expires_within(self.margin_s):
                return entry.key
            self._request_new_key(kind)
            return self.read()[kind].key

    def auth_headers(self, kind: KeyKind, *, allow_missing: bool = False) -> dict[str, str]:
        """The Bearer header for a valid key; ``{}`` if there is no file and ``allow_missing``.

        Leave ``allow_missing`` off unless the server is known to run without token auth: a key
        file in the wrong place otherwise turns into a clear error here rather than a 400 later.
        """
        try:
            return bearer(self.key(kind))
        except KeyFileMissingError:
            if allow_missing:
                return {}
            raise

    def _request_new_key(self, kind: KeyKind) -> None:
        """Ask TorchServe for a new ``kind`` key; it answers once the file has been rewritten."""
        url = f"{self.management_url}/token"
        api_key = self.read()["API"].key
        try:
            response = requests.get(
                url, params={"type": kind}, headers=bearer(api_key), timeout=self.timeout_s
            )
        except requests.RequestException as exc:
            raise KeyRenewalError(f"cannot renew the {kind} key: {url} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise KeyRenewalError(
                f"cannot renew the {kind} key: {url} answered {response.status_code}: "
                f"{response.text.strip()[:300]}"
            )


def _check_kind(kind: str) -> KeyKind:
    if kind not in KEY_KINDS:
        raise ValueError(f"key kind must be one of {', '.join(KEY_KINDS)}, got {kind!r}")
    return cast(KeyKind, kind)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print a currently valid key of the given kind, renewing it first if needed."""
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.ops.keys",
        description="Print a valid TorchServe key (renewed through /token if about to expire).",
    )
    parser.add_argument("kind", choices=KEY_KINDS)
    parser.add_argument("--key-file", type=Path, help="default: $B4_KEY_FILE")
    parser.add_argument("--management-url", help="default: from $B4_HOST, $B4_MANAGEMENT_PORT")
    args = parser.parse_args(argv)
    try:
        endpoints = Endpoints.from_env()
        keyring = KeyFile(
            args.key_file or endpoints.key_file, args.management_url or endpoints.management_url
        )
        key = keyring.key(args.kind)
    except (KeyFileError, ValueError) as exc:
        print(f"b4serve.ops.keys: {exc}", file=sys.stderr)
        return 1
    print(key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
