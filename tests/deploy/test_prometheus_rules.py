"""deploy/prometheus: Prometheus' own promtool accepts the config and the rules, and the rules'
unit tests (series that make each alert fire and series that must not) pass; every alert has a
test of each kind and a summary; the rules use only metrics our metrics.yaml exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "b4serve-alerts.yml"
RULE_TESTS = PROMETHEUS / "b4serve-alerts.test.yml"
# What PromQL names that is not a metric: functions, keywords, and the labels the rules group by.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "sum", "max", "rate", "increase",
    "changes", "histogram_quantile", "instance", "le", "job", "ModelName", "Runtime", "Recorded",
    "Fallback", "WorkerName",
}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (package prometheus, requirements-debian.txt)."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (requirements-debian.txt)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_config_and_the_rules_it_names() -> None:
    checked = promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(alerts())} rules found" in rules.stdout


def test_each_alert_fires_on_its_series_and_stays_quiet_on_the_others() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_summary_and_tests_that_fire_it_and_that_must_not() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == 6 and len(set(names)) == len(names)
    assert set(names) == fired == quiet
    for rule in alerts():
        assert len(rule["annotations"]["summary"]) > 40, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_the_rules_use_only_metrics_metrics_yaml_exports() -> None:
    config = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    declared = {
        metric["name"] + suffix
        for section in ("ts_metrics", "model_metrics")
        for kind, metrics in config[section].items()
        for metric in metrics
        for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))
    }
    used = set()
    for rule in alerts():
        expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", rule["expr"])  # selectors, ranges
        used |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr)) - PROMQL_WORDS
    assert used, "no metric found in the rules"
    assert used - {"up"} <= declared, used - {"up"} - declared
    assert {"b4_runtime", "Requests2XX", "Requests4XX", "Requests5XX", "b4_requests",
            "ts_inference_requests_total", "WorkerLoadTime", "b4_forward_seconds_bucket",
            "up"} == used  # fmt: skip


def test_the_scrape_target_is_the_servers_metrics_address_and_the_rules_job() -> None:
    scrape = yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    properties = dict(
        line.split("=", 1)
        for line in (ROOT / "config.properties").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    address = properties["metrics_address"].removeprefix("http://")
    assert [job["static_configs"][0]["targets"] for job in scrape] == [[address]]
    down = next(rule for rule in alerts() if rule["alert"] == "B4ScrapeDown")
    assert f'job="{scrape[0]["job_name"]}"' in down["expr"]
