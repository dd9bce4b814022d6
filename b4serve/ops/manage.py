"""TorchServe management API: register, wait until ready, switch the default, retire old versions.

Used by ``scripts/deploy.sh`` (``python -m b4serve.ops.manage rollout ...``). The rollout never
leaves a moment where ``/predictions/<model>`` has no version behind it: the new version is
registered and proven with a real prediction before it becomes the default, and only then are the
others unregistered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import requests

from b4serve.ops.changes import DeployRecord, differences, served_version, summary
from b4serve.ops.endpoints import Endpoints
from b4serve.ops.gpus import torchserve_gpus
from b4serve.ops.keys import KeyFile, KeyFileError, KeyKind, is_invalid_key_response
from b4serve.serving.config import DEFAULT_GPU_BUCKETS
from b4serve.serving.protocol import Protocol, encode_request, probabilities_of

__all__ = [
    "DeployError",
    "ManagementAPI",
    "Registration",
    "Rollout",
    "deploy_and_report",
    "registration_for",
    "rollout",
]

# Lines that say a worker failed: the worker's own "Failed to load model" comes first, and the
# frontend may stop the worker before it writes "Backend worker process died".
_DEATH_MARKERS = ("Backend worker process died", "Load model failed", "Failed to load model")
_FAILURE_MARKERS = ("Traceback", "Error", "died", *_DEATH_MARKERS)


# On GPUs (Registration.for_gpus). A batch fills the largest forward bucket the archive warms
# up, so one forward carries it whole; under load the queue fills it without waiting, and a
# lone request waits at most the delay. Two workers per GPU let one decode its next batch and
# talk to the frontend while the other's forward runs. Provisional until scripts/gpu_check.sh
# has measured them on a GPU (docs/GPU.md: not yet; it says how).
GPU_BATCH_SIZE = DEFAULT_GPU_BUCKETS[-1]
GPU_MAX_BATCH_DELAY_MS = 5
GPU_WORKERS_PER_GPU = 2


class DeployError(Exception):
    """A deployment step failed; the message says which and where to look."""


@dataclass(frozen=True)
class Registration:
    """Settings a model version is registered with; scripts/deploy.sh's defaults.

    Up to ``batch_size`` requests share one trip to the worker. ``max_batch_delay_ms`` is how
    long TorchServe holds a lone request waiting for company: under load the queue fills batches
    with no waiting at all, so a short delay keeps light traffic fast and costs nothing busy.
    (The seed's 1000 ms added up to a second to every request of a quiet server.)
    """

    batch_size: int = 4
    max_batch_delay_ms: int = 5
    initial_workers: int = 1
    response_timeout_s: int = 120
    # How long a request may wait in the queue: TorchServe drops one that waited longer before
    # it costs a forward, unanswered (its client gave up: the bundled client's timeout, 60 s,
    # tests/ops/test_client_timeout.py). 0 keeps every request. TorchServe 0.12 reads this
    # from the archive's model config alone (clientTimeoutInMills; the register API has no such
    # parameter): scripts/build_mar.sh writes model_config() into every archive.
    client_timeout_ms: int = 60_000

    @classmethod
    def for_gpus(cls, gpus: int, workers_per_gpu: int = GPU_WORKERS_PER_GPU) -> Registration:
        """The defaults when TorchServe gives workers ``gpus`` GPUs (the CPU's with none): it
        assigns workers to GPUs in turn, so ``workers_per_gpu`` land on each."""
        if gpus < 1:
            return cls()
        return cls(GPU_BATCH_SIZE, GPU_MAX_BATCH_DELAY_MS, gpus * workers_per_gpu)

    def reregistration_fields(self) -> dict[str, int]:
        """What TorchServe takes only at registration: changing one re-registers the build."""
        fields = dataclasses.asdict(self)
        del fields["initial_workers"]  # scaled in place
        return fields

    def model_config(self) -> str:
        """The archive's model config YAML (``torch-model-archiver --config-file``)."""
        return f"clientTimeoutInMills: {self.client_timeout_ms}\n"

    def params(self, mar: str, model: str) -> dict[str, str | int]:
        return {
            "url": mar,
            "model_name": model,
            "batch_size": self.batch_size,
            "max_batch_delay": self.max_batch_delay_ms,
            "initial_workers": self.initial_workers,
            "response_timeout": self.response_timeout_s,
            "synchronous": "true",
        }


class ManagementAPI:
    """Thin client of TorchServe's HTTP APIs that always sends a fresh key."""

    def __init__(self, endpoints: Endpoints, keys: KeyFile, timeout_s: float = 30.0) -> None:
        self.endpoints = endpoints
        self.keys = keys
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        *,
        kind: KeyKind = "management",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One request with a valid key; a key refused as expired is renewed once and retried."""
        api = self.endpoints
        base = api.management_url if kind == "management" else api.inference_url
        kwargs.setdefault("timeout", self.timeout_s)
        for attempt in range(2):
            auth = self.keys.auth_headers(kind)
            response = requests.request(
                method, base + path, headers={**(headers or {}), **auth}, **kwargs
            )
            if attempt == 0 and auth and is_invalid_key_response(response):
                self.keys.renew(kind, auth["Authorization"].split()[-1])
                continue
            break
        return response

    def ping(self) -> bool:
        """Whether the server answers ``/ping`` as Healthy (models may still be loading)."""
        try:
            response = self.call("GET", "/ping", kind="inference", timeout=5)
        except (requests.ConnectionError, requests.Timeout):
            return False
        return response.status_code == 200 and "Healthy" in response.text

    def versions(self, model: str) -> list[dict[str, Any]]:
        """Every registered version of ``model`` as TorchServe describes it ([] if none)."""
        response = self.call("GET", f"/models/{model}/all")
        if response.status_code == 404:
            return []
        _raise_for(response, f"describe {model}")
        return response.json()

    def default_version(self, model: str) -> str | None:
        """The version ``/predictions/<model>`` is served by, if any."""
        response = self.call("GET", f"/models/{model}")
        if response.status_code == 404:
            return None
        _raise_for(response, f"describe {model}")
        return response.json()[0]["modelVersion"]

    def describe(self, model: str, version: str) -> dict[str, Any] | None:
        response = self.call("GET", f"/models/{model}/{version}")
        if response.status_code == 404:
            return None
        _raise_for(response, f"describe {model} {version}")
        return response.json()[0]

    def predict(
        self, model: str, version: str | None, timeout_s: float | None = None
    ) -> requests.Response:
        """Send the smoke-test image to ``model`` (its ``version``, or the default)."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        body, content_type = smoke_request(self.endpoints.protocol)
        headers = {"Content-Type": content_type}
        return self.call("POST", path, kind="inference", data=body, headers=headers,
                         timeout=timeout_s or self.timeout_s)  # fmt: skip

    def smoke_test(self, model: str, version: str | None, what: str) -> list[float]:
        """Predict the smoke-test image; its probabilities, or :class:`DeployError`."""
        return check_prediction(self.predict(model, version), what, self.endpoints.protocol)

    def register(
        self, mar: str, model: str, settings: Registration, timeout_s: float
    ) -> requests.Response:
        """Register ``mar`` as a version of ``model``; returns once its workers started (or not).

        Synchronous registration waits for the workers to load and warm up: ``timeout_s``.
        """
        try:
            return self.call("POST", "/models", params=settings.params(mar, model),
                             timeout=timeout_s)  # fmt: skip
        except requests.Timeout:
            raise DeployError(
                f"register {mar}: TorchServe gave no answer within {timeout_s:.0f} s "
                "(B4_DEPLOY_TIMEOUT); its workers may still be loading: see model_log.log"
            ) from None

    def scale(self, model: str, version: str, workers: int, timeout_s: float) -> None:
        """Run ``workers`` workers for ``version``; returns once they started."""
        params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
        response = self.call("PUT", f"/models/{model}/{version}", params=params, timeout=timeout_s)
        _raise_for(response, f"scale {model} {version} to {workers} workers")

    def set_default(self, model: str, version: str) -> None:
        _raise_for(self.call("PUT", f"/models/{model}/{version}/set-default"), "set default")

    def unregister(self, model: str, version: str, timeout_s: float) -> None:
        """Unregister ``version``; TorchServe answers once its workers have stopped."""
        try:
            response = self.call("DELETE", f"/models/{model}/{version}", timeout=timeout_s)
        except requests.Timeout:
            raise DeployError(
                f"unregister {model} {version}: TorchServe gave no answer within {timeout_s:.0f} s"
                " (B4_DEPLOY_TIMEOUT)"
            ) from None
        if response.status_code != 404:  # already gone is fine
            _raise_for(response, f"unregister {model} {version}")


def _raise_for(response: requests.Response, action: str) -> None:
    if response.status_code >= 400:
        raise DeployError(f"{action}: HTTP {response.status_code}: {response.text.strip()[:500]}")


def ready_workers(description: dict[str, Any] | None) -> int:
    """How many of a described version's workers are READY."""
    workers = (description or {}).get("workers", [])
    return sum(1 for worker in workers if worker.get("status") == "READY")


class LogWatch:
    """New lines of a TorchServe log since a mark: by default the model log, where a dying
    worker says why in its own words and the handler says which requests it answered."""

    def __init__(self, log_dir: Path | None, name: str = "model_log.log") -> None:
        self.path = log_dir / name if log_dir else None
        # The file as it is at the mark, held open: log4j rolls the logs over at midnight and at
        # 100 MB (renaming the file), and an open file follows its bytes through the rename.
        self._marked: BinaryIO | None = None
        self.offset = 0
        if self.path is not None and self.path.is_file():
            self._marked = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self.offset = self._marked.seek(0, os.SEEK_END)

    def lines(self) -> list[str]:
        """The complete lines written since the mark (a line still being written waits),
        across one rollover of the file."""
        chunks: list[bytes] = []
        current = self.path if self.path is not None and self.path.is_file() else None
        if self._marked is not None:
            self._marked.seek(self.offset)
            chunks.append(self._marked.read())
            rolled = current is not None and (
                current.stat().st_ino != os.fstat(self._marked.fileno()).st_ino
            )
            if rolled:  # the new file holds the rest
                chunks.append(current.read_bytes())
        elif current is not None:  # created after the mark: all of it is new
            chunks.append(current.read_bytes())
        text = b"".join(chunks).decode(errors="replace")
        return text[: text.rfind("\n") + 1].splitlines()

    def close(self) -> None:
        if self._marked is not None:
            self._marked.close()
            self._marked = None

    def __del__(self) -> None:
        self.close()

    def failures(self, limit: int = 25) -> list[str]:
        lines = self.lines()
        died = any(marker in line for line in lines for marker in _DEATH_MARKERS)
        if not died:
            return []
        return [line for line in lines if any(m in line for m in _FAILURE_MARKERS)][-limit:]

    def settle(self, within_s: float = 5.0) -> list[str]:
        """The failures, waiting up to ``within_s`` for them: the log is written asynchronously,
        so a failed registration can come back before the worker's last words reach the file."""
        deadline = time.monotonic() + within_s
        while not (failures := self.failures()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return failures


def smoke_request(protocol: Protocol) -> tuple[bytes, str]:
    """A small real image in ``protocol``: the handler resizes it, so any input size works."""
    ramp = np.linspace(0, 255, 64 * 64 * 3, dtype=np.float64).astype(np.uint8)
    return encode_request(ramp.reshape(64, 64, 3), protocol)


def check_prediction(response: requests.Response, what: str, protocol: Protocol) -> list[float]:
    """The probabilities of a good answer; raise naming ``what`` otherwise."""
    if response.status_code != 200:
        raise DeployError(f"{what}: HTTP {response.status_code}: {response.text.strip()[:500]}")
    try:
        (probabilities,) = probabilities_of(response.json(), protocol)
    except (ValueError, KeyError, TypeError):
        raise DeployError(f"{what}: not a {protocol} answer: {response.text[:200]}") from None
    if not isinstance(probabilities, list) or abs(sum(probabilities) - 1.0) > 1e-3:
        raise DeployError(f"{what}: not a probability list: {str(probabilities)[:200]}")
    return probabilities


def wait_ready(
    api: ManagementAPI, model: str, version: str, watch: LogWatch, timeout_s: float
) -> None:
    """Block until ``version`` has a READY worker; fail fast with the log if a worker died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready_workers(api.describe(model, version)) > 0:
            return
        failures = watch.failures()
        if failures:
            raise DeployError(
                f"a worker of {model} {version} died while loading; from {watch.path}:\n"
                + "\n".join(failures)
            )
        if time.monotonic() > deadline:
            raise DeployError(
                f"{model} {version} has no READY worker after {timeout_s:.0f} s; see {watch.path}"
            )
        time.sleep(1.0)


def drain(api: ManagementAPI, model: str, version: str, grace_s: float, timeout_s: float) -> None:
    """Return once ``version`` has answered every request it had taken (it is no longer default).

    TorchServe fails the batch a worker holds when its version is unregistered ("Worker died")
    and shows no in-flight batch in describe-model. So: wait for the queue to empty, then send
    one probe per worker to the version itself; a worker answers a probe only after the batch it
    was running, so when the probes are back the old requests are too. ``grace_s`` covers the
    rare probe that reached an idle worker while another was still busy.

    Raises :class:`DeployError` when that takes over ``timeout_s``: the version then stays
    registered, so the requests it holds are answered rather than failed.
    """
    description = api.describe(model, version) or {}
    deadline = time.monotonic() + timeout_s
    while (pending := description.get("jobQueueStatus", {}).get("pendingRequests", 0)) > 0:
        if time.monotonic() > deadline:
            raise DeployError(
                f"{model} {version} still has {pending} requests queued after {timeout_s:.0f} s "
                f"(B4_DEPLOY_TIMEOUT); it stays registered, no longer the default, so they are "
                f"answered: run deploy again to retire it"
            )
        time.sleep(0.25)
        description = api.describe(model, version) or {}
    probes = max(1, len(description.get("workers", [])))
    remaining = max(1.0, deadline - time.monotonic())
    try:
        with ThreadPoolExecutor(probes) as pool:
            for _ in pool.map(lambda _: api.predict(model, version, remaining), range(probes)):
                pass  # any answer will do: it only has to come after the batch in flight
    except requests.Timeout:
        raise DeployError(
            f"{model} {version} did not answer a probe within {timeout_s:.0f} s "
            f"(B4_DEPLOY_TIMEOUT); it stays registered, no longer the default: run deploy "
            f"again to retire it"
        ) from None
    time.sleep(grace_s)


def retire(
    api: ManagementAPI, model: str, versions: set[str], grace_s: float, timeout_s: float, say: Any
) -> list[str]:
    """Drain and unregister ``versions`` (no longer the default); the versions retired."""
    for old in sorted(versions):
        drain(api, model, old, grace_s, timeout_s)
        api.unregister(model, old, timeout_s)
        say(f"unregistered {model} {old}")
    return sorted(versions)


class Rollout(NamedTuple):
    """What a rollout did: ``unchanged``, ``scaled`` (workers, in place) or ``deployed``."""

    outcome: str
    retired: list[str]


def rollout(
    api: ManagementAPI,
    *,
    mar: str,
    model: str,
    version: str,
    settings: Registration,
    timeout_s: float = 600.0,
    drain_s: float = 1.0,
    log_dir: Path | None = None,
    say: Any = print,
) -> Rollout:
    """Make ``version`` (archive ``mar`` in the model store) the one serving ``model``.

    Already serving: its workers are scaled in place to ``settings.initial_workers`` if they
    differ (``scaled``), else nothing changes (``unchanged``); otherwise it is registered,
    proven and made the default, and the others retired (``deployed``). ``drain_s`` is the time
    allowed, after an old version's queue empties, for its last batch to finish.
    """
    registered = {v["modelVersion"] for v in api.versions(model)}
    default = api.default_version(model) if registered else None
    description = api.describe(model, version) if version == default else None
    if ready_workers(description) > 0:
        outcome = "unchanged"
        workers = description.get("minWorkers") if description else None
        if workers is not None and workers != settings.initial_workers:
            say(f"scaling {model} {version} from {workers} to {settings.initial_workers} workers")
            api.scale(model, version, settings.initial_workers, timeout_s)
            wait_ready(api, model, version, LogWatch(log_dir), timeout_s)
            outcome = "scaled"
        api.smoke_test(model, None, f"{model} {version}")
        say(f"{model} {version} is already deployed and answering")
        retired = retire(api, model, registered - {version}, drain_s, timeout_s, say)
        return Rollout(outcome, retired)  # retired: an earlier deploy cut off
    watch = LogWatch(log_dir)
    try:
        _register_and_switch(api, mar, model, version, settings, registered, watch, timeout_s, say)
    except DeployError:
        if version not in registered:  # ours, never served: do not leave it crash-looping
            try:
                api.unregister(model, version, timeout_s)
                say(f"unregistered {model} {version}, which failed; serving: {default or 'none'}")
            except (DeployError, requests.RequestException) as cleanup:  # report the first
                say(f"could not unregister {model} {version}, which failed: {cleanup}")
        raise
    retired = retire(api, model, registered - {version}, drain_s, timeout_s, say)
    api.smoke_test(model, None, f"/predictions/{model}")
    return Rollout("deployed", retired)


def _register_and_switch(
    api: ManagementAPI,
    mar: str,
    model: str,
    version: str,
    settings: Registration,
    registered: set[str],
    watch: LogWatch,
    timeout_s: float,
    say: Any,
) -> None:
    """Register ``version`` unless it is, wait until it answers, then make it the default."""
    if version not in registered:
        say(f"registering {mar} as {model} {version} ({settings})")
        response = api.register(mar, model, settings, timeout_s)
        if response.status_code == 409:
            say(f"{model} {version} was registered meanwhile; reusing it")
        elif response.status_code >= 400:
            failures = watch.settle()
            detail = ("; from the model log:\n" + "\n".join(failures)) if failures else ""
            raise DeployError(
                f"register {mar}: HTTP {response.status_code}: {response.text.strip()[:500]}"
                + detail
            )
    wait_ready(api, model, version, watch, timeout_s)
    api.smoke_test(model, version, f"{model} {version}")
    api.set_default(model, version)
    say(f"{model} {version} is the default version")


def wait_for_ping(api: ManagementAPI, timeout_s: float, log_dir: Path | None) -> None:
    """Block until the server answers ``/ping``; fail naming the log otherwise."""
    deadline = time.monotonic() + timeout_s
    while not _pings(api):
        if time.monotonic() > deadline:
            where = f"; see {log_dir}/ts_log.log and {log_dir}/console.log" if log_dir else ""
            raise DeployError(f"TorchServe did not answer /ping within {timeout_s:.0f} s{where}")
        time.sleep(0.5)


def _pings(api: ManagementAPI) -> bool:
    try:
        return api.ping()
    except KeyFileError:  # the server writes its key file a moment after it starts
        return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b4serve.ops.manage", description=__doc__)
    parser.add_argument("--log-dir", type=Path, help="TorchServe's log dir, quoted on failure")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="exit 0 if the server answers /ping now")
    commands.add_parser("wait-ping", help="wait until the server answers /ping")
    status = commands.add_parser("status", help="print the registered versions as JSON")
    status.add_argument("--deployed", metavar="VERSION", help="exit 0 only if VERSION serves")
    model_config = commands.add_parser(
        "model-config", help="print the archive's model config YAML (what TorchServe reads there)"
    )
    model_config.add_argument("--client-timeout-ms", type=int)
    version = commands.add_parser(
        "version", help="print the version a build registered with these settings is served as"
    )
    version.add_argument("--archive-id", required=True, help="b4serve.build.identity's id")
    deploy = commands.add_parser("rollout", help="register, prove, switch and retire")
    deploy.add_argument("--mar", required=True, help="archive file name in the model store")
    deploy.add_argument("--version", required=True)
    deploy.add_argument("--archive-id", help="the build's id: with --records-dir, deploy says "
                        "what changed since the serving version")  # fmt: skip
    deploy.add_argument("--identity", type=Path, help="the build's identity JSON")
    deploy.add_argument("--records-dir", type=Path, help="where each version's record is kept")
    deploy.add_argument("--built", choices=["built", "packed", "stored"], default="built",
                        help="how the archive came to be, for the summary line")  # fmt: skip
    for command in (version, deploy):
        _add_registration_args(command)
    deploy.add_argument(
        "--drain", type=float, default=1.0, help="extra seconds after an old version drained"
    )
    return parser.parse_args(argv)


def _add_registration_args(command: argparse.ArgumentParser) -> None:
    # unset: Registration.for_gpus's defaults for the GPUs TorchServe will use
    command.add_argument("--batch-size", type=int)
    command.add_argument("--max-batch-delay", type=int)
    command.add_argument("--initial-workers", type=int)
    command.add_argument("--response-timeout", type=int)
    command.add_argument("--client-timeout-ms", type=int, help="drop a request that waited "
                         "longer in the queue (0: keep every one)")  # fmt: skip
    command.add_argument(
        "--gpus", type=int, help="GPUs the server gives workers (default: counted as TorchServe "
        "counts them: CUDA_VISIBLE_DEVICES or nvidia-smi, capped by number_of_gpu)",
    )  # fmt: skip
    command.add_argument("--workers-per-gpu", type=int, default=GPU_WORKERS_PER_GPU)
    command.add_argument(
        "--ts-config", type=Path, default=os.environ.get("B4_TS_CONFIG") or None,
        help="the server's config.properties, read for number_of_gpu (env B4_TS_CONFIG)",
    )  # fmt: skip


def default_registration(args: argparse.Namespace) -> Registration:
    """The defaults for the GPUs the server gives workers (the CPU's with none)."""
    gpus = args.gpus if args.gpus is not None else torchserve_gpus(args.ts_config)
    return Registration.for_gpus(gpus, args.workers_per_gpu)


def registration_for(args: argparse.Namespace) -> Registration:
    """The rollout's settings: those given, the rest defaults for the GPUs the server uses."""
    defaults = default_registration(args)
    given = {
        "batch_size": args.batch_size,
        "max_batch_delay_ms": args.max_batch_delay,
        "initial_workers": args.initial_workers,
        "response_timeout_s": args.response_timeout,
        "client_timeout_ms": args.client_timeout_ms,
    }
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})


def deploy_and_report(api: ManagementAPI, model: str, args: argparse.Namespace) -> None:
    """Roll out ``args.version``, keep its record, and say in one line what changed and what
    was done (against the record of the version that was serving, where this host has one)."""
    settings = registration_for(args)
    say = lambda message: print(f"[deploy] {message}", file=sys.stderr)  # noqa: E731
    old_version = api.default_version(model) if api.versions(model) else None
    identity = json.loads(args.identity.read_text()) if args.identity else {}
    record = DeployRecord(
        args.version, args.archive_id or args.version, identity, dataclasses.asdict(settings)
    )
    kept = DeployRecord.load(args.records_dir, args.version) if args.records_dir else None
    if kept is not None and kept.archive_id != record.archive_id:  # a --version given twice
        changed = ", ".join(differences(kept, record)) or "another build"
        raise DeployError(
            f"version {args.version} is already the build {kept.archive_id} ({changed}): give a "
            "new --version, or leave it unset to get the build's own"
        )
    done = rollout(
        api,
        mar=args.mar,
        model=model,
        version=args.version,
        settings=settings,
        timeout_s=args.timeout,
        drain_s=args.drain,
        log_dir=args.log_dir,
        say=say,
    )
    old = (
        DeployRecord.load(args.records_dir, old_version)
        if args.records_dir and old_version
        else None
    )
    if args.records_dir:
        record.save(args.records_dir)
    say(summary(model, old, old_version, record, done.outcome, args.built, done.retired))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    endpoints = Endpoints.from_env()
    api = ManagementAPI(endpoints, KeyFile.from_endpoints(endpoints))
    model = endpoints.model_name
    try:
        if args.command == "ping":
            return 0 if _pings(api) else 1
        if args.command == "wait-ping":
            wait_for_ping(api, args.timeout, args.log_dir)
        elif args.command == "status":
            versions = api.versions(model)
            print(json.dumps(versions, indent=2))
            if args.deployed:
                serving = api.default_version(model) if versions else None
                ready = ready_workers(api.describe(model, args.deployed)) if versions else 0
                return 0 if serving == args.deployed and ready > 0 else 3
        elif args.command == "model-config":
            given = {"client_timeout_ms": args.client_timeout_ms}
            settings = Registration(**{k: v for k, v in given.items() if v is not None})
            sys.stdout.write(settings.model_config())
        elif args.command == "version":
            settings = registration_for(args).reregistration_fields()
            defaults = default_registration(args).reregistration_fields()
            print(served_version(args.archive_id, settings, defaults))
        else:
            deploy_and_report(api, model, args)
    except (DeployError, KeyFileError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
