"""A real Prometheus (Debian's) scrapes the session's real TorchServe with deploy/prometheus's
scrape job and alert rules, and its HTTP API finds our series: the request counter by outcome
with the server's own counts, the forward-time histogram with its buckets, and every alert rule
evaluated on the real series without an error."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from b4serve.lab.sandbox import ROOT, Server, free_ports
from b4serve.serving.codec import encode_npy
from b4serve.serving.telemetry import parse_prometheus

pytestmark = pytest.mark.integration

PROMETHEUS = ROOT / "deploy" / "prometheus"
SCRAPE_S = 1  # seconds between scrapes and between rule evaluations: a short run
WAIT_S = 60.0  # for Prometheus to start, scrape and evaluate on a busy machine


@pytest.fixture
def prometheus(server: Server, tmp_path: Path) -> Iterator[str]:
    """Prometheus on a free loopback port with its own data dir, running the shipped config
    with a 1-s interval and the session server's metrics address; always stopped."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus not found: apt-get install -y prometheus (requirements-debian.txt)")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    target = server.endpoints.metrics_url.removeprefix("http://")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), f"Prometheus ready ({tmp_path / 'prometheus.log'})")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def wait_for(found: Callable[[], Any], what: str) -> Any:
    """``found()``'s first truthy value within WAIT_S seconds; fail with ``what`` if none."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"not within {WAIT_S:.0f} s: {what}")


def query(url: str, promql: str) -> list[dict]:
    """The instant vector ``promql`` evaluates to now, through Prometheus' HTTP API."""
    response = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_prometheus_scrapes_our_counter_and_histogram_and_evaluates_every_rule(
    server: Server, prometheus: str
) -> None:
    rng = np.random.default_rng(28)
    good = encode_npy(rng.integers(0, 256, (380, 380, 3), dtype=np.uint8))
    bad = encode_npy(np.full((32, 32, 3), np.nan, np.float32))  # InvalidInput: 400
    assert [server.post(body).status_code for body in (good, bad, good, bad, good)] == [
        200,
        400,
    ] * 2 + [200]
    # what the server itself says now; nothing else posts to it while this test runs
    page = requests.get(f"{server.endpoints.metrics_url}/metrics", timeout=10).text
    own = {
        (s.labels["Outcome"], s.labels["ErrorType"]): s.value
        for s in parse_prometheus(page)
        if s.name == "b4_requests" and s.labels.get("ModelName") == "b4"
    }
    assert own[("ok", "none")] >= 3 and own[("error", "InvalidInput")] >= 2

    def scraped_counts() -> dict[tuple[str, str], float] | None:
        series = query(prometheus, 'b4_requests{job="b4serve", ModelName="b4"}')
        counts = {(s["metric"]["Outcome"], s["metric"]["ErrorType"]): float(s["value"][1])
                  for s in series}  # fmt: skip
        return counts if counts == own else None

    wait_for(scraped_counts, f"Prometheus' b4_requests by outcome equal to the server's {own}")

    buckets = query(prometheus, 'b4_forward_seconds_bucket{job="b4serve", ModelName="b4"}')
    by_bound = {s["metric"]["le"]: float(s["value"][1]) for s in buckets}
    assert "+Inf" in by_bound and "2.5" in by_bound and len(by_bound) > 10, by_bound
    ordered = [by_bound[le] for le in sorted(by_bound, key=float)]
    assert ordered == sorted(ordered) and ordered[-1] > 0  # cumulative, and forwards counted
    (count,) = query(prometheus, 'b4_forward_seconds_count{job="b4serve", ModelName="b4"}')
    assert float(count["value"][1]) == by_bound["+Inf"]
    p99 = query(prometheus, "histogram_quantile(0.99, sum by (le) "
                            "(b4_forward_seconds_bucket{ModelName='b4'}))")  # fmt: skip
    assert 0 < float(p99[0]["value"][1]) <= 10  # seconds, within the buckets' range

    (up,) = query(prometheus, 'up{job="b4serve"}')
    assert up["value"][1] == "1"

    def evaluated_rules() -> list[dict] | None:
        groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for(evaluated_rules, "every alert rule evaluated once")
    assert {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules} == {
        name: ("ok", "")
        for name in ("B4RuntimeFallback", "B4ServerErrors", "B4QueueRefusing", "B4WorkerRestarts",
                     "B4ForwardSlow", "B4ScrapeDown")
    }  # fmt: skip
    firing = {rule["name"] for rule in rules if rule["state"] != "inactive"}
    assert not firing & {"B4RuntimeFallback", "B4ScrapeDown"}  # the demo serves its own runtime
