"""Forwards spent on requests nobody waits for, under overload, with and without TorchServe's
``clientTimeoutInMills`` (b4serve.ops.manage.Registration.client_timeout_ms).

    python -m b4serve.lab.abandoned --clients 16 --timeout-s 20 --seconds 60

Deploys a throwaway server (b4serve.lab.sandbox), then registers its archive twice, as
``b4keep`` (clientTimeoutInMills 0: every queued request runs) and ``b4drop`` (the clients'
timeout), each with the deploy defaults (batch size, one worker). Against each in turn, the
clients send in a closed loop for the given time, each request with the client timeout and its
own ``X-Client-Request-Id``; then the queue is left to drain. The worker's log says which
requests it ran (b4serve.serving.request_ids), the clients which they gave up on: a forward
spent on a given-up request was wasted. Bounded: the phases, plus at most 180 s of draining
each; the server is always stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server, exit_on_sigterm, server_env
from b4serve.ops.manage import LogWatch, ManagementAPI, Registration
from b4serve.serving.codec import encode_npy
from b4serve.serving.request_ids import REQUEST_ID_HEADER, handled_requests

__all__ = ["Phase", "main", "measure", "with_client_timeout"]

MODEL_CONFIG = "model-config.yaml"  # where build_mar.sh puts it in the archive
DROPPED = "due to client timeout"  # TorchServe's warning for each request it drops


@dataclass
class Phase:
    """One model's run: what the clients sent and gave up on, what the worker ran."""

    model: str
    client_timeout_ms: int
    sent: int = 0
    answered: int = 0
    busy: int = 0  # 503: the queue was full (the client waits a second, as the bundled one does)
    gave_up: int = 0
    ran: int = 0  # requests the worker ran (a forward each: one image, micro-batch 1 on a CPU)
    ran_given_up: int = 0  # of those, requests whose client had given up
    dropped: int = 0  # requests TorchServe dropped from its queue unrun

    @property
    def wasted_share(self) -> float:
        return self.ran_given_up / self.ran if self.ran else 0.0


def with_client_timeout(mar: Path, out: Path, client_timeout_ms: int) -> Path:
    """A copy of archive ``mar`` whose model config says ``client_timeout_ms``."""
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w") as copy:
        if MODEL_CONFIG not in source.namelist():
            raise SystemExit(f"{mar} holds no {MODEL_CONFIG}: rebuild it (build_mar.sh --force)")
        for item in source.infolist():
            if item.filename != MODEL_CONFIG:
                copy.writestr(item, source.read(item))
        copy.writestr(
            MODEL_CONFIG, Registration(client_timeout_ms=client_timeout_ms).model_config()
        )
    return out


def measure(server: Server, phase: Phase, clients: int, timeout_s: float, seconds: float) -> Phase:
    """Overload ``phase.model`` with ``clients`` closed-loop clients for ``seconds``."""
    body = encode_npy(generate_images(per_class=1, seed=3)[0][0])
    url = f"{server.endpoints.inference_url}/predictions/{phase.model}"
    given_up: set[str] = set()
    lock = threading.Lock()
    model_log = LogWatch(server.log_dir)
    ts_log = LogWatch(server.log_dir, "ts_log.log")
    stop_at = time.monotonic() + seconds

    def client(number: int) -> None:
        count = 0
        while time.monotonic() < stop_at:
            request_id = f"{phase.model}-{number}-{count}"
            count += 1
            headers = {"Content-Type": "application/octet-stream", REQUEST_ID_HEADER: request_id,
                       **server.keys.auth_headers("inference")}  # fmt: skip
            try:
                status = requests.post(
                    url, data=body, headers=headers, timeout=timeout_s
                ).status_code
            except requests.Timeout:
                status = 0
                with lock:
                    given_up.add(request_id)
            with lock:
                phase.sent += 1
                phase.answered += status == 200
                phase.busy += status == 503
            if status == 503:
                time.sleep(1.0)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drain(server, phase.model)
    ran = [h.request_id for batch in handled_requests(model_log.lines()) for h in batch]
    ran = [r for r in ran if r and r.startswith(f"{phase.model}-")]
    phase.gave_up = len(given_up)
    phase.ran = len(ran)
    phase.ran_given_up = sum(r in given_up for r in ran)
    phase.dropped = sum(DROPPED in line for line in ts_log.lines())
    return phase


def drain(server: Server, model: str, within_s: float = 180.0) -> None:
    """Wait until ``model``'s queue is empty and its worker's log has been still for 3 s."""
    api = ManagementAPI(server.endpoints, server.keys)
    watch = LogWatch(server.log_dir)
    deadline = time.monotonic() + within_s
    seen, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        (description,) = api.call("GET", f"/models/{model}").json()
        lines = len(watch.lines())
        if lines != seen:
            seen, still_since = lines, time.monotonic()
        pending = description["jobQueueStatus"]["pendingRequests"]
        if pending == 0 and time.monotonic() - still_since > 3:
            return
        time.sleep(0.5)


def table(phases: Sequence[Phase], clients: int, timeout_s: float, seconds: float) -> str:
    lines = [
        f"{clients} clients in a closed loop for {seconds:.0f} s, each request with a "
        f"{timeout_s:g}-s client timeout; deploy's registration defaults",
        "",
        "| clientTimeoutInMills | sent | answered | 503 queue full | clients gave up "
        "| forwards run | on given-up requests | dropped unrun |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p.client_timeout_ms} | {p.sent} | {p.answered} | {p.busy} | {p.gave_up} | {p.ran} "
            f"| {p.ran_given_up} ({p.wasted_share:.0%}) | {p.dropped} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=20.0, help="each client's timeout")
    parser.add_argument("--seconds", type=float, default=60.0, help="each phase's load")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="b4-abandoned-"))
    server = Server(env=server_env(root), root=root)
    try:
        server.deploy()
        store = Path(server.env["B4_MODEL_STORE"])
        (mar,) = sorted(store.glob("b4-*.mar"))
        api = ManagementAPI(server.endpoints, server.keys)
        phases = []
        for model, timeout_ms in (("b4keep", 0), ("b4drop", int(args.timeout_s * 1000))):
            with_client_timeout(mar, store / f"{model}.mar", timeout_ms)
            response = api.register(f"{model}.mar", model, Registration(), timeout_s=600)
            if not response.ok:
                log = (server.log_dir / "ts_log.log").read_text(errors="replace")
                raise SystemExit(f"register {model}: {response.text}\n{log[-3000:]}")
            phase = Phase(model, timeout_ms)
            phases.append(measure(server, phase, args.clients, args.timeout_s, args.seconds))
            api.call("DELETE", f"/models/{model}", timeout=120)  # its worker off the cores
        print(table(phases, args.clients, args.timeout_s, args.seconds))
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
