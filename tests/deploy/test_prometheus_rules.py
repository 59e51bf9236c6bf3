"""Prometheus config, recording/alerting rules and their promtool unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from deploy_helpers import DEPLOY

PROM = DEPLOY / "prometheus"
CONFIGS = ["prometheus.yml", "prometheus.docker.yml"]
SERVICE_PORTS = {"intake": 9101, "timer": 9102, "resolver": 9103, "notifier": 9104,
                 "gateway": 9105}


def run(cmd: list[str], cwd: Path = PROM) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_promtool_check_config(promtool: str, config: str) -> None:
    run([promtool, "check", "config", config])


def test_promtool_check_rules(promtool: str) -> None:
    run([promtool, "check", "rules", "alerts.yml"])


def test_promtool_test_rules(promtool: str) -> None:
    out = run([promtool, "test", "rules", "alerts_test.yml"])
    assert "SUCCESS" in out


def _load(yaml_mod: ModuleType, name: str) -> Any:
    return yaml_mod.safe_load((PROM / name).read_text(encoding="utf-8"))


def _alerts(yaml_mod: ModuleType) -> list[dict[str, Any]]:
    doc = _load(yaml_mod, "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_severity_summary_and_runbook(yaml_mod: ModuleType) -> None:
    alerts = _alerts(yaml_mod)
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["runbook"].strip()) > 20, rule["alert"]


def test_required_alerts_exist(yaml_mod: ModuleType) -> None:
    names = {r["alert"] for r in _alerts(yaml_mod)}
    for needed in (
        "AftersalesSLABudgetBurnFast", "AftersalesSLABudgetBurnMedium",
        "AftersalesSLABudgetBurnSlow", "AftersalesOldestOpenCaseTooOld",
        "AftersalesTimerOverdueDeadlines", "AftersalesTimerLate", "AftersalesOutboxStuck",
        "AftersalesNotificationsFailing", "AftersalesRejectedEventsRising",
        "AftersalesServiceDown",
    ):  # fmt: skip
        assert needed in names


def test_every_alert_has_a_firing_and_a_quiet_case(yaml_mod: ModuleType) -> None:
    tests = _load(yaml_mod, "alerts_test.yml")["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in _alerts(yaml_mod)}
    assert names - fires == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_rules_use_only_defined_metrics(yaml_mod: ModuleType, queries: ModuleType) -> None:
    from shared.metrics import all_metric_names

    known = _expand(all_metric_names())
    doc = _load(yaml_mod, "alerts.yml")
    records = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    for group in doc["groups"]:
        for rule in group["rules"]:
            for name in queries.metric_names(rule["expr"]):
                assert name in known or name in records or name == "up", (
                    f"{rule.get('alert') or rule.get('record')}: unknown metric {name}"
                )


def _expand(names: frozenset[str]) -> set[str]:
    out = set(names)
    for n in names:
        out |= {n + "_bucket", n + "_sum", n + "_count"}
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_scrape_config_covers_services_and_rabbitmq(yaml_mod: ModuleType, config: str) -> None:
    doc = _load(yaml_mod, config)
    assert doc["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    for service, port in SERVICE_PORTS.items():
        job = jobs[f"aftersales-{service}"]
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert len(targets) == 1 and targets[0].endswith(f":{port}"), (service, targets)
    rabbit = [t for sc in jobs["rabbitmq"]["static_configs"] for t in sc["targets"]]
    assert rabbit[0].endswith(":15692")


def test_local_config_scrapes_localhost_every_5s(yaml_mod: ModuleType) -> None:
    doc = _load(yaml_mod, "prometheus.yml")
    assert doc["global"]["scrape_interval"] == "5s"
    for job in doc["scrape_configs"]:
        for sc in job["static_configs"]:
            assert all(t.startswith("localhost:") for t in sc["targets"])
